"""The signal bus: hooks, per-step device values, and the host sync. No decisions here.

The bus attaches to a training module and its optimiser and turns what it sees into per-step
signals (0-d tensors left on the device, see loopdyn.probes.history.SignalBuffer):

    forward hooks     loss (`.loss` of the output), logz, attention logits, and through the
                      LoopedModel protocol the loop signals: the optional `state_tap` module
                      (called with every new state during the model's own forward pass) gives
                      the per-loop state norms at no extra cost; a loop without a tap gets a
                      probe unroll (encode → init_state → step × T, no grad) on the first
                      `loop_batch` sequences of the last batch every `loop_every` steps
    step pre-hook     gradient norm, the optimiser's learning rates and settings (host values
                      of param_groups: read BEFORE the update), a copy of θ for the update ratio
    step post-hook    update ratio, ρ(Ā)/‖Ā‖ from the protocol's `linear_part()` operators,
                      embedding outliers, loop Jacobian σ_max every `jacobian_every` steps, lr

Two ways to read the activations (`compile_safe`, chosen automatically: on when the model or a
module inside it is torch.compile'd):
    hooks        as above: the model's own forward pass, every step (an eager model);
    compile-safe no hook on any compiled module: every activation signal comes from the
                 monitor's own eager probe pass (loopdyn.probes.probe_pass) every `loop_every`
                 steps on the last batch's first `loop_batch` sequences; the batch's token ids
                 and the loss come from hooks on the outermost module that runs eagerly (a
                 torch.compile wrapper runs its hooks outside the compiled frame), from an
                 integration (Lightning, Hugging Face) or from `record_inputs` / `record_loss`.

It calls its listener (the monitor façade) at two points of every step: `before_step(step)`
in the pre-hook (or from `before_optimizer_step()` for closure-style optimisers, once the
gradients exist) and `after_step(step)` in the post-hook. `flush()` moves pending values to
the host. A probe that raises is reported to `guard` and disabled; training continues.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from loopdyn.models.hooks import in_analysis
from loopdyn.models.kernels import under_transform
from loopdyn.models.protocol import find_looped_model
from loopdyn.probes.history import SignalBuffer
from loopdyn.probes.probe_pass import (ProbePass, compiled_modules, fsdp_modules, loop_values, max_attention_logit,
                                       mean_norm, unwrap_compiled)
from loopdyn.probes.spectral import InjectionTracker

# optimiser group keys that are not settings (or change by design)
_NOT_SETTINGS = ("params", "lr", "lr_scale", "initial_lr", "name", "param_names")


def _find_head(model: nn.Module) -> nn.Module | None:
    fn = getattr(model, "get_output_embeddings", None)
    if callable(fn):
        with contextlib.suppress(Exception):
            head = fn()
            if isinstance(head, nn.Module):
                return head
    for name in ("lm_head", "head", "output_layer", "output"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    return None


def _find_embedding(model: nn.Module) -> nn.Module | None:
    fn = getattr(model, "get_input_embeddings", None)
    if callable(fn):
        with contextlib.suppress(Exception):
            emb = fn()
            if isinstance(emb, nn.Embedding):
                return emb
    emb = getattr(model, "wte", None)
    if isinstance(emb, nn.Embedding):
        return emb
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 shards) — a collective — or t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def token_ids(args, kwargs=None) -> torch.Tensor | None:
    """The batch's token ids in a call's arguments: `input_ids=`, else the first integer
    tensor of shape (B, S)."""
    kwargs = kwargs or {}
    for t in (kwargs.get("input_ids"), kwargs.get("idx"), *args, *kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool:
            return t
    return None


def resolve_loop(model: nn.Module, loop=None):
    """(the LoopedModel or None, the module whose forward is a training step)."""
    loop = unwrap_compiled(find_looped_model(model) if loop is None else loop)
    root = model
    if isinstance(loop, nn.Module) and any(m is loop for m in model.modules()):
        root = loop  # e.g. a LoopedLM inside a LightningModule: its own forward is the step
    elif model is loop and isinstance(getattr(loop, "module", None), nn.Module):
        root = loop.module  # a LoopAdapter given as the model: the user's network runs
    return loop, root


def eager_root(model: nn.Module, loop, compiled: list[nn.Module]) -> nn.Module | None:
    """Compile-safe mode: the module whose hooks see every training forward and run outside any
    compiled frame — a torch.compile wrapper (OptimizedModule) around the loop, else the model
    itself unless it is compiled in place (then None: nothing is hooked)."""
    net = getattr(loop, "module", None)  # a LoopAdapter's network
    for m in compiled:
        if hasattr(m, "_orig_mod") and (loop is None or any(x is loop or x is net for x in m.modules())):
            return m
    return None if getattr(model, "_compiled_call_impl", None) is not None else model


class SignalBus:
    def __init__(self, model: nn.Module, optimizer, config, loop=None, *, guard: Callable, listener: Any):
        self.config = config
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.loop, self.root = resolve_loop(self.model, loop)
        self.compiled = compiled_modules(self.model)
        self.compile_safe = bool(self.compiled) if config.compile_safe is None else bool(config.compile_safe)
        if self.compile_safe:
            self.root = eager_root(self.model, self.loop, self.compiled)
        self.guard = guard
        self.listener = listener
        self.buffer = SignalBuffer(limit=config.history_limit)
        self.disabled: dict[str, str] = {}
        self.step = 0  # optimiser steps seen
        self.handles: list = []
        self.paused = 0
        self.last_step_skipped = False
        # per-forward / per-step scratch
        self._active = False
        self._depth = 0
        self.acc: dict[str, list] = {}
        self._loop_norms: list[torch.Tensor] = []
        self._loop_states: list[torch.Tensor] = []  # the last two states the tap saw
        self._attn_args: dict[nn.Module, tuple] = {}
        self._attn_handles: list = []
        self._head_out: torch.Tensor | None = None
        self.forwards_since_step = 0
        self.forwards_total = 0  # training forward passes seen (a data position)
        self._hooked_loss_step: int | None = None
        self._grad_norm_given: torch.Tensor | None = None
        self._pre_done_for: int | None = None
        self._prev_params: list[list[torch.Tensor]] | None = None
        self._closure_mode = False
        self._have_prev = False
        self.positions: dict[int, Any] = {}  # step → data position of its (first) batch
        self._user_position = None
        # loop
        self.tap = getattr(self.loop, "state_tap", None) if self.loop is not None else None
        if not isinstance(self.tap, nn.Module) or self.compile_safe:
            self.tap = None
        self.spectrum = InjectionTracker(self.loop) if self.loop is not None else None
        if self.spectrum is not None and not self.spectrum.present:
            self.spectrum = None
        self.probe_idx: torch.Tensor | None = None  # fixed Jacobian probe input
        self.last_idx: torch.Tensor | None = None  # the last batch's token ids (the probe pass)
        self.head = _find_head(self.root) if self.root is not None and not self.compile_safe else None
        self.embedding = _find_embedding(self.model)
        params = list(self.model.parameters())
        self.on_host = not params or params[0].device.type == "cpu"
        scope = self.loop if isinstance(self.loop, nn.Module) else (self.root or self.model)
        self._attn_modules = [m for m in scope.modules() if callable(getattr(m, "max_logit", None))]
        self.probe = (ProbePass(self.loop, self._attn_modules, self._device, fsdp_modules(self.model))
                      if self.loop is not None else None)
        self.seen = {"loss": False, "ids": False, "logits": False}  # what reached the monitor (coverage)

    @property
    def jac_v(self) -> torch.Tensor | None:
        return None if self.probe is None else self.probe.jac_v

    # ---- helpers -----------------------------------------------------------------------------
    def enabled(self, name: str) -> bool:
        return name not in self.disabled and name not in self.config.disable

    def _guard(self, name: str, fn, *args):
        if name in self.disabled:
            return None
        return self.guard(name, fn, *args)

    def add(self, name: str, step: int, value) -> None:
        self.buffer.add(name, step, value)

    def flush(self, block: bool = True) -> list[tuple[str, int, float]]:
        return self.buffer.flush(block=block)

    # ---- attach / detach ------------------------------------------------------------------------
    def attach(self) -> None:
        """Every hook, once (none is added or removed later, except the hook mode's attention
        pre-hooks on the steps that read them)."""
        root = self.root if self.config.hook_inputs else None
        if root is not None:
            self.handles.append(root.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self.handles.append(root.register_forward_hook(self._root_post))
        if self.tap is not None:
            self.handles.append(self.tap.register_forward_hook(self._tap))
        if self.head is not None:
            self.handles.append(self.head.register_forward_hook(self._head_post))
        if self.optimizer is not None:
            self.handles.append(self.optimizer.register_step_pre_hook(self._opt_pre))
            self.handles.append(self.optimizer.register_step_post_hook(self._opt_post))

    def _hook_attention(self, due: bool) -> None:
        """Attention pre-hooks only on the steps that read the attention logits (a hook on
        every attention call of every step costs ~0.2 % of a step on its own)."""
        if self.compile_safe:
            return  # the probe pass reads them
        if due and not self._attn_handles:
            self._attn_handles = [m.register_forward_pre_hook(self._attn_pre, with_kwargs=True)
                                  for m in self._attn_modules]
        elif not due and self._attn_handles:
            for h in self._attn_handles:
                h.remove()
            self._attn_handles = []

    def detach(self) -> None:
        self._hook_attention(False)
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._prev_params = None
        self._attn_args.clear()
        self._loop_states = []

    # ---- forward hooks --------------------------------------------------------------------------
    def _root_pre(self, module, args, kwargs):
        self._depth += 1
        if self._depth > 1:
            return None
        self._active = bool(not self.paused and module.training and torch.is_grad_enabled()
                            and not under_transform() and not in_analysis())
        if not self._active:
            return None
        if self.forwards_since_step == 0:
            self._guard("attention", self._hook_attention, self._attention_due() and "attention" not in self.disabled)
            if len(self.positions) > 4096:  # keep the recent ones (alerts and snapshots look back ≤ a few 100)
                for key in sorted(self.positions)[:2048]:
                    del self.positions[key]
            self.positions[self.step + 1] = (self._user_position if self._user_position is not None
                                             else {"batch_index": self.forwards_total})
            self._user_position = None
        self.forwards_since_step += 1
        self.forwards_total += 1
        self._loop_norms, self._loop_states = [], []
        self._attn_args = {}
        self._head_out = None
        idx = token_ids(args, kwargs)
        if idx is not None:
            self.record_inputs(idx)
        return None

    def record_inputs(self, idx: torch.Tensor) -> None:
        """The current batch's token ids (B, S): the probe pass's input."""
        if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and not idx.is_floating_point()):
            return
        self.last_idx = idx
        self.seen["ids"] = True
        if self.loop is not None and self.probe_idx is None:
            self.probe_idx = idx[:1, : self.config.jacobian_tokens].detach().clone()

    def _root_post(self, module, args, output):
        self._depth = max(0, self._depth - 1)
        if self._depth or not self._active:
            return None
        try:
            self._guard("forward", self._record_forward, output)
        finally:
            self._active = False
            self._loop_norms, self._loop_states = [], []
            self._attn_args = {}
            self._head_out = None
        return None

    def _record_forward(self, output) -> None:
        step = self.step + 1
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0 and output.is_floating_point():
            loss = output  # a model that returns its loss
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and self.enabled("loss"):
            self.acc.setdefault("loss", []).append(loss.detach().float().reshape(()))
            self._hooked_loss_step = step
            self.seen["loss"] = True
        if self.compile_safe:
            return  # the probe pass measures the rest
        if self.enabled("logz"):
            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, dict):
                logits = output.get("logits")
            if not isinstance(logits, torch.Tensor):
                logits = output if isinstance(output, torch.Tensor) and output.is_floating_point() else self._head_out
            if isinstance(logits, torch.Tensor) and logits.dim() >= 2:
                self.seen["logits"] = True
                self._guard("logz", self._record_logz, logits)
        if self.tap is not None:
            self._guard("loop_state", self._record_loop_state, output)
        if self._attn_args:
            self._guard("attention", self._record_attention)

    def _record_logz(self, logits: torch.Tensor) -> None:
        with torch.no_grad():
            self.acc.setdefault("logz", []).append(torch.logsumexp(logits.detach().float(), dim=-1).mean())

    def _record_loop_state(self, output) -> None:
        state, prev = getattr(output, "state", None), getattr(output, "prev_state", None)
        with torch.no_grad():
            # The output's own (h_T, h_{T−1}) are exact per sequence when depths differ; else the
            # last two states the tap saw.
            values = loop_values(self._loop_states, self._loop_norms,
                                       state if isinstance(state, torch.Tensor) else None,
                                       prev if isinstance(prev, torch.Tensor) and isinstance(state, torch.Tensor)
                                       else None)
        for name, v in values.items():
            if self.enabled(name):
                self.acc.setdefault(name, []).append(v)

    def _tap(self, module, args, output):
        if self._active and "loop_state" not in self.disabled and isinstance(output, torch.Tensor):
            try:
                if self._due(self.config.loop_every or 10):  # per-loop norms (state_norm_max, plotted, read
                    self._loop_norms.append(mean_norm(output))  # by no detector): the probe cadence
                self._loop_states = [*self._loop_states[-1:], output.detach()]
            except Exception as err:
                self._guard("loop_state", _raise, err)
        return None

    def _due(self, every: int) -> bool:
        """Whether the coming step is on a cadence of `every` steps."""
        return (self.step + 1) % every == 0

    def _attention_due(self) -> bool:
        return self.enabled("attn_logit_max") and self._due(self.config.attention_every)

    def _attn_pre(self, module, args, kwargs):
        if self._active and "attention" not in self.disabled:
            self._attn_args[module] = (args, kwargs)  # the latest call (for core blocks: the last loop)
        return None

    def _record_attention(self) -> None:
        value = max_attention_logit(self._attn_args, self.config.attention_batch)
        if value is not None:
            self.acc.setdefault("attn_logit_max", []).append(value)

    def _head_post(self, module, args, output):
        if self._active and isinstance(output, torch.Tensor):
            self._head_out = output
        return None

    # ---- the loss and batches given by hand ------------------------------------------------------
    def record_loss(self, loss) -> bool:
        """Returns True when this call completed a step (no optimiser: each call is one)."""
        target = self.step + 1 if (self.forwards_since_step or self.optimizer is None) else self.step
        if target == self._hooked_loss_step or target < 1:
            return False
        self.seen["loss"] = True
        value = loss.detach().float().mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if target == self.step + 1:
            self.acc.setdefault("loss", []).append(value)
            if self.optimizer is None:  # nothing will commit it: this call is the step
                self.positions.setdefault(target, {"batch_index": target - 1})
                self.commit(target)
                self.step = target
                return True
        else:
            self.add("loss", target, value)
        return False

    def record_batch(self, position) -> None:
        self._user_position = position
        if self.forwards_since_step:  # the forward already ran: it belongs to the coming step
            self.positions[self.step + 1] = position
            self._user_position = None

    # ---- optimiser hooks ------------------------------------------------------------------------
    def _opt_pre(self, optimizer, args, kwargs):
        closure = kwargs.get("closure") if kwargs else None
        if closure is None and len(args) > 1:
            closure = args[1]
        self._closure_mode = closure is not None
        if not self._closure_mode:
            self.listener.before_optimizer_step()
        if (self.config.update_ratio and self.enabled("update_ratio")
                and (self.step + 1 <= self.config.update_dense or self._due(self.config.update_every))):
            self._guard("update_ratio", self._copy_params)
        return None

    def pre_step(self) -> int | None:
        """Gradient signals for the coming step; returns its number (None: already done)."""
        step = self.step + 1
        if self._pre_done_for == step or self.optimizer is None:
            return None
        self._pre_done_for = step
        self.last_step_skipped = False
        if self.enabled("grad_norm"):
            self._guard("grad_norm", self._record_grad_norm)
        return step

    def optimizer_view(self) -> tuple[list[dict], int]:
        """Host values of every group's lr and scalar settings, and how many parameters have
        optimiser state (no device sync; a tensor lr is left out)."""
        groups = []
        for g in self.optimizer.param_groups:
            view = {k: v for k, v in g.items() if k not in _NOT_SETTINGS
                    and isinstance(v, (bool, int, float, str, tuple, type(None)))}
            lr = g.get("lr")
            if isinstance(lr, (int, float)):
                view["lr"] = float(lr)
            groups.append(view)
        return groups, len(self.optimizer.state)

    def _record_grad_norm(self) -> None:
        if self._grad_norm_given is not None:
            norm = _full(self._grad_norm_given)
        else:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return
            with torch.no_grad():
                norm = _full(torch.nn.utils.get_total_norm([g.detach() for g in grads]))
        self._grad_norm_given = None
        self.acc["grad_norm"] = [norm.float().reshape(())]

    def record_grad_norm(self, norm) -> None:
        self._grad_norm_given = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))

    def _copy_params(self) -> None:
        groups = [[p for p in g["params"]] for g in self.optimizer.param_groups]
        with torch.no_grad():
            if self._prev_params is None or [len(g) for g in groups] != [len(g) for g in self._prev_params] or any(
                    a.shape != b.shape for ga, gb in zip(groups, self._prev_params) for a, b in zip(ga, gb)):
                self._prev_params = [[p.detach().clone() for p in g] for g in groups]
            else:
                for prev, g in zip(self._prev_params, groups):
                    if prev and any(hasattr(p, "to_local") for p in g):  # DTensor (FSDP2): no foreach copy
                        for a, b in zip(prev, g):
                            a.copy_(b.detach())
                    elif prev:
                        torch._foreach_copy_(prev, [p.detach() for p in g])
            self._have_prev = True

    def _opt_post(self, optimizer, args, kwargs):
        step = self.step + 1
        if self._closure_mode and self._pre_done_for != step:
            self.listener.before_optimizer_step(_can_skip=False)  # grads exist now; too late to skip
        self._guard("commit", self.commit, step)
        if self._prev_params is not None and self._have_prev:
            self._guard("update_ratio", self._record_update_ratio, step)
        if self.spectrum is not None and (self.enabled("injection_radius") or self.enabled("injection_norm")):
            self._guard("spectral", self._record_spectral, step)
        if self.embedding is not None and step % self.config.spectral_every == 0 and self.enabled("embed_outliers"):
            self._guard("embedding", self._record_embedding, step)
        if self.loop is not None and step % self.config.jacobian_every == 0 and self.enabled("jacobian_norm"):
            self._guard("jacobian", self._record_jacobian, step)
        if self.loop is not None and self._probe_due(step):
            self._guard("loop_state", self._record_loop_probe, step)
        lr = optimizer.param_groups[0].get("lr")
        if isinstance(lr, (float, int, torch.Tensor)):
            self.add("lr", step, lr)  # a tensor lr (capturable optimisers) stays on its device
        self.step = step
        self.forwards_since_step = 0
        self.listener.after_step(step)

    # ---- per-step signal bodies -------------------------------------------------------------------
    def commit(self, step: int) -> None:
        """Move this step's accumulated device values into the buffer (means over micro-batches)."""
        acc, self.acc = self.acc, {}
        for name, values in acc.items():
            value = values[0] if len(values) == 1 else torch.stack([v.to(values[0].device) for v in values]).mean()
            self.add(name, step, value)

    def _record_update_ratio(self, step: int) -> None:
        self._have_prev = False
        if self.last_step_skipped:
            return
        with torch.no_grad():
            total_d, total_p, per_group = [], [], []
            for gi, (g, prev) in enumerate(zip(self.optimizer.param_groups, self._prev_params)):
                params = [p.detach() for p in g["params"]]
                if not params:
                    continue
                torch._foreach_sub_(prev, params)  # prev ← θ_before − θ_after = −Δθ
                d = torch.stack([_full(n).float() for n in torch._foreach_norm(prev)]).square().sum()
                p = torch.stack([_full(n).float() for n in torch._foreach_norm(params)]).square().sum()
                total_d.append(d)
                total_p.append(p)
                per_group.append((g.get("name", f"g{gi}"), d, p))
            if not total_d:
                return
            ratio = (torch.stack(total_d).sum() / torch.stack(total_p).sum().clamp_min(1e-30)).sqrt()
            self.add("update_ratio", step, ratio)
            if len(per_group) > 1:
                for name, d, p in per_group:
                    self.add(f"update_ratio/{name}", step, (d / p.clamp_min(1e-30)).sqrt())

    def _record_spectral(self, step: int) -> None:
        values = self.spectrum.values(step, self.config.spectral_every, self.on_host)
        for k, v in values.items():
            if self.enabled(k):
                self.add(k, step, v)

    def _record_embedding(self, step: int) -> None:
        with torch.no_grad():
            w = _full(self.embedding.weight.detach()).float()
            rms = w.square().mean().sqrt()
            self.add("embed_outliers", step, (w.abs() > 6 * rms).float().mean())

    def _device(self):
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def _attention_in_probe(self, step: int) -> bool:
        return self.compile_safe and self.enabled("attn_logit_max") and step % self.config.attention_every == 0

    def _probe_due(self, step: int) -> bool:
        """The probe pass runs every `loop_every` steps when the hooks do not give the loop
        signals (compile-safe mode, or a loop without a state tap), and on the attention cadence
        in compile-safe mode."""
        if self.tap is not None:
            return False
        every = self.config.loop_every or (20 if self.compile_safe else 10)  # MonitorConfig.loop_every
        return step % every == 0 or self._attention_in_probe(step)

    def _record_loop_probe(self, step: int) -> None:
        """The eager probe pass on the first `loop_batch` sequences of the last batch."""
        if self.last_idx is None:
            return
        n = self.config.loop_batch or (1 if self.compile_safe else 2)  # MonitorConfig.loop_batch
        idx = self.last_idx[:n].detach()
        with self.pause():
            values = self.probe.run(idx, with_logz=self.enabled("logz") and (self.compile_safe or not self.seen["logits"]),
                                    with_attention=self._attention_in_probe(step))
        for name, v in values.items():
            if self.enabled(name):
                self.add(name, step, v)

    def _record_jacobian(self, step: int) -> None:
        if self.probe_idx is None:
            return
        with self.pause():
            sigma = self.probe.jacobian(self.probe_idx, self.config.jacobian_iters)
        self.add("jacobian_norm", step, sigma)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield self
        finally:
            self.paused -= 1

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.buffer.state_dict(),
                "spectrum": None if self.spectrum is None else self.spectrum.state_dict(),
                "jacobian_v": self.jac_v, "probe_idx": self.probe_idx, "forwards_total": self.forwards_total}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.buffer.load_state_dict(state["history"])
        if self.spectrum is not None and state.get("spectrum"):
            self.spectrum.load_state_dict(state["spectrum"])
        if self.probe is not None:
            self.probe.jac_v = state.get("jacobian_v")
        self.probe_idx = state.get("probe_idx")
        self.forwards_total = int(state.get("forwards_total", 0))
        self._pre_done_for = None


def _raise(err: Exception):
    raise err
