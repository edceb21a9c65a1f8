"""Cheap spectral checks for live training, through the LoopedModel protocol.

- The loop's LTI part Ā (`linear_part(model).A`, an `loopdyn.models.operator.Operator`): ‖Ā‖₂
  and ρ(Ā) come from the operator itself (`Operator.norm()`, `Operator.radius()`: closed form
  for identity and diagonal operators, SVD / eigvals for dense ones), so nothing here depends
  on how Ā is structured. Cadence (`InjectionTracker.values`):
    every step      when the parameters live on the CPU and the exact values are cheap (a
                    normal operator, or a dense one up to models.sizes.EVERY_STEP_LIMIT wide);
    every N steps   otherwise (the exact values are host floats: one device sync each), with
                    ‖Ā‖₂ tracked in between by one warm-started power iteration on ĀᵀĀ per
                    step (`Operator.apply` / `apply_adjoint`, a device tensor, no sync).
  Under FSDP2 the operator holds a shard (a DTensor): it is gathered to the full parameter
  first (`DTensor.full_tensor()`, a collective every rank reaches at the same step), so every
  rank sees the same ρ and ‖Ā‖ and takes the same decision.
- The loop Jacobian J = ∂ step(h, ctx)/∂h at a fixed probe input: σ_max(J) by power
  iteration on JᵀJ (matrix-free: 1 J·v + 1 Jᵀ·w per iteration, the products of
  `loopdyn.dynamics.loopmap.Linearisation`), warm-started from the previous call's vector, every
  `jacobian_every` steps. An audit uses Lanczos on the same products
  (`loopdyn.dynamics.loop_jacobian`); a live probe needs only a few warm-started iterations, kept as
  device tensors (no SciPy round trip, no sync).
"""
from __future__ import annotations

import torch

from loopdyn.models.operator import Operator, as_operator
from loopdyn.models.protocol import linear_part
from loopdyn.models.sizes import EVERY_STEP_LIMIT



def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-30)


def full_operator(op: Operator) -> Operator:
    """The operator on the full parameter: a sharded (DTensor) one is gathered (a collective)."""
    stored = getattr(op, "matrix", getattr(op, "diagonal", None))
    if isinstance(stored, torch.Tensor) and hasattr(stored, "full_tensor"):
        return as_operator(stored.full_tensor())
    return op


class InjectionTracker:
    """Tracks ρ(Ā) and ‖Ā‖₂ of a LoopedModel's linear part across steps (warm start inside)."""

    def __init__(self, model, seed: int = 0):
        self.model = model
        self._v: torch.Tensor | None = None  # right singular vector estimate (non-normal Ā)
        self._seed = seed

    def operator(self) -> Operator | None:
        part = linear_part(self.model)
        return None if part is None else full_operator(part.A)

    @property
    def present(self) -> bool:
        return getattr(self.model, "linear_part", None) is not None

    @torch.no_grad()
    def values(self, step: int, every: int, on_host: bool) -> dict:
        """The spectral signals due at `step` (floats when exact, a device tensor when estimated)."""
        A = self.operator()
        if A is None:
            return {}
        cheap = A.normal or A.n_out <= EVERY_STEP_LIMIT
        if step % every == 0 or (cheap and on_host):
            return self.exact(A)
        if A.normal:  # ‖Ā‖ = ρ, both exact at the cadence above
            return {}
        return {"injection_norm": self._norm_step(A, iters=1)}

    @staticmethod
    def exact(A: Operator) -> dict[str, float]:
        norm = A.norm()
        return {"injection_norm": norm, "injection_radius": norm if A.normal else A.radius()}  # ρ = ‖Ā‖ when normal

    def _norm_step(self, A: Operator, iters: int) -> torch.Tensor:
        device, dtype = A.device or torch.device("cpu"), A.dtype or torch.float32
        v = self._v
        if v is None or v.shape[0] != A.n_in or v.device != device:
            g = torch.Generator().manual_seed(self._seed)
            v = _normalise(torch.randn(A.n_in, generator=g).to(device, dtype))
        for _ in range(iters):
            v = _normalise(A.apply_adjoint(A.apply(v)))
        self._v = v
        return A.apply(v).norm()

    def state_dict(self) -> dict:
        return {"v": None if self._v is None else self._v.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self._v = state.get("v")


@torch.no_grad()
def power_radius(A: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """|λ_max| estimate by power iteration on A (the growth rate of ‖Aᵏv‖ over the last steps)."""
    g = torch.Generator().manual_seed(0)
    v = _normalise(torch.randn(A.shape[1], generator=g).to(A.device, A.dtype))
    log_growth = torch.zeros((), device=A.device, dtype=A.dtype)
    tail = max(1, iters // 3)
    for i in range(iters):
        w = A @ v
        n = w.norm().clamp_min(1e-30)
        if i >= iters - tail:
            log_growth = log_growth + n.log()
        v = w / n
    return (log_growth / tail).exp()


def loop_jacobian_sigma(step_fn, h: torch.Tensor, v0: torch.Tensor | None, iters: int = 3,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_max of J = ∂step_fn/∂h at h, by `iters` power iterations on JᵀJ (JVP then VJP).

    Returns (σ estimate as a 0-d tensor, the unit right singular vector estimate to warm-start
    the next call). The map is linearised once (one forward and one backward pass); each
    iteration then costs two backward passes, about two loop steps. The estimate is a lower
    bound that tightens with iterations and warm starts.
    """
    from loopdyn.dynamics.loopmap import Linearisation

    if v0 is None or v0.shape != h.shape:
        v0 = torch.randn(h.shape, generator=generator).to(h.device, h.dtype)
    v = _normalise(v0.to(h.device, h.dtype))
    lin = Linearisation.of(step_fn, h)
    sigma = torch.zeros((), device=h.device, dtype=h.dtype)
    for _ in range(iters):
        u = lin.jvp(v)
        sigma = u.norm()
        v = _normalise(lin.vjp(u))
    return sigma.detach(), v.detach()
