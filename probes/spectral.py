"""Cheap spectral checks for live training (device tensors in, device tensors out, no syncs).

- The injection's Ā (`model.injection.linear_part()` / `A_bar()`):
    diagonal  exact: ρ(Ā) = ‖Ā‖₂ = max |Ā_ii|, from the parameters, every step;
    dense     ‖Ā‖₂ by power iteration on ĀᵀĀ, warm-started from the previous step's vector
              (one iteration per step tracks a slowly moving Ā); ρ(Ā) exactly with
              torch.linalg.eigvals every `spectral_every` steps (d_state ≤ 2048), else by
              a few power iterations on Ā;
    identity  ρ = ‖Ā‖ = 1.
- The loop Jacobian J = ∂ step(h, ctx)/∂h at a fixed probe input: σ_max(J) by power
  iteration on JᵀJ (matrix-free: 1 J·v + 1 Jᵀ·w per iteration, the products of
  `loopdyn.dynamics.loopmap.Linearisation`), warm-started from the previous call's vector, every
  `jacobian_every` steps. An audit uses Lanczos on the same products
  (`loopdyn.dynamics.loop_jacobian`); a live probe needs only a few warm-started iterations, kept as
  device tensors (no SciPy round trip, no sync).
"""
from __future__ import annotations

import torch

EIG_MAX_DIM = 2048  # dense eigvals up to this width; power iteration above
# Exact ρ of a dense Ā every step up to this width: eigvals costs ~1 ms at 64 (under 1 % of a
# CPU training step of a model that narrow) but ~15-30 ms at 256, so wider ones get it every
# `spectral_every` steps and the per-step ‖Ā‖₂ in between.
EIG_EVERY_STEP_MAX = 96


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-30)


class InjectionSpectrum:
    """Tracks ρ(Ā) and ‖Ā‖₂ of `model.injection` across steps (warm-started state inside)."""

    def __init__(self, injection, seed: int = 0):
        self.injection = injection
        self.kind = getattr(injection, "kind", None)
        self._v: torch.Tensor | None = None  # right singular vector estimate (dense)
        self._seed = seed

    @property
    def guaranteed_stable(self) -> bool:
        """Diagonal (ρ < 1 by construction) and additive (ρ = 1 exactly): ρ cannot cross 1."""
        return self.kind in ("diagonal", "additive")

    @torch.no_grad()
    def cheap(self) -> dict[str, torch.Tensor]:
        """Per-step values: ‖Ā‖₂, and ρ(Ā) when that is cheap (diagonal; dense up to EIG_EVERY_STEP_MAX)."""
        inj = self.injection
        if hasattr(inj, "A_bar"):
            a = inj.A_bar().detach().abs().max()
            return {"injection_norm": a, "injection_radius": a}
        A = self._dense()
        if A is None:
            return {}
        if A.shape[0] <= EIG_EVERY_STEP_MAX:
            return self.full()
        return {"injection_norm": self._norm_step(A, iters=1)}

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """Every `spectral_every` steps: exact ρ for dense Ā (eigvals), and the norm."""
        A = self._dense()
        if A is None:
            return {}
        if A.shape[0] <= EIG_MAX_DIM:
            rho = torch.linalg.eigvals(A.float()).abs().max().to(A.dtype)
        else:
            rho = power_radius(A, iters=30)
        return {"injection_radius": rho, "injection_norm": self._norm_step(A, iters=3)}

    def _dense(self) -> torch.Tensor | None:
        A, _ = self.injection.linear_part()
        if A.kind == "identity":
            return None
        return A.values if A.kind == "dense" else torch.diag(A.values)

    def identity_values(self) -> dict[str, float]:
        return {"injection_norm": 1.0, "injection_radius": 1.0}

    def _norm_step(self, A: torch.Tensor, iters: int) -> torch.Tensor:
        v = self._v
        if v is None or v.shape[0] != A.shape[1] or v.device != A.device:
            g = torch.Generator().manual_seed(self._seed)
            v = _normalise(torch.randn(A.shape[1], generator=g).to(A.device, A.dtype))
        for _ in range(iters):
            v = _normalise(A.T @ (A @ v))
        self._v = v
        return (A @ v).norm()

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
