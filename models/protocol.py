"""The LoopedModel protocol: what every analysis and probe in loopdyn needs from a looped model.

A looped LM is read as a discrete-time dynamical system on the state h (docs/design.md §3):

    ctx     = encode(idx)          everything fixed during the loop (prelude output e, positions, …)
    h_0     = init_state(ctx)      (B, S, ds)
    h_{t+1} = step(h_t, ctx)       one loop iteration; F(h) = step(h, ctx) is the map dynamics
                                   linearises, so it must be a pure, differentiable function of h
    logits  = decode(h_T, ctx)     (B, S, V)
    mean_loops                     the depth the model was trained at (μ_rec), an int ≥ 1

Required members (checked structurally by `isinstance(model, LoopedModel)`, and behaviourally
by `validate(model, idx)`): `encode`, `init_state`, `step`, `decode`, `mean_loops`.

Optional members; an analysis that needs a missing one says what it skipped and why:

* `linear_part()` → `LinearPart(A, B, bias)`: the affine part of the step's input map
  u = Ā h + B̄ e (+ b), with Ā, B̄ as structured `loopdyn.models.operator.Operator`s
  (identity, diagonal or dense). Absent for a loop with no injection (autonomous, Ouro-style).
* `sublayers(ctx)` → a list of `Sublayer(name, fn, kind)` whose composition is the step:
  starting from x = h, kind "injection" sets x = fn(x) (the map h ↦ u), "residual" sets
  x = x + fn(x) (a pre-norm block's branch), "map" sets x = fn(x) (anything else, e.g. a
  sandwich block with its output norm, or a state renormalisation). Used by the gain graph.
* `state_norm_kind`: "none" | "pre" | "post": is the state renormalised inside the step
  ("post": h_{t+1} = Norm(·), e.g. Ouro's final norm in the loop, Huginn's last sandwich norm,
  loopdyn's autonomous loop; "pre": the step normalises its input before anything else uses
  it). Then ‖h_t‖ cannot explode and the audit looks through the norm.
* `pre_norm_state(h, ctx)` → the state before the step's final renormalisation (for "post").
* `renormalise(r, ctx)` → that renormalisation, step(h, ctx) = renormalise(pre_norm_state(h, ctx),
  ctx): with both, the audit reads r_{t+1} off its own linearised steps instead of a second pass.
* `exit_gate(h, ctx)` → per-token exit probabilities (B, S) in [0, 1] at state h (Ouro).
* `readout_part()` → the Operator C that reads the state out to the decoder (gain graph).
* `state_tap`: an `nn.Module` called with h_0 and every new state during the model's own
  forward pass; live monitors hook it to read per-loop state norms at no extra cost.
* `name`, `injection_name`, `checkpoint_format`: labels for reports; `vocab_size`, `max_seq_len`: the token ids and
  sequence length a probe batch may use.

`LoopedLM` implements all of these; `LoopAdapter` builds a LoopedModel from plain callables.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

from loopdyn.models.errors import InputError
from loopdyn.models.operator import IdentityOperator, Operator, as_operator
from loopdyn.models.sizes import count_params
from loopdyn.models.weights import all_finite

STATE_NORM_KINDS = ("none", "pre", "post")
SUBLAYER_KINDS = ("injection", "residual", "map")


class ProtocolError(InputError):
    """A model that does not satisfy the LoopedModel protocol; the message names the member."""


@runtime_checkable
class LoopedModel(Protocol):
    """See the module docstring for the maths each member must satisfy."""

    mean_loops: int

    def encode(self, idx: torch.Tensor) -> Any: ...

    def init_state(self, ctx: Any) -> torch.Tensor: ...

    def step(self, h: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    def decode(self, h: torch.Tensor, ctx: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class LinearPart:
    """The affine input map of the step, u = Ā h + B̄ e + bias, detached from autograd."""

    A: Operator
    B: Operator
    bias: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.A, self.B))


@dataclass(frozen=True)
class Sublayer:
    """One stage of the step (see `sublayers` in the module docstring)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    kind: str = "residual"  # "injection" | "residual" | "map"


# ---- reading optional members ------------------------------------------------------------------

def linear_part(model) -> LinearPart | None:
    """The model's LTI part, or None when it has none (no `linear_part`, or it returns None)."""
    fn = getattr(model, "linear_part", None)
    return None if fn is None else _as_linear_part(fn())


