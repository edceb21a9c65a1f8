"""The monitor's own eager probe pass: activation signals measured outside the training graph.

Through the `LoopedModel` protocol only (encode → init_state → step × T → decode), on the
first `loop_batch` sequences of the last batch, every `loop_every` steps, under
`torch.no_grad()` and `torch.compiler.set_stance("force_eager")` — so a model (or a module in
it) compiled with `torch.compile` runs eagerly here: no graph is traced, no guard changes and
nothing is recompiled. Nothing is attached to the model's modules; the attention logits are
read by a global forward pre-hook that exists only for the duration of the pass (when no
compiled code runs) and records only the modules that offer `max_logit`.

    signal          from the pass (B' = loop_batch sequences, T = mean_loops)
    state_norm      mean over B'·S of ‖h_T‖₂
    state_norm_max  the largest per-loop mean ‖h_t‖₂, t = 1…T
    rel_residual    mean ‖h_T − h_{T−1}‖₂ / mean ‖h_T‖₂
    state_growth    mean ‖h_T‖ / mean ‖h_{T−1}‖
    logz            mean over tokens of log Σ exp(decode(h_T)) (when `with_logz`)
    attn_logit_max  largest causal pre-softmax logit of the last loop's attention calls
                    (when `with_attention`)
    jacobian_norm   σ_max of ∂step/∂h at h_{T−1} on a fixed probe input (`jacobian`):
                    warm-started power iteration, see loopdyn.probes.spectral

In the hook mode (an eager model with a `state_tap`) the first four come every step from the
model's own forward instead; this pass serves tap-less loops and compiled models.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from loopdyn.dynamics.numbers import mean_token_norm
from loopdyn.models.protocol import initial_state
from loopdyn.probes.spectral import loop_jacobian_sigma


def mean_norm(h: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of ‖h‖₂ along the last dimension (a 0-d float32 tensor, no sync)."""
    return mean_token_norm(h, torch.float32)


def loop_values(states: list[torch.Tensor], norms: list[torch.Tensor], final=None, prev=None) -> dict:
    """The loop signals from the states of one unroll (the last ones; norms of all)."""
    out = {}
    final = states[-1] if final is None and states else final
    if prev is None and len(states) >= 2:
        prev = states[-2]
    if final is None:
        return out
    fnorm = mean_norm(final)
    out["state_norm"] = fnorm
    if prev is not None:
        resid = torch.linalg.vector_norm((final.detach() - prev.detach()).float(), dim=-1).mean()
        out["rel_residual"] = resid / fnorm.clamp_min(1e-30)
    if norms:
        out["state_norm_max"] = torch.stack(norms).max()
    if prev is not None:  # mean ‖h_T‖ / mean ‖h_{T−1}‖: the per-loop growth at the trained depth
        out["state_growth"] = fnorm / mean_norm(prev).clamp_min(1e-30)
    return out


def eager():
    """A context in which torch.compile'd code runs eagerly (torch ≥ 2.6: set_stance)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` (itself included) that torch.compile wraps (OptimizedModule) or
    compiled in place (`module.compile()`)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - a torch without dynamo
        return []
    return [m for m in model.modules()
            if isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (`fully_shard`) modules of `model`, outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unwrap_compiled(module):
    """The module a torch.compile wrapper (OptimizedModule) runs, or module itself."""
    inner = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else module


class ProbePass:
    """Runs the pass for a SignalBus (see the module docstring); all values are device tensors."""

    def __init__(self, loop, attention_modules: list[nn.Module], device: Callable[[], torch.device],
                 sharded: list[nn.Module] = ()):
        self.loop = loop
        self.attention = attention_modules
        self.device = device  # where the model's parameters are now
        self.sharded = list(sharded)  # FSDP2 modules: gathered for the pass (a collective per module)
        self.jac_v: torch.Tensor | None = None  # the Jacobian's warm start

    @contextlib.contextmanager
    def _gathered(self):
        """FSDP2: the full parameters while the pass runs (`unshard()`, every rank at the same
        step, as the cadence is the same on every rank), sharded again after."""
        for m in self.sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in self.sharded:
                m.reshard()

    def _unroll(self, idx: torch.Tensor, loops: int) -> tuple[list[torch.Tensor], Any]:
        """States h_0 … h_loops of the protocol's loop (no grad, deterministic h_0)."""
        loop = self.loop
        ctx = loop.encode(idx.to(self.device()))
        states = [initial_state(loop, ctx, seed=0)]
        for _ in range(loops):
            states.append(loop.step(states[-1], ctx))
        return states, ctx

    @contextlib.contextmanager
    def _capture_attention(self, on: bool):
        """Records each attention module's last call (args, kwargs) while the pass runs."""
        calls: dict[nn.Module, tuple] = {}
        if not on or not self.attention:
            yield calls
            return
        wanted = {id(m) for m in self.attention}

        def pre(module, args):  # a global hook sees positional arguments only (how loopdyn's blocks call)
            if id(module) in wanted:
                calls[module] = (args, {})

        handle = nn.modules.module.register_module_forward_pre_hook(pre)
        try:
            yield calls
        finally:
            handle.remove()

    def run(self, idx: torch.Tensor, *, with_logz: bool, with_attention: bool) -> dict:
        """The loop signals (and log Z, attention logits) on the sequences `idx` (B', S)."""
        with torch.no_grad(), eager(), self._gathered(), self._capture_attention(with_attention) as calls:
            states, ctx = self._unroll(idx, self.loop.mean_loops)
            logits = self.loop.decode(states[-1], ctx) if with_logz else None
        with torch.no_grad():
            values = loop_values(states[1:], [mean_norm(h) for h in states[1:]], states[-1], states[-2])
            if isinstance(logits, torch.Tensor):
                values["logz"] = torch.logsumexp(logits.detach().float(), dim=-1).mean()
            attn = max_attention_logit(calls, n=None)
            if attn is not None:
                values["attn_logit_max"] = attn
        return values

    def jacobian(self, idx: torch.Tensor, iters: int) -> torch.Tensor:
        """σ_max of the loop Jacobian at h_{T−1} of the fixed probe input (warm-started)."""
        loop = self.loop
        with eager(), self._gathered():
            with torch.no_grad():
                states, ctx = self._unroll(idx, max(0, loop.mean_loops - 1))
            gen = torch.Generator().manual_seed(1)
            # A cold start gets 5× the iterations, so the series does not "grow" as it converges.
            sigma, self.jac_v = loop_jacobian_sigma(lambda x: loop.step(x, ctx), states[-1], self.jac_v,
                                                    iters=iters * (5 if self.jac_v is None else 1), generator=gen)
        return sigma


def max_attention_logit(calls: dict, n: int | None) -> torch.Tensor | None:
    """The largest logit over the recorded attention calls; `n`: first sequences only."""
    def first(t):
        return t[:n] if n is not None and isinstance(t, torch.Tensor) else t

    values = []
    with torch.no_grad():
        for module, (args, kwargs) in calls.items():
            # max_logit(a, rope, ve): a and ve are per sequence, rope per position
            args = [first(t) if i in (0, 2) else t for i, t in enumerate(args)]
            kwargs = {k: first(t) if k == "ve" else t for k, t in kwargs.items()}
            values.append(module.max_logit(*args, **kwargs).detach().float().reshape(()))
    return torch.stack(values).max() if values else None
