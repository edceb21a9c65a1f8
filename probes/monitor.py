"""StabilityMonitor: live-training signals, detectors, alerts and actions, attached by hooks.

    monitor = probes.StabilityMonitor(model, optimizer)        # defaults: watch and warn
    for x, y in batches:
        loss = model(x, y).loss                                 # .loss is read by a hook
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if monitor.stop_requested: break
    monitor.close()                                             # or `with StabilityMonitor(...)`
    monitor.alerts, monitor.history["state_norm"]

Signals (name: when, where from)
    loss            every step   model output `.loss` (forward hook), else `record_loss()`
    grad_norm       every step   ‖∇θ‖₂ before the step (`record_grad_norm()` from a trainer
                                 that clips, else computed from .grad in the step pre-hook)
    update_ratio    every `update_every` steps (default 2): ‖Δθ‖₂/‖θ‖₂ over all parameters, and
                                 update_ratio/<group>; needs a copy of θ before the step
                                 (one parameter-sized buffer, ~1 % of a small-model step)
    lr              every step   group 0's learning rate (host value)
    state_norm      every step   mean over batch and tokens of ‖h_T‖₂ (the final state)
    state_norm_max  every step   the largest per-loop mean ‖h_t‖₂ (state_tap hook)
    rel_residual    every step   mean ‖h_T − h_{T−1}‖₂ / mean ‖h_T‖₂
    logz            every step   mean over tokens of log Σ exp(logits) (output log-partition)
    injection_norm  every step   ‖Ā‖₂ (exact for diagonal, warm power iteration for dense)
    injection_radius every step: ρ(Ā) (diagonal: exact; dense Ā up to 96 wide: eigvals),
                                 wider dense Ā every `spectral_every` steps
    attn_logit_max  every `attention_every` steps: largest causal pre-softmax logit over all
                                 attention blocks (each at its last call of the step), for the
                                 first `attention_batch` sequences of the batch
    embed_outliers  every `spectral_every` steps: fraction of embedding entries > 6·RMS
    jacobian_norm   every `jacobian_every` steps: σ_max of ∂step/∂h at a fixed probe input (the
                                 first ≤ `jacobian_tokens` tokens of the first sequence seen),
                                 at h_{T−1}, T = μ_rec; a warm-started power-iteration lower bound
    skipped         1 when the monitor skipped the step

Sync cadence: per-step values are 0-d tensors left on the device. After each step the values
of that step are stacked and copied to pinned host memory asynchronously (CUDA: an event is
recorded and polled at later steps, never waited on), so detectors usually see a step's
values one step later without stalling the GPU; on the CPU there is nothing to transfer and
detection is immediate. Every `sync_every` steps (default 10) the host does one blocking read
of whatever is still in flight, which bounds the delay. Skip mode reads the pre-step signals
before every step (the decision must precede the update: one sync per step). Under
torch.distributed, actions are agreed across ranks (all_reduce MAX) every `sync_every`
steps, or every step in skip mode and in "heightened watch" (entered when the early-warning
score is non-zero, left after a quiet window). Nothing in the per-step path calls .item().

Hooks record only training forwards: the root module must be in training mode, autograd
enabled, no torch.func transform active, and the monitor not paused (`with monitor.pause()`).
A probe that raises is disabled with one warning; training continues. The monitor changes
nothing in the run unless an action other than "warn"/"log" is configured.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

import torch
from torch import nn

from loopdyn.probes.actions import ACTIONS, SnapshotRing, cut_learning_rate, drop_gradients
from loopdyn.probes.alerts import (Alert, ConsoleSink, InstabilityError, JsonlSink, Sink, TensorBoardSink)
from loopdyn.probes.detectors import EarlyWarningDetector, NonFiniteDetector, SpikeDetector, TrendDetector
from loopdyn.probes.distributed import agree_max, world
from loopdyn.probes.history import History, SignalBuffer
from loopdyn.probes.spectral import InjectionSpectrum, loop_jacobian_sigma

# Decision levels, reduced with MAX across ranks: the strongest action wins.
_LEVEL = {"warn": 0, "log": 0, "cut_lr": 1, "rollback": 2, "stop": 3, "raise": 4}
_ACTION_OF_LEVEL = {v: k for k, v in _LEVEL.items() if k != "log"}
# The signals that condemn the step they belong to (its update is computed from them).
STEP_SIGNALS = ("loss", "grad_norm")


@dataclass
class MonitorConfig:
    """Every knob of the monitor, with defaults meant to be left on.

    Defaults and why (figures from bench/probe_overhead.py and bench/spike_scenarios.py):
    - spikes: robust z ≥ 6 over 128 steps after 20 warm-up steps (OLMo-core's 6σ/128, with
      median/MAD so an earlier spike does not inflate the scale). The loss must also be ≥ 5 %
      above its median and the gradient norm ≥ 3×: at batch 8 × 64 a healthy run has hard
      batches with 2.5× gradient-norm bumps.
    - trend: ×4 growth over 30 observations, Kendall τ ≥ 0.6, not before step 50 (a model's
      state norm grows several-fold while it first learns).
    - early warning: one strong or two moderate precursors (EarlyWarningDetector), from step
      30. On the scenarios: 0 alarms in 12 runs of Parcae / linear without a push (1 in the
      Parcae run with a ×20 injection-LR jump), warnings 1–16 steps before the loss breaks.
    - cost on the `small` preset (CPU, 1 thread): update ratio every 2 steps (~0.6 % of a
      step; every step doubles it), loop Jacobian every 100 steps with 3 warm-started
      iterations on 32 tokens (~0.05 s warm, < 0.1 %), attention logits every 10 steps on 2
      sequences (~0.2 %): about 1.5 % of a step inside the monitor in all.
    - rollback: a CPU snapshot every 50 steps, a ring of 2.
    """

    # cadence
    sync_every: int = 10
    spectral_every: int = 10
    attention_every: int = 10
    jacobian_every: int = 100
    jacobian_iters: int = 3
    jacobian_tokens: int = 32
    attention_batch: int = 2  # sequences whose attention logits are recomputed
    update_ratio: bool = True
    update_every: int = 2
    disable: tuple = ()  # signal names (or probe names) not to record
    # detectors
    spike_method: str = "mad"  # loss and gradient-norm spikes: mad | ema | ratio
    spike_threshold: float | None = None  # None: 6 robust σ (mad), 6 σ (ema), 10× (ratio)
    spike_window: int = 128
    spike_warmup: int = 20
    trend_window: int = 30
    trend_growth: float = 4.0
    trend_warmup: int = 50  # the state norm grows several-fold while a model first learns
    early_warning: bool = True
    warning_warmup: int = 30
    # actions: warn (print and record) | log (record and write to files, no console line) |
    # raise | stop | skip | rollback | cut_lr
    on_spike: str = "warn"  # loss / gradient-norm spikes
    on_nonfinite: str | None = None  # None: as on_spike
    on_warning: str = "warn"  # early warnings
    on_trend: str = "warn"
    lr_cut: float = 0.5  # cut_lr factor, also applied after a rollback (rollback_lr_cut)
    rollback_lr_cut: float = 0.5
    snapshot_every: int = 50
    snapshot_ring: int = 2
    snapshot_device: str = "cpu"
    max_skips: int = 20  # consecutive skipped steps before the monitor asks to stop
    max_rollbacks: int = 5  # rollbacks without a clean sync in between before it asks to stop
    # sinks
    console: bool = True
    alerts_path: str | None = None
    tensorboard_dir: str | None = None
    history_limit: int | None = None

    def validate(self) -> None:
        from loopdyn.models.errors import InputError

        for name in ("sync_every", "spectral_every", "attention_every", "jacobian_every", "snapshot_every",
                     "update_every"):
            if getattr(self, name) < 1:
                raise InputError(f"monitor option {name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("on_spike", "on_nonfinite", "on_warning", "on_trend"):
            value = getattr(self, name)
            if value is not None and value not in ACTIONS:
                raise InputError(f"monitor option {name} must be one of {', '.join(ACTIONS)}, got {value!r}")
        for name in ("on_warning", "on_trend"):
            if getattr(self, name) == "skip":
                raise InputError(f"monitor option {name}: 'skip' needs a decision before the step; "
                                 "only on_spike / on_nonfinite can skip")
        if not 0 < self.lr_cut <= 1 or not 0 < self.rollback_lr_cut <= 1:
            raise InputError("lr_cut and rollback_lr_cut must lie in (0, 1]")


def _in_functorch() -> bool:
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except Exception:  # an older/newer torch without this internal: assume not
        return False


def _find_looped(model: nn.Module) -> nn.Module | None:
    """The module that runs the loop (has state_tap, injection and step), if any."""
    for m in model.modules():
        if getattr(m, "state_tap", None) is not None and getattr(m, "injection", None) is not None \
                and callable(getattr(m, "step", None)):
            return m
    return None


def _find_head(model: nn.Module) -> nn.Module | None:
    for getter in ("get_output_embeddings",):
        fn = getattr(model, getter, None)
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


def _mean_norm(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(h.detach().float(), dim=-1).mean()


class StabilityMonitor:
    """Watches a training run through hooks; see the module docstring.

    model: any nn.Module (a DistributedDataParallel wrapper is unwrapped); a looped model
    inside it (state_tap, injection, step) adds the loop signals. optimizer: any
    torch.optim.Optimizer (None: forward signals only). config: a MonitorConfig; keyword
    arguments override its fields (`jsonl=` is an alias of `alerts_path=`). sinks: extra Sink
    objects (console / JSONL / TensorBoard ones are made from the config).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: MonitorConfig | None = None, sinks: Iterable[Sink] = (), **overrides: Any):
        cfg = MonitorConfig(**asdict(config)) if config is not None else MonitorConfig()
        known = {f.name for f in fields(MonitorConfig)}
        if "jsonl" in overrides:  # alias: the JSON Lines alerts file
            overrides["alerts_path"] = overrides.pop("jsonl")
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"StabilityMonitor got an unknown option {key!r}")
            setattr(cfg, key, value)
        if cfg.on_nonfinite is None:
            cfg.on_nonfinite = cfg.on_spike
        cfg.validate()
        self.config = cfg
        self.rank, self.world_size = world()
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.optimizer = optimizer
        self.looped = _find_looped(self.model)
        self.root = self.looped if self.looped is not None else self.model
        self.step = 0  # optimiser steps seen
        self.alerts: list[Alert] = []
        self.stop_requested = False
        self.stop_reason: str | None = None
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.rollbacks: list[tuple[int, int]] = []  # (at step, restored step)
        self.disabled: dict[str, str] = {}
        self._buffer = SignalBuffer(limit=cfg.history_limit)
        self._handles: list = []
        self._sinks: list[Sink] = []
        self._closed = False
        self._paused = 0
        # per-forward / per-step scratch
        self._active = False
        self._depth = 0
        self._acc: dict[str, list] = {}
        self._loop_norms: list[torch.Tensor] = []
        self._attn_args: dict[nn.Module, tuple] = {}
        self._head_out: torch.Tensor | None = None
        self._forwards_since_step = 0
        self._hooked_loss_step: int | None = None
        self._grad_norm_given: torch.Tensor | None = None
        self._pre_done_for: int | None = None
        self._prev_params: list[list[torch.Tensor]] | None = None
        self._closure_mode = False
        self._consecutive_skips = 0
        self._rollbacks_since_clean = 0
        self._watch = False
        self._quiet_syncs = 0
        self._last_snapshot_step = 0
        self._ew_evaluated = 0
        self._have_prev = False
        self._undetected: list[tuple[str, int, float]] = []
        self._unacted: list[Alert] = []
        self._anomalies: dict[int, dict[str, str]] = {}  # step → {signal: "spike" | "nonfinite"}, not yet acted on
        # loop-specific state
        self._spectrum = InjectionSpectrum(self.looped.injection) if self.looped is not None else None
        self._probe_idx: torch.Tensor | None = None
        self._jac_v: torch.Tensor | None = None
        self._head = _find_head(self.root) if self.root is not None else None
        self._embedding = _find_embedding(self.model)
        # detectors
        self._detectors: dict[str, list] = {}
        self._nonfinite: dict[str, NonFiniteDetector] = {}
        self._build_detectors()
        self.early_warning = (EarlyWarningDetector(warmup=cfg.warning_warmup,
                                                   watch_radius=not (self._spectrum and self._spectrum.guaranteed_stable))
                              if cfg.early_warning else None)
        self._snapshots = (SnapshotRing(self.model, optimizer, cfg.snapshot_ring, cfg.snapshot_device)
                           if optimizer is not None and "rollback" in self._actions() else None)
        self._make_sinks(sinks)
        self._attach()

    # ---- construction ----------------------------------------------------------------------
    def _actions(self) -> set[str]:
        c = self.config
        return {c.on_spike, c.on_nonfinite, c.on_warning, c.on_trend}

    @property
    def skip_mode(self) -> bool:
        return "skip" in (self.config.on_spike, self.config.on_nonfinite)

    def _build_detectors(self) -> None:
        c = self.config
        spike = dict(method=c.spike_method, threshold=c.spike_threshold, window=c.spike_window, warmup=c.spike_warmup)
        self._detectors = {
            "loss": [SpikeDetector("loss", min_rel=0.05, **spike)],
            # A gradient-norm spike must also be ≥ 3× the median: small-batch runs have hard batches.
            "grad_norm": [SpikeDetector("grad_norm", min_rel=2.0, **spike)],
            "state_norm": [TrendDetector("state_norm", window=c.trend_window, min_growth=c.trend_growth,
                                         warmup=c.trend_warmup, min_tau=0.6)],
            "attn_logit_max": [TrendDetector("attn_logit_max", window=max(5, c.trend_window // 3),
                                             min_growth=c.trend_growth, warmup=5)],
            "jacobian_norm": [TrendDetector("jacobian_norm", window=5, min_growth=c.trend_growth, warmup=5)],
        }

    def _make_sinks(self, extra: Iterable[Sink]) -> None:
        c = self.config
        main = self.rank == 0
        if c.console and main:
            self._sinks.append(ConsoleSink())
        if c.alerts_path and main:
            self._sinks.append(JsonlSink(c.alerts_path))
        if c.tensorboard_dir and main:
            self._sinks.append(TensorBoardSink(c.tensorboard_dir))
        self._sinks.extend(extra)

    def _attach(self) -> None:
        root = self.root
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post))
        if self.looped is not None:
            self._handles.append(self.looped.state_tap.register_forward_hook(self._tap))
        for m in root.modules():
            if callable(getattr(m, "max_logit", None)):
                self._handles.append(m.register_forward_pre_hook(self._attn_pre, with_kwargs=True))
        if self._head is not None:
            self._handles.append(self._head.register_forward_hook(self._head_post))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._opt_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._opt_post))

    # ---- public API --------------------------------------------------------------------------
    @property
    def history(self) -> History:
        """Recorded signals (reading it moves pending device values to the host: one sync)."""
        self._flush_host()
        return History(self._buffer.store)

    def record_loss(self, loss) -> None:
        """Give the loss of the current step (or of the step just taken, if called after
        optimizer.step()) when the model output has no `.loss`. Ignored for a step whose
        forward already exposed `.loss`."""
        self._guard("loss", self._record_loss, loss)

    def _record_loss(self, loss) -> None:
        target = self.step + 1 if (self._forwards_since_step or self.optimizer is None) else self.step
        if target == self._hooked_loss_step or target < 1:
            return
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float().mean()  # a per-sample loss: its mean
        else:
            value = torch.tensor(float(loss))
        if target == self.step + 1:
            self._acc.setdefault("loss", []).append(value)
            if self.optimizer is None:  # nothing will commit it: this call is the step
                self._commit(target)
                self.step = target
                self._after_step(target)
        else:
            self._buffer.add("loss", target, value)

    def record_grad_norm(self, norm) -> None:
        """The total gradient norm before clipping (what clip_grad_norm_ returns) for this step."""
        self._grad_norm_given = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))

    @contextlib.contextmanager
    def pause(self):
        """Forward passes inside this block are not recorded (e.g. extra evaluation forwards in
        training mode)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    @property
    def recovers_nonfinite(self) -> bool:
        """True when a non-finite loss is handled by skip/rollback (the trainer may go on)."""
        return self.config.on_nonfinite in ("skip", "rollback") and not self.stop_requested

    def flush(self) -> list[Alert]:
        """Read pending values, run the detectors and act now; returns the new alerts. Under
        torch.distributed every rank must call it (the decision is agreed across ranks)."""
        new = self._detect()
        self._sync_point(detect=False)
        return new

    def close(self) -> None:
        """Final sync, detach every hook, close the sinks. Idempotent."""
        if self._closed:
            return
        self._guard("sync", self._detect)  # last alerts are reported; no action at close
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.close()
        self._prev_params = None
        self._attn_args.clear()
        self._closed = True

    def __enter__(self) -> "StabilityMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            if not self._closed:
                for h in self._handles:
                    h.remove()

    # ---- fault containment --------------------------------------------------------------------
    def _enabled(self, name: str) -> bool:
        return name not in self.disabled and name not in self.config.disable

    def _guard(self, name: str, fn, *args):
        if name in self.disabled:
            return None
        try:
            return fn(*args)
        except InstabilityError:
            raise
        except Exception as err:  # a probe must never crash the run: disable it, warn once
            self.disabled[name] = repr(err)
            warnings.warn(f"loopdyn probe {name!r} disabled after an internal error: {err!r}; training continues",
                          RuntimeWarning, stacklevel=2)
            alert = Alert(self.step, "probe_error", "info", name, math.nan, math.nan,
                          f"probe {name} disabled: {err!r}", detected_step=self.step)
            self.alerts.append(alert)
            self._emit(alert)
            return None

    # ---- forward hooks --------------------------------------------------------------------------
    def _root_pre(self, module, args):
        self._depth += 1
        if self._depth > 1:
            return None
        self._active = bool(not self._paused and module.training and torch.is_grad_enabled() and not _in_functorch())
        if not self._active:
            return None
        self._forwards_since_step += 1
        self._loop_norms = []
        self._attn_args = {}
        self._head_out = None
        if self.looped is not None and self._probe_idx is None and args:
            self._guard("jacobian", self._capture_probe_input, args[0])
        return None

    def _capture_probe_input(self, idx) -> None:
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and not idx.is_floating_point():
            self._probe_idx = idx[:1, : self.config.jacobian_tokens].detach().clone()

    def _root_post(self, module, args, output):
        self._depth = max(0, self._depth - 1)
        if self._depth or not self._active:
            return None
        try:
            self._guard("forward", self._record_forward, output)
        finally:
            self._active = False
            self._loop_norms = []
            self._attn_args = {}
            self._head_out = None
        return None

    def _record_forward(self, output) -> None:
        step = self.step + 1
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and self._enabled("loss"):
            self._acc.setdefault("loss", []).append(loss.detach().float().reshape(()))
            self._hooked_loss_step = step
        if self._enabled("logz"):
            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, dict):
                logits = output.get("logits")
            if not isinstance(logits, torch.Tensor):
                logits = self._head_out
            if isinstance(logits, torch.Tensor) and logits.dim() >= 2:
                self._guard("logz", self._record_logz, logits)
        if self.looped is not None:
            self._guard("loop_state", self._record_loop_state, output)
        if self._attn_args:
            self._guard("attention", self._record_attention)

    def _record_logz(self, logits: torch.Tensor) -> None:
        with torch.no_grad():
            self._acc.setdefault("logz", []).append(torch.logsumexp(logits.detach().float(), dim=-1).mean())

    def _record_loop_state(self, output) -> None:
        state, prev = getattr(output, "state", None), getattr(output, "prev_state", None)
        norms = self._loop_norms
        with torch.no_grad():
            if isinstance(state, torch.Tensor) and self._enabled("state_norm"):
                final = _mean_norm(state)
                self._acc.setdefault("state_norm", []).append(final)
                if isinstance(prev, torch.Tensor) and self._enabled("rel_residual"):
                    resid = torch.linalg.vector_norm((state.detach() - prev.detach()).float(), dim=-1).mean()
                    self._acc.setdefault("rel_residual", []).append(resid / final.clamp_min(1e-30))
            elif norms and self._enabled("state_norm"):
                self._acc.setdefault("state_norm", []).append(norms[-1])
            if norms and self._enabled("state_norm_max"):
                self._acc.setdefault("state_norm_max", []).append(torch.stack(norms).max())

    def _tap(self, module, args, output):
        if self._active and "loop_state" not in self.disabled:
            try:
                self._loop_norms.append(_mean_norm(output))
            except Exception as err:
                self._guard("loop_state", _raise, err)
        return None

    def _attention_due(self) -> bool:
        return self._enabled("attn_logit_max") and (self.step + 1) % self.config.attention_every == 0

    def _attn_pre(self, module, args, kwargs):
        if self._active and "attention" not in self.disabled and self._attention_due():
            self._attn_args[module] = (args, kwargs)  # the latest call (for core blocks: the last loop)
        return None

    def _record_attention(self) -> None:
        n = self.config.attention_batch

        def first(t):
            return t[:n] if isinstance(t, torch.Tensor) else t

        values = []
        with torch.no_grad():
            for module, (args, kwargs) in self._attn_args.items():
                # max_logit(a, rope, ve): a and ve are per sequence, rope per position
                args = [first(t) if i in (0, 2) else t for i, t in enumerate(args)]
                kwargs = {k: first(t) if k == "ve" else t for k, t in kwargs.items()}
                values.append(module.max_logit(*args, **kwargs).detach().float().reshape(()))
        if values:
            self._acc.setdefault("attn_logit_max", []).append(torch.stack(values).max())

    def _head_post(self, module, args, output):
        if self._active and isinstance(output, torch.Tensor):
            self._head_out = output
        return None

    # ---- optimiser hooks ------------------------------------------------------------------------
    def _opt_pre(self, optimizer, args, kwargs):
        closure = kwargs.get("closure") if kwargs else None
        if closure is None and len(args) > 1:
            closure = args[1]
        self._closure_mode = closure is not None
        if not self._closure_mode:
            self.before_optimizer_step()
        if (self.config.update_ratio and self._enabled("update_ratio")
                and (self.step + 1) % self.config.update_every == 0):
            self._guard("update_ratio", self._copy_params)
        return None

    def before_optimizer_step(self, _can_skip: bool = True) -> None:
        """Gradient signals and the skip decision for the coming step. Called by the step
        pre-hook; integrations whose optimizer.step(closure) computes the gradients inside
        the step (Lightning) call it once the gradients exist (on_before_optimizer_step)."""
        step = self.step + 1
        if self._pre_done_for == step or self.optimizer is None:
            return
        self._pre_done_for = step
        self.last_step_skipped = False
        if self._enabled("grad_norm"):
            self._guard("grad_norm", self._record_grad_norm)
        if self.skip_mode and _can_skip:
            self._guard("skip", self._skip_decision, step)

    def _record_grad_norm(self) -> None:
        if self._grad_norm_given is not None:
            norm = self._grad_norm_given
        else:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return
            with torch.no_grad():
                norms = torch._foreach_norm([g.detach() for g in grads])
                dev = norms[0].device
                norm = torch.linalg.vector_norm(torch.stack([n.float().to(dev) for n in norms]))
        self._grad_norm_given = None
        self._acc["grad_norm"] = [norm.float().reshape(())]

    def _skip_decision(self, step: int) -> None:
        """Skip mode: read this step's pre-step signals now and decide before the update. Every
        step whose loss or gradient norm is non-finite or above its spike threshold is skipped,
        however many come in a row (the detectors alert once per episode, the skip holds for
        each bad step)."""
        self._commit(step)
        new = self._detect()
        bad = self._anomalies.get(step, {})
        trigger = {sig: kind for sig, kind in bad.items() if self._action_of_kind(kind) == "skip"}
        for sig in trigger:  # handled here; anything else (e.g. on_nonfinite="rollback") waits for _act
            del bad[sig]
        if not bad:
            self._anomalies.pop(step, None)
        (flag,) = agree_max([1 if trigger else 0])
        if not flag:
            self._consecutive_skips = 0
            self.last_step_skipped = False
            return
        drop_gradients(self.optimizer)
        self.last_step_skipped = True
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self._buffer.add("skipped", step, 1.0)
        if trigger:
            signal, kind = next(iter(trigger.items()))
            why = f"{kind} on {signal}"
        else:
            signal, why = "skip", "another rank asked"
        cause = next((a for a in new if a.step == step and a.signal == signal), None)
        self._act_alert(step, signal, f"skipped step {step} ({why}): no parameter change"
                        + ("" if cause is not None else " (the same episode continues)"))
        if self._consecutive_skips >= self.config.max_skips:
            self._request_stop(f"{self._consecutive_skips} consecutive steps skipped")

    def _action_of_kind(self, kind: str) -> str:
        return self.config.on_nonfinite if kind == "nonfinite" else self.config.on_spike

    def _copy_params(self) -> None:
        groups = [[p for p in g["params"]] for g in self.optimizer.param_groups]
        with torch.no_grad():
            if self._prev_params is None or [len(g) for g in groups] != [len(g) for g in self._prev_params] or any(
                    a.shape != b.shape for ga, gb in zip(groups, self._prev_params) for a, b in zip(ga, gb)):
                self._prev_params = [[p.detach().clone() for p in g] for g in groups]
            else:
                for prev, g in zip(self._prev_params, groups):
                    if prev:
                        torch._foreach_copy_(prev, [p.detach() for p in g])
            self._have_prev = True

    def _opt_post(self, optimizer, args, kwargs):
        step = self.step + 1
        if self._closure_mode and self._pre_done_for != step:
            self.before_optimizer_step(_can_skip=False)  # grads exist now (the closure ran); too late to skip
        self._guard("commit", self._commit, step)
        if self._prev_params is not None and getattr(self, "_have_prev", False):
            self._guard("update_ratio", self._record_update_ratio, step)
        if self._spectrum is not None:
            self._guard("spectral", self._record_spectral, step)
        if self._embedding is not None and step % self.config.spectral_every == 0 and self._enabled("embed_outliers"):
            self._guard("embedding", self._record_embedding, step)
        if self.looped is not None and step % self.config.jacobian_every == 0 and self._enabled("jacobian_norm"):
            self._guard("jacobian", self._record_jacobian, step)
        lr = optimizer.param_groups[0].get("lr")
        if isinstance(lr, (float, int, torch.Tensor)):
            self._buffer.add("lr", step, lr)  # a tensor lr (capturable optimisers) stays on its device
        self.step = step
        self._forwards_since_step = 0
        self._after_step(step)

    def _after_step(self, step: int) -> None:
        """Detect every step on what has reached the host (CPU: everything; CUDA: copies that
        completed, plus a blocking read every sync_every steps). Act at once in one process;
        under torch.distributed only at agreed points (every sync_every steps, every step in
        heightened watch or skip mode), where the ranks reduce their decisions."""
        cadence = step % self.config.sync_every == 0
        self._detect(block=cadence)
        if self.world_size == 1 or cadence or self._watch or self.skip_mode:
            self._sync_point(detect=False)

    # ---- per-step signal bodies -------------------------------------------------------------------
    def _commit(self, step: int) -> None:
        """Move this step's accumulated device values into the buffer (means over micro-batches)."""
        acc, self._acc = self._acc, {}
        for name, values in acc.items():
            value = values[0] if len(values) == 1 else torch.stack([v.to(values[0].device) for v in values]).mean()
            self._buffer.add(name, step, value)

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
                d = torch.stack([n.float() for n in torch._foreach_norm(prev)]).square().sum()
                p = torch.stack([n.float() for n in torch._foreach_norm(params)]).square().sum()
                total_d.append(d)
                total_p.append(p)
                per_group.append((g.get("name", f"g{gi}"), d, p))
            if not total_d:
                return
            ratio = (torch.stack(total_d).sum() / torch.stack(total_p).sum().clamp_min(1e-30)).sqrt()
            self._buffer.add("update_ratio", step, ratio)
            if len(per_group) > 1:
                for name, d, p in per_group:
                    self._buffer.add(f"update_ratio/{name}", step, (d / p.clamp_min(1e-30)).sqrt())

    def _record_spectral(self, step: int) -> None:
        if not (self._enabled("injection_radius") or self._enabled("injection_norm")):
            return
        spec = self._spectrum
        if spec.kind == "additive":
            if step % self.config.spectral_every == 0:
                for k, v in spec.identity_values().items():
                    self._buffer.add(k, step, v)
            return
        values = spec.full() if (step % self.config.spectral_every == 0 and not hasattr(spec.injection, "A_bar")) \
            else spec.cheap()
        for k, v in values.items():
            if self._enabled(k):
                self._buffer.add(k, step, v)

    def _record_embedding(self, step: int) -> None:
        with torch.no_grad():
            w = self._embedding.weight.detach().float()
            rms = w.square().mean().sqrt()
            self._buffer.add("embed_outliers", step, (w.abs() > 6 * rms).float().mean())

    def _record_jacobian(self, step: int) -> None:
        if self._probe_idx is None:
            return
        model = self.looped
        idx = self._probe_idx.to(next(model.parameters()).device)
        with torch.no_grad(), self.pause():
            ctx = model.encode(idx)
            h = model.init_state(ctx, generator=torch.Generator().manual_seed(0))
            for _ in range(max(0, model.config.mean_loops - 1)):
                h = model.step(h, ctx)
        gen = torch.Generator().manual_seed(1)
        # A cold start gets 5× the iterations, so the series does not "grow" as it converges.
        iters = self.config.jacobian_iters * (5 if self._jac_v is None else 1)
        with self.pause():
            sigma, self._jac_v = loop_jacobian_sigma(lambda x: model.step(x, ctx), h, self._jac_v,
                                                     iters=iters, generator=gen)
        self._buffer.add("jacobian_norm", step, sigma)

    # ---- sync, detectors, actions ------------------------------------------------------------------
    def _flush_host(self, block: bool = True) -> None:
        """Move pending device values to the host (see SignalBuffer.flush); detectors run later."""
        values = self._buffer.flush(block=block)
        if not values:
            return
        self._undetected.extend(values)
        latest = {name: v for name, _, v in values}
        for sink in list(self._sinks):
            self._guard_sink(sink, sink.signals, self.step, latest)

    def _detect(self, block: bool = True) -> list[Alert]:
        """Run the detectors on everything read so far; emit the new alerts (actions wait for
        the next decision point). Local to this rank: no collective."""
        self._flush_host(block)
        values, self._undetected = self._undetected, []
        new = (self._guard("detectors", self._run_detectors, values) or []) if values else []
        for alert in new:
            self._emit(alert)
        self._unacted.extend(new)
        return new

    def _sync_point(self, detect: bool = True) -> None:
        """A sync point: the same step on every rank (cadence, watch and skip mode are agreed)."""
        if detect:
            self._detect()
        alerts, self._unacted = self._unacted, []
        self._act(alerts)

    def _run_detectors(self, values: list[tuple[str, int, float]]) -> list[Alert]:
        new: list[Alert] = []
        by_step: dict[int, list[tuple[str, float]]] = {}
        for name, step, v in values:
            by_step.setdefault(step, []).append((name, v))
        ew = self.early_warning
        for step in sorted(by_step):
            for name, v in by_step[step]:
                det = self._nonfinite.get(name)
                if det is None:
                    det = self._nonfinite[name] = NonFiniteDetector(name)
                found = [det.update(step, v)]
                found += [d.update(step, v) for d in self._detectors.get(name, ())]
                if name in STEP_SIGNALS:  # a bad step is bad at every step of a run, not only the first
                    if det.anomalous:
                        self._anomalies.setdefault(step, {})[name] = "nonfinite"
                    elif any(getattr(d, "anomalous", False) for d in self._detectors.get(name, ())):
                        self._anomalies.setdefault(step, {}).setdefault(name, "spike")
                if ew is not None:
                    ew.observe(step, name, v)
                new.extend(a for a in found if a is not None)
            if ew is not None and step > self._ew_evaluated:
                self._ew_evaluated = step
                a = ew.evaluate(step)
                if a is not None:
                    new.append(a)
        for a in new:
            a.detected_step = self.step
        self.alerts.extend(new)
        return new

    def _action_for(self, alert: Alert) -> str:
        c = self.config
        return {"spike": c.on_spike, "nonfinite": c.on_nonfinite, "early_warning": c.on_warning,
                "trend": c.on_trend}.get(alert.kind, "warn")

    def _act(self, new: list[Alert]) -> None:
        level = max((_LEVEL.get(self._action_for(a), 0) for a in new), default=0)
        # A run of bad steps: the detectors alert at its first step only, but a rollback must
        # hold for every bad step (otherwise the second one in a row is applied).
        anomalies, self._anomalies = self._anomalies, {}
        rollback_steps = [s for s, bad in anomalies.items()
                          if any(self._action_of_kind(k) == "rollback" for k in bad.values())]
        if rollback_steps:
            level = max(level, _LEVEL["rollback"])
        if self.optimizer is None and level in (_LEVEL["cut_lr"], _LEVEL["rollback"]):
            level = 0  # nothing to act on without an optimiser
        serious = [a for a in new if a.kind in ("spike", "nonfinite", "early_warning", "trend")]
        watch = 1 if (self.early_warning is not None and self.early_warning.last_score > 0) else 0
        first_bad = min([a.step for a in serious] + list(anomalies), default=self.step + 1)
        # Every rank takes the same decision: the strongest action, heightened watch if any
        # rank is worried, a snapshot only if every rank is clean, the earliest bad step.
        level, watch, dirty, neg_first_bad = agree_max([level, watch, 1 if (serious or anomalies) else 0,
                                                        -first_bad])
        self._update_watch(bool(watch))
        if level == 0:
            if not dirty and self._snapshots is not None:
                self._rollbacks_since_clean = 0
                self._maybe_snapshot()
            return
        action = _ACTION_OF_LEVEL[level]
        mine = [a for a in new if _LEVEL.get(self._action_for(a), 0) == level]
        cause = max(mine, key=lambda a: a.level, default=None)  # None: another rank asked
        if cause is None and rollback_steps and level == _LEVEL["rollback"]:
            bad = anomalies[min(rollback_steps)]
            sig, kind = next(iter(bad.items()))
            signal, why = sig, f"step {min(rollback_steps)}: {kind} on {sig} (the same episode continues)"
        else:
            signal = cause.signal if cause else "remote"
            why = cause.line() if cause else "another rank asked"
        if action == "raise":
            raise InstabilityError(cause or Alert(self.step, "action", "critical", "remote", 0, 0, why))
        if action == "stop":
            self._request_stop(why)
        elif action == "cut_lr":
            scale = cut_learning_rate(self.optimizer, self.config.lr_cut)
            self._act_alert(self.step, signal, f"learning rate cut by {self.config.lr_cut:g} (lr_scale now {scale:.3g})")
        elif action == "rollback":
            self._rollback(-neg_first_bad, signal)

    def _rollback(self, first_bad: int, signal: str) -> None:
        # The loss and gradients of step t are computed with the parameters left by step t − 1,
        # so a spike at t condemns that state too: restore one from step t − 2 or earlier.
        snap = self._snapshots.latest_before(first_bad - 1) if self._snapshots is not None else None
        if snap is None:
            scale = cut_learning_rate(self.optimizer, self.config.rollback_lr_cut)
            self._act_alert(self.step, signal, f"no snapshot to roll back to; learning rate cut (lr_scale {scale:.3g})")
            return
        self._snapshots.restore(snap)
        scale = cut_learning_rate(self.optimizer, self.config.rollback_lr_cut) if self.config.rollback_lr_cut < 1 else \
            self.optimizer.param_groups[0].get("lr_scale", 1.0)
        self.rollbacks.append((self.step, snap.step))
        self._rollbacks_since_clean += 1
        self._act_alert(self.step, signal, f"rolled back to the state after step {snap.step} "
                        f"({snap.nbytes / 2**20:.1f} MiB); lr_scale now {scale:.3g}")
        if self._rollbacks_since_clean >= self.config.max_rollbacks:
            self._request_stop(f"{self._rollbacks_since_clean} rollbacks without recovery")

    def _maybe_snapshot(self) -> None:
        every = self.config.snapshot_every
        if self.step // every > self._last_snapshot_step // every or not len(self._snapshots):
            if self.step > 0:
                self._guard("snapshot", self._snapshots.take, self.step)
                self._last_snapshot_step = self.step

    def _update_watch(self, watch: bool) -> None:
        if watch:
            self._watch, self._quiet_syncs = True, 0
        elif self._watch:
            self._quiet_syncs += 1
            if self._quiet_syncs >= self.config.sync_every:
                self._watch = False

    def _request_stop(self, why: str) -> None:
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_reason = why
            self._act_alert(self.step, "stop", f"stop requested: {why}")

    def _act_alert(self, step: int, signal: str, message: str) -> None:
        alert = Alert(step, "action", "info", signal, 0.0, 0.0, message, detected_step=self.step)
        self.alerts.append(alert)
        self._emit(alert)

    def set_console_writer(self, write) -> None:
        """Send console lines through `write` (e.g. tqdm.write, so a progress bar stays intact)."""
        for sink in self._sinks:
            if isinstance(sink, ConsoleSink):
                sink.write = write

    def _emit(self, alert: Alert) -> None:
        quiet = self._action_for(alert) == "log"  # "log": recorded and written, not printed
        for sink in list(self._sinks):
            if not (quiet and isinstance(sink, ConsoleSink)):
                self._guard_sink(sink, sink.emit, alert)

    def _guard_sink(self, sink: Sink, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:
            self._sinks.remove(sink)
            warnings.warn(f"loopdyn alert sink {type(sink).__name__} disabled after an error: {err!r}",
                          RuntimeWarning, stacklevel=3)

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Detector statistics, alerts, history and warm starts (plain types and tensors:
        loadable with torch.load(weights_only=True))."""
        self._detect()
        return {
            "version": 1,
            "step": self.step,
            "detectors": {name: [d.state_dict() for d in dets] for name, dets in self._detectors.items()},
            "nonfinite": {name: d.state_dict() for name, d in self._nonfinite.items()},
            "early_warning": None if self.early_warning is None else self.early_warning.state_dict(),
            "ew_evaluated": self._ew_evaluated,
            "alerts": [a.to_state() for a in self.alerts],
            "history": self._buffer.state_dict(),
            "spectrum": None if self._spectrum is None else self._spectrum.state_dict(),
            "jacobian_v": self._jac_v,
            "probe_idx": self._probe_idx,
            "watch": self._watch,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            from loopdyn.models.errors import InputError
            raise InputError(f"unknown monitor state version {state.get('version')!r}")
        self.step = int(state["step"])
        for name, states in state["detectors"].items():
            for det, s in zip(self._detectors.get(name, ()), states):
                det.load_state_dict(s)
        self._nonfinite = {}
        for name, s in state["nonfinite"].items():
            det = self._nonfinite[name] = NonFiniteDetector(name)
            det.load_state_dict(s)
        if self.early_warning is not None and state.get("early_warning"):
            self.early_warning.load_state_dict(state["early_warning"])
        self._ew_evaluated = int(state.get("ew_evaluated", self.step))
        self.alerts = [Alert.from_state(a) for a in state["alerts"]]
        self._buffer.load_state_dict(state["history"])
        if self._spectrum is not None and state.get("spectrum"):
            self._spectrum.load_state_dict(state["spectrum"])
        self._jac_v = state.get("jacobian_v")
        self._probe_idx = state.get("probe_idx")
        self._watch = bool(state.get("watch", False))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._pre_done_for = None


def _raise(err: Exception):
    raise err