def pre_norm_split(model):
    """(pre_norm_state, renormalise) when the model renormalises its state inside the step and
    has both (step = renormalise ∘ pre_norm_state), else None."""
    pre, ren = getattr(model, "pre_norm_state", None), getattr(model, "renormalise", None)
    if state_norm_kind(model) == "none" or not (callable(pre) and callable(ren)):
        return None
    return pre, ren


def state_norm_kind(model) -> str:
    kind = getattr(model, "state_norm_kind", "none") or "none"
    if kind not in STATE_NORM_KINDS:
        raise ProtocolError(f"LoopedModel.state_norm_kind must be one of {STATE_NORM_KINDS}, got {kind!r}")
    return kind


def model_name(model) -> str:
    name = getattr(model, "name", None)
    if isinstance(name, str) and name:
        return name
    config = getattr(model, "config", None)
    return getattr(config, "name", None) or type(model).__name__


def injection_name(model) -> str:
    """A label for the loop's input map: the model's own `injection_name`, else the structure of Ā."""
    name = getattr(model, "injection_name", None)
    if isinstance(name, str) and name:
        return name
    part = linear_part(model)
    return "none (autonomous)" if part is None else f"{part.A.kind} Ā"


def num_params(model) -> int:
    """Unique parameters (tied weights once); 0 for a model that holds none."""
    fn = getattr(model, "num_params", None)
    if callable(fn):
        return int(fn())
    params = getattr(model, "parameters", None)
    if not callable(params):
        return 0
    return count_params(params())


def initial_state(model, ctx, seed: int = 0) -> torch.Tensor:
    """h_0 drawn deterministically: `init_state(ctx, generator=…)` when the model accepts a
    generator (an analysis never consumes a training run's global random stream), else
    `init_state(ctx)` under a forked, seeded global RNG."""
    fn = model.init_state
    if _takes_generator(fn):
        return fn(ctx, generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(ctx)


def token_limits(model) -> tuple[int | None, int | None]:
    """(vocabulary size, longest sequence) from the optional members `vocab_size` and
    `max_seq_len` (None when the model does not say)."""
    def as_int(x):
        return int(x) if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None
    return as_int(getattr(model, "vocab_size", None)), as_int(getattr(model, "max_seq_len", None))


def config_field(field: str, doc: str = "") -> property:
    """A read-only protocol member that reads `self.config.<field>` (the models' configs name the
    same facts differently: mean_loops / mean_recurrence / total_ut_steps, block_size /
    max_position_embeddings)."""
    return property(lambda self: getattr(self.config, field), doc=doc or f"config.{field}")


def _takes_generator(fn) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def is_looped(model) -> bool:
    if not isinstance(model, LoopedModel):
        return False
    T = getattr(model, "mean_loops", 0)
    return isinstance(T, int) and not isinstance(T, bool) and T >= 1


def find_looped_model(obj, max_depth: int = 4):
    """The LoopedModel inside `obj`: obj itself, or a submodule (a LightningModule's model, a
    DDP/FSDP wrapper's `.module`, a Hugging Face wrapper's child), found breadth-first."""
    if is_looped(obj):
        return obj
    if isinstance(obj, nn.Module):
        for _, m in obj.named_modules():
            if m is not obj and is_looped(m):
                return m
    for attr in ("module", "model", "_orig_mod"):
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj and max_depth > 0:
            found = find_looped_model(inner, max_depth - 1)
            if found is not None:
                return found
    return None


def require_looped(model) -> None:
    """Raise a one-line ProtocolError unless `model` is a LoopedModel with a loop."""
    if not isinstance(model, LoopedModel):
        missing = [m for m in ("encode", "init_state", "step", "decode", "mean_loops") if not hasattr(model, m)]
        raise ProtocolError(f"model '{model_name(model)}' is not a LoopedModel: missing "
                            f"{', '.join(missing)} (wrap it with loopdyn.models.LoopAdapter)")
    if not is_looped(model):
        raise ProtocolError(f"model '{model_name(model)}' has no loop (mean_loops = "
                            f"{getattr(model, 'mean_loops', None)!r}; a fixed-depth model has nothing to analyse)")


def _state_of(ctx) -> torch.Tensor | None:
    if isinstance(ctx, torch.Tensor):
        return ctx
    if isinstance(ctx, dict):
        return ctx.get("e")
    return getattr(ctx, "e", None)


def validate(model, idx: torch.Tensor) -> None:
    """Check the protocol on a real input, raising a ProtocolError naming the member at fault:
    signatures, shapes (step keeps h's shape, decode gives (B, S, V)), finiteness of h_0, and
    purity of step in h (two calls on the same h give the same result)."""
    require_looped(model)
    with torch.no_grad():
        try:
            ctx = model.encode(idx)
        except (TypeError, AttributeError) as err:
            raise ProtocolError(f"LoopedModel.encode(idx) failed: {err}") from None
        try:
            h0 = initial_state(model, ctx)
        except TypeError as err:
            raise ProtocolError(f"LoopedModel.init_state(ctx) failed: {err}") from None
        if not isinstance(h0, torch.Tensor) or not h0.is_floating_point():
            raise ProtocolError(f"LoopedModel.init_state must return a floating-point tensor, got {type(h0).__name__}")
        try:
            h1 = model.step(h0, ctx)
        except TypeError as err:
            raise ProtocolError(f"LoopedModel.step(h, ctx) has the wrong signature: {err}") from None
        if not isinstance(h1, torch.Tensor):
            raise ProtocolError(f"LoopedModel.step must return a tensor, got {type(h1).__name__}")
        if h1.shape != h0.shape:
            raise ProtocolError(f"LoopedModel.step must keep the state's shape: h has {tuple(h0.shape)}, "
                                f"step(h) has {tuple(h1.shape)}")
        probe = h1 if all_finite(h1) else h0
        a, b = model.step(probe, ctx), model.step(probe, ctx)
        scale = float(a.abs().max()) if a.numel() else 0.0
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(scale, 1.0), equal_nan=True):
            raise ProtocolError("LoopedModel.step is not a pure function of h: two calls on the same h "
                                "differ (random numbers drawn each call? dropout in train mode?)")
        try:
            logits = model.decode(h1, ctx)
        except TypeError as err:
            raise ProtocolError(f"LoopedModel.decode(h, ctx) failed: {err}") from None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(idx.shape):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ProtocolError(f"LoopedModel.decode must return logits of shape (batch, sequence, vocab) = "
                                f"({idx.shape[0]}, {idx.shape[1]}, V), got {shape}")
        part = linear_part(model)
        if part is not None and part.A.shape != (h0.shape[-1], h0.shape[-1]):
            raise ProtocolError(f"LoopedModel.linear_part: Ā has shape {part.A.shape}, the state has "
                                f"{h0.shape[-1]} channels")
        state_norm_kind(model)


