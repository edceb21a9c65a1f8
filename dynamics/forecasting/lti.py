"""The LTI model: r_{T+j} = Āʲ r_T per token with the loop's exact Ā (`linear_part()`).

Skipped (None) when the model has no LTI part. Its rate is exact: log ρ(Ā).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from loopdyn.dynamics.forecasting.common import Measured, rel_error
from loopdyn.dynamics.forecasting.result import RATE_FLOOR, ForecastModel
from loopdyn.dynamics.numbers import fmt

def lti_model(part, data: Measured, J: int, eigenvalues: np.ndarray | None = None,
              max_flops: float = 4e9) -> ForecastModel | None:
    """r_{T+j} = Āʲ r_T per token with the exact Ā; h_{T+j} = h_T + Σ_{i≤j} r_{T+i}. Tokens are subsampled
    evenly when propagating all of them would cost more than max_flops (norms rescaled to the whole
    batch). Hindcast: r_{t₀} propagated with Ā to T. Limit (ρ < 1): h_T + Ā(I − Ā)⁻¹ r_T."""
    T = data.T
    if part is None or T < 1 or not part.A.is_finite():
        return None
    A = part.A
    n_tok, ds = data.h[T].shape
    per_token = (ds if A.normal else ds * ds) * 2.0 * max(J + 3, 1)
    keep = max(1, min(n_tok, int(max_flops / per_token)))
    sel = torch.linspace(0, n_tok - 1, keep).round().long() if keep < n_tok else slice(None)
    h = data.h[T][sel]
    r = data.r(T)[sel]
    scale = float(data.h[T].norm()) / max(float(h.norm()), 1e-300)
    tok_scale = float(data.h[T].norm(dim=-1).mean()) / max(float(h.norm(dim=-1).mean()), 1e-300)
    r_scale = float(data.r(T).norm()) / max(float(r.norm()), 1e-300)
    total, tok, res = np.empty(J + 1), np.empty(J + 1), np.empty(J + 1)
    total[0], tok[0], res[0] = float(data.h[T].norm()), float(data.h[T].norm(dim=-1).mean()), float(data.r(T).norm())
    cum = torch.zeros_like(h)
    for j in range(1, J + 1):
        r = A.apply(r).to(torch.float64)
        cum = cum + r
        res[j] = float(r.norm()) * r_scale
        total[j] = float((h + cum).norm()) * scale
        tok[j] = float((h + cum).norm(dim=-1).mean()) * tok_scale
        if not (math.isfinite(total[j]) and total[j] < 1e300):
            total[j:], tok[j:], res[j:] = math.inf, math.inf, math.inf
            break
    rho = float(A.radius())
    rate = math.log(rho) if rho > 0 else RATE_FLOOR
    lam = np.asarray(A.eigenvalues() if eigenvalues is None else eigenvalues)[:16]
    limit = None
    if rho < 1:
        tail = A.shifted_solve(A.apply(data.r(T)[sel]).to(torch.float64))
        if tail is not None:
            limit = float((h + tail).norm(dim=-1).mean()) * tok_scale
    # hindcast: r_{t0} propagated with Ā to T
    hind = math.nan
    w = data.hindcast_window()
    t0 = T - w
    if w >= 1 and t0 >= 1:
        r0 = data.r(t0)[sel]
        errs = []
        for t in range(t0 + 1, T + 1):
            r0 = A.apply(r0).to(torch.float64)
            errs.append(rel_error(r0, data.r(t)[sel], data.floor(t) / max(scale, 1e-300)))
        hind = max(errs)
    nrm = A.norm()
    detail = f"ρ(Ā) {fmt(rho)}, ‖Ā‖₂ {fmt(nrm)} ({A.kind} Ā, {'normal' if A.normal else 'possibly non-normal'})"
    return ForecastModel("LTI", total, res, tok, rate, lam, detail, hind, limit, exact_rate=True)
