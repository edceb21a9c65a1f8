"""The loop map F(h) = model.step(h, ctx) as dynamics sees it, and the cost bookkeeping.

Everything in dynamics differentiates F through `Linearisation` (J·v and Jᵀ·w from one
recorded graph, batched over several vectors with vmapped backward passes). Details:

* PyTorch's fused CPU attention kernel has neither a forward-mode nor a double-backward
  derivative, so linearisations run with the "math" scaled-dot-product backend (the same
  function, evaluated with plain matmul + softmax; it agrees with the fused kernel to
  float32 round-off).
* Training monitors watch the model through forward hooks (`model.state_tap`, attention,
  the head). Analysis states (and batched or graph-carrying tensors) must never reach those
  hooks: every evaluation runs inside `loopdyn.models.hooks.silenced(model)`.
* Gradients are taken with respect to h only (`torch.autograd.grad` with explicit inputs):
  parameters' `.grad` are never touched, so an analysis can run in the middle of training.

`Cost` counts the work in units that can be converted to forward passes: loop steps
(plain evaluations of F), linearisations (one recorded forward + backward pass per state),
Jacobian-vector products J·v and vector-Jacobian products Jᵀ·w (about one step each).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from loopdyn.models import protocol
from loopdyn.models.errors import InputError
from loopdyn.models.hooks import silenced
from loopdyn.models.weights import nonfinite_parameters  # noqa: F401 - re-exported for the dynamics modules

MAX_LOOPS = 1000  # the most loops any analysis or command runs or measures (larger values are refused as a typo)
MAX_HORIZON = 10000  # forecast horizon an audit accepts

try:  # torch ≥ 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward_mode_attention():
        return sdpa_kernel(SDPBackend.MATH)
except ImportError:  # pragma: no cover - older torch
    def forward_mode_attention():
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)


class DynamicsError(InputError):
    """A model or input that the dynamics analysis cannot work with (e.g. a model without a loop)."""


@dataclass
class Cost:
    """Work done by an analysis, counted per call of the loop map F.

    steps: plain evaluations F(h); linearisations: recorded forward + backward passes (one per
    state at which J is needed; each also yields F(h)); jvps / vjps: products J·v / Jᵀ·w (each
    vector of a batch counts once); sublayer_*: the same for the gain graph's single
    sublayers, which cost a fraction of a step.
    """

    steps: int = 0
    jvps: int = 0
    vjps: int = 0
    linearisations: int = 0
    sublayer_linearisations: int = 0
    sublayer_jvps: int = 0
    sublayer_vjps: int = 0

    FIELDS = ("steps", "linearisations", "jvps", "vjps", "sublayer_linearisations", "sublayer_jvps",
              "sublayer_vjps")

    def add(self, other: "Cost") -> "Cost":
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def step_equivalents(self, linearisation: float = 2.5, product: float = 1.1, sublayer: float = 0.5) -> float:
        """A rough size in loop steps (defaults measured on CPU; bench/audit_cost.py measures them)."""
        main = self.steps + linearisation * self.linearisations + product * (self.jvps + self.vjps)
        sub = linearisation * self.sublayer_linearisations + product * (self.sublayer_jvps + self.sublayer_vjps)
        return main + sublayer * sub

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


def require_loop(model) -> None:
    """Raise a one-line DynamicsError unless `model` is a LoopedModel with a loop (protocol.py)."""
    try:
        protocol.require_looped(model)
    except protocol.ProtocolError as err:
        raise DynamicsError(str(err)) from None


@contextlib.contextmanager
def frozen_weights(model) -> Iterator[None]:
    """The parameters of `model` record no gradient for the duration. A linearisation
    differentiates with respect to the state only; a weight that requires grad would make
    every backward through a custom autograd Function (the fast path's oneDNN linear, which
    cannot tell which of its inputs one particular backward needs) also compute the weight's
    gradient: one wasted product per layer, per product (measured: J·v and Jᵀ·w cost 2 loop
    steps each instead of ~1)."""
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def analysis(model) -> Iterator[None]:
    """No parameter graph, no monitor hooks."""
    with torch.no_grad(), silenced(model):
        yield


def step_fn(model, ctx) -> Callable[[torch.Tensor], torch.Tensor]:
    """F(h) = model.step(h, ctx), a pure function of h."""
    return lambda h: model.step(h, ctx)


class Linearisation:
    """A map linearised at x: f(x), J·v and Jᵀ·w from one recorded graph.

    `Linearisation(model, ctx, h)` linearises the loop step F(h) = model.step(h, ctx);
    `Linearisation.of(fn, x, model=...)` any other function (the gain graph's sublayers).

    Reverse mode: Jᵀw = ∂⟨f(x), w⟩/∂x, a backward pass through the recorded forward pass.
    Forward mode by reverse-over-reverse: g(u) = Jᵀu is linear in u and recorded once (with
    create_graph), then J·v = ∂⟨g(u), v⟩/∂u is one more backward pass. In PyTorch 2.x on the
    CPU this costs about one loop step per product, several times less than `torch.func.jvp`
    (whose forward-mode rules fall back to slow paths whenever a dual tensor meets a constant:
    the weights, the RoPE table, e). `forward_jvp` keeps the torch.func route for cross-checks.
    Both products equal the exact derivative to float32 round-off.

    Setting up records one forward pass and one backward pass (counted as a linearisation).
    That backward pass is the recording of g(u) at some u; `w0` (a vector shaped like f(x), or a
    function of f(x)'s shape that returns one) chooses that u, so `vjp0` = Jᵀ·w0 comes with the
    setup, at no extra cost (else u = 0 and vjp0 is None): `jacobian.norm_lower_bound` starts
    its Golub–Kahan run there. The graph is freed when the object is dropped.
    """

    def __init__(self, model, ctx, h: torch.Tensor, cost: Cost | None = None, batched: bool | None = None,
                 fn: Callable[[torch.Tensor], torch.Tensor] | None = None, sublayer: bool = False,
                 w0: torch.Tensor | Callable[[torch.Size], torch.Tensor] | None = None):
        self.model, self.ctx = model, ctx
        self.cost = cost if cost is not None else Cost()
        self.sublayer = sublayer
        self.h = h.detach()
        # vmapped backward passes pay off for small states only (large ones are matmul-bound)
        self.batched = self.h.numel() <= 65536 if batched is None else batched
        f = fn if fn is not None else step_fn(model, ctx)
        with torch.enable_grad(), silenced(model), frozen_weights(model), forward_mode_attention():
            self._x = self.h.clone().requires_grad_(True)
            self._y = f(self._x)
            # g(u) = Jᵀu is linear in u: its recorded graph, hence every J·v, is the same for any u
            if callable(w0):
                w0 = w0(self._y.shape)
            if w0 is None:
                u = torch.zeros_like(self._y)
            else:
                u = w0.to(self._y.device, self._y.dtype).reshape(self._y.shape).clone()
            self._u = u.requires_grad_(True)
            (self._g,) = torch.autograd.grad(self._y, self._x, self._u, create_graph=True)
        self.output = self._y.detach()
        self.w0 = w0
        self.vjp0 = None if w0 is None else self._g.detach()
        self._count("linearisations", 1)

    @classmethod
    def of(cls, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, model=None,
           cost: Cost | None = None, w0=None) -> "Linearisation":
        """Linearise fn at x (counted as sublayer work)."""
        return cls(model, None, x, cost, fn=fn, sublayer=True, w0=w0)

    def _count(self, name: str, n: int) -> None:
        name = f"sublayer_{name}" if self.sublayer else name
        setattr(self.cost, name, getattr(self.cost, name) + n)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J·v for v shaped like x."""
        (out,) = torch.autograd.grad(self._g, self._u, v.to(self.h.device, self.h.dtype), retain_graph=True)
        self._count("jvps", 1)
        return out

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        """Jᵀ·w for w shaped like f(x)."""
        (out,) = torch.autograd.grad(self._y, self._x, w.to(self.h.device, self.h.dtype), retain_graph=True)
        self._count("vjps", 1)
        return out

    def jvp_batch(self, V: torch.Tensor) -> torch.Tensor:
        """[J·V[i]] for V of shape (k, *x.shape)."""
        V = V.to(self.h.device, self.h.dtype)
        if self.batched and V.shape[0] > 1:
            (out,) = torch.autograd.grad(self._g, self._u, V, retain_graph=True, is_grads_batched=True)
            self._count("jvps", V.shape[0])
            return out
        return torch.stack([self.jvp(v) for v in V])

    def vjp_batch(self, W: torch.Tensor) -> torch.Tensor:
        W = W.to(self.h.device, self.h.dtype)
        if self.batched and W.shape[0] > 1:
            (out,) = torch.autograd.grad(self._y, self._x, W, retain_graph=True, is_grads_batched=True)
            self._count("vjps", W.shape[0])
            return out
        return torch.stack([self.vjp(w) for w in W])


def forward_jvp(model, ctx, h: torch.Tensor, v: torch.Tensor):
    """(F(h), J·v) by forward-mode AD (torch.func.jvp); slower, kept as an independent route."""
    with torch.no_grad(), silenced(model), forward_mode_attention():
        return torch.func.jvp(step_fn(model, ctx), (h,), (v.to(h.dtype),))