# ---- the adapter -------------------------------------------------------------------------------

class LoopAdapter(nn.Module):
    """A LoopedModel from plain callables (no subclassing):

        model = LoopAdapter(encode=lambda idx: net.embed(idx),          # ctx (here: e itself)
                            step=lambda h, e: net.core(h, e),          # h_{t+1}
                            decode=lambda h, e: net.head(h),           # logits
                            mean_loops=8, module=net)                  # owns the parameters

    init_state defaults to zeros shaped like the context's `e` (ctx itself when it is a tensor).
    linear_part may be a callable returning `LinearPart` or (Ā, B̄[, bias]) with each an Operator,
    a 1-D tensor (diagonal) or a 2-D tensor (dense). `module` is registered as a child, so
    `parameters()`, `train()`/`eval()` and hooks reach the user's network.
    """

    def __init__(self, *, encode: Callable, step: Callable, decode: Callable, mean_loops: int,
                 init_state: Callable | None = None, linear_part: Callable | None = None,
                 sublayers: Callable | None = None, state_norm_kind: str = "none",
                 pre_norm_state: Callable | None = None, renormalise: Callable | None = None,
                 exit_gate: Callable | None = None,
                 module: nn.Module | None = None, state_tap: nn.Module | None = None,
                 name: str | None = None, injection_name: str | None = None):
        super().__init__()
        for member, fn in (("encode", encode), ("step", step), ("decode", decode)):
            if not callable(fn):
                raise ProtocolError(f"LoopAdapter: {member} must be callable, got {type(fn).__name__}")
        if isinstance(mean_loops, bool) or not isinstance(mean_loops, int) or mean_loops < 1:
            raise ProtocolError(f"LoopAdapter: mean_loops must be an integer ≥ 1, got {mean_loops!r}")
        if state_norm_kind not in STATE_NORM_KINDS:
            raise ProtocolError(f"LoopAdapter: state_norm_kind must be one of {STATE_NORM_KINDS}, got {state_norm_kind!r}")
        self.module = module
        self._encode, self._step, self._decode, self._init = encode, step, decode, init_state
        self.mean_loops = mean_loops
        self.state_norm_kind = state_norm_kind
        self.name = name or (type(module).__name__ if module is not None else "LoopAdapter")
        if injection_name:
            self.injection_name = injection_name
        # optional members exist only when given, so hasattr() tells an analysis what it can use
        if linear_part is not None:
            self.linear_part = lambda: _as_linear_part(linear_part())
        if sublayers is not None:
            self.sublayers = sublayers
        if pre_norm_state is not None:
            self.pre_norm_state = pre_norm_state
        if renormalise is not None:
            self.renormalise = renormalise
        if exit_gate is not None:
            self.exit_gate = exit_gate
        if state_tap is not None:
            self.state_tap = state_tap

    @classmethod
    def from_module(cls, module: nn.Module, *, embed: str | Callable = "embed", core: str | Callable = "core",
                    head: str | Callable = "head", mean_loops: int | None = None,
                    linear_part: Callable | None = None, **kwargs) -> "LoopAdapter":
        """The common shape: `module.embed(idx) -> e`, `module.core(h, e) -> h_next` applied T
        times from h_0 = 0, `module.head(h) -> logits`. Names may be attribute names or callables;
        mean_loops defaults to `module.n_loops` / `module.mean_loops` when present. When `core`
        names an nn.Module it becomes the `state_tap` (its output is every new state)."""
        def resolve(ref, what):
            fn = getattr(module, ref, None) if isinstance(ref, str) else ref
            if not callable(fn):
                raise ProtocolError(f"LoopAdapter.from_module: {type(module).__name__} has no callable "
                                    f"{ref!r} for {what}")
            return fn

        embed_fn, core_fn, head_fn = resolve(embed, "embed"), resolve(core, "core"), resolve(head, "head")
        if mean_loops is None:
            mean_loops = getattr(module, "mean_loops", None) or getattr(module, "n_loops", None)
        if "state_tap" not in kwargs and isinstance(core_fn, nn.Module):
            kwargs["state_tap"] = core_fn
        return cls(encode=embed_fn, step=lambda h, e: core_fn(h, e), decode=lambda h, e: head_fn(h),
                   mean_loops=mean_loops, linear_part=linear_part, module=module, **kwargs)

    def encode(self, idx):
        return self._encode(idx)

    def init_state(self, ctx, generator: torch.Generator | None = None):
        if self._init is not None:
            fn = self._init
            if generator is None:
                return fn(ctx)
            if _takes_generator(fn):
                return fn(ctx, generator=generator)
            with torch.random.fork_rng(devices=[]):  # a draw from the global RNG, seeded, then put back
                torch.manual_seed(generator.initial_seed())
                return fn(ctx)
        e = _state_of(ctx)
        if e is None:
            raise ProtocolError("LoopAdapter: no init_state given and the context has no tensor 'e' to shape "
                                "a zero state after")
        return torch.zeros_like(e)

    def step(self, h, ctx):
        return self._step(h, ctx)

    def decode(self, h, ctx):
        return self._decode(h, ctx)

    def forward(self, idx, n_loops: int | None = None):
        """Logits after n_loops (default mean_loops) steps."""
        ctx = self.encode(idx)
        h = self.init_state(ctx)
        for _ in range(self.mean_loops if n_loops is None else n_loops):
            h = self.step(h, ctx)
        return self.decode(h, ctx)


def _as_linear_part(part) -> LinearPart | None:
    if part is None or isinstance(part, LinearPart):
        return part
    A, B, *rest = part
    A = as_operator(A)
    return LinearPart(A, as_operator(B, A.n_out), rest[0] if rest else None)


__all__ = ["LoopedModel", "LoopAdapter", "LinearPart", "Sublayer", "ProtocolError", "validate",
           "linear_part", "state_norm_kind", "initial_state", "find_looped_model", "require_looped",
           "is_looped", "model_name", "injection_name", "num_params", "IdentityOperator",
           "STATE_NORM_KINDS", "SUBLAYER_KINDS"]
