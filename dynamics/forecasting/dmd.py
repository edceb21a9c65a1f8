"""The trajectory model: exact dynamic mode decomposition (DMD) of the measured residual vectors.

With the snapshot matrices X = [r_a … r_{b−1}], Y = [r_{a+1} … r_b] (whole-batch vectors) and the
truncated SVD X = U Σ Vᵀ (singular values above the round-off of the state's dtype),
Ã = Uᵀ Y V Σ⁻¹ and r_{b+j} ≈ U Ãʲ Uᵀ r_b. The future state is h_{T+j} = h_T + Σ_{i≤j} r_{T+i}, summed
as vectors (per token), so rotating and sign-flipping modes cancel as in the real loop and fixed
points come out right. Exact for any affine loop whose residual lives in few modes, whatever their
eigenvalues: decaying, growing, rotating (complex pairs), sign-flipping, and sums of them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from loopdyn.dynamics.forecasting.common import Measured, TokenNorms, propagate, rel_error
from loopdyn.dynamics.forecasting.result import RATE_FLOOR, ForecastModel
from loopdyn.dynamics.numbers import fmt
from loopdyn.dynamics.verdict import UNIT_BAND

def _dmd(R: list[torch.Tensor], floor: float):
    """Exact DMD of the snapshots R = [r_a … r_b] (flat float64): (U (k, N) orthonormal rows, Ã (k × k))
    or None when no direction is above round-off."""
    if len(R) < 2:
        return None
    X, Y = torch.stack(R[:-1]), torch.stack(R[1:])
    Ux, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = int((S > max(floor, 1e-13 * float(S[0]))).sum())
    if keep == 0:
        return None
    Ux, S, Vh = Ux[:, :keep], S[:keep], Vh[:keep]
    A = ((Y @ Vh.T).T @ Ux) / S[None, :]
    return Vh, A.numpy()


def _modes(A: np.ndarray, z0: np.ndarray, rel_amplitude: float = 1e-3):
    """Eigenvalues of A sorted by modulus, and those the start z0 excites (amplitude ≥ rel × the largest)."""
    lam, W = np.linalg.eig(A)
    b = np.linalg.lstsq(W, z0.astype(complex), rcond=None)[0]
    amp = np.abs(b) * np.linalg.norm(W, axis=0)
    excited = lam[amp >= rel_amplitude * max(float(amp.max()), 1e-300)] if amp.size else lam
    order = np.argsort(-np.abs(lam), kind="stable")
    return lam[order], excited


def trajectory_model(data: Measured, J: int) -> ForecastModel | None:
    """DMD on the measured residual vectors, hindcast from loop T − w: the same fit
    on r_a..r_{t₀} (t₀ = T − w) propagates r_{t₀} to loops t₀+1..T. Its rate is the largest log|λ| over
    the modes r_T excites (amplitude ≥ 1e-3 of the largest); the limit (Σ_{j≥1} Ãʲ z₀) when every
    |λ| < 1."""
    T = data.T
    if T < 2:
        return None
    shape = data.h[T].shape
    w = data.hindcast_window()

    def fit(b: int):
        a = max(1, b - 24)
        return _dmd([data.r(t).reshape(-1) for t in range(a, b + 1)], 20 * data.eps * float(data.h[b].norm())), a

    r_T = data.r(T)
    if float(r_T.norm()) <= data.floor(T):
        N0 = float(data.h[T].norm())
        tok0 = float(data.h[T].norm(dim=-1).mean())
        return ForecastModel("trajectory", np.full(J + 1, N0), np.zeros(J + 1), np.full(J + 1, tok0), RATE_FLOOR,
                             np.zeros(0, complex), f"the residual is at round-off by loop {T}: converged",
                             limit_state=tok0)
    fitted = fit(T)
    if fitted is None or fitted[0] is None:
        return None
    (U, A), a = fitted
    k = A.shape[0]
    norms = TokenNorms(U.reshape(k, *shape), data.h[T])
    z0 = (U @ r_T.reshape(-1)).numpy()
    total, tok, res, _ = propagate(z0, lambda z, _N: A @ z, norms, J)
    lam, excited = _modes(A, z0)
    rate = float(np.log(np.abs(excited).max())) if excited.size and np.abs(excited).max() > 0 else RATE_FLOOR
    limit = None
    if rate < -UNIT_BAND and np.all(np.abs(lam) < 1):
        y_inf = np.linalg.solve(np.eye(k) - A, A @ z0)  # Σ_{j≥1} Ãʲ z0
        limit = norms(y_inf)[1]
    # hindcast: the same fit on r_a..r_t0, propagated to T
    hind = math.nan
    t0 = T - w
    if w >= 1 and t0 >= 2:
        f0, _ = fit(t0)
        if f0 is not None:
            U0, A0 = f0
            z = (U0 @ data.r(t0).reshape(-1)).numpy()
            errs = []
            for t in range(t0 + 1, T + 1):
                z = A0 @ z
                pred = (U0.T @ torch.from_numpy(z)).reshape(shape)
                errs.append(rel_error(pred, data.r(t), data.floor(t)))
            hind = max(errs)
    top = lam[0] if lam.size else 0
    detail = (f"DMD of the measured residual vectors r_{a}..r_{T} (rank {k}): leading eigenvalue {fmt(complex(top))} "
              f"(|λ| {fmt(abs(top))}), excited modes up to |λ| {fmt(math.exp(rate))}")
    return ForecastModel("trajectory", total, res, tok, rate, lam, detail, hind, limit)
