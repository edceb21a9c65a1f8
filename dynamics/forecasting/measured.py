"""The measured-norm model: the fallback when no linear model reproduces the past."""
from __future__ import annotations

import math

import numpy as np

from loopdyn.dynamics.forecasting.result import TREND_R2, ForecastModel
from loopdyn.dynamics.numbers import fmt
from loopdyn.dynamics.verdict import UNIT_BAND

def measured_model(traj, J: int) -> ForecastModel | None:
    """The fallback when no linear model reproduces the past (irregular, strongly nonlinear motion):
    log-linear fits over the last half of the measured loops. The state norm growing geometrically
    (R² ≥ TREND_R2 and by ≥ 2× over the window) is continued at that rate; the residual shrinking
    geometrically (R² ≥ TREND_R2 and by ≥ 4×) is converging, the state held at ‖h_T‖; anything else is
    irregular motion that is not shown to converge (rate 0), the state held at ‖h_T‖."""
    T = traj.n_loops
    R, N, S = traj.total_residual, traj.total_norm, traj.state_norm
    tail = [t for t in range(max(1, T - max(3, T // 2)), T + 1) if np.isfinite(R[t]) and R[t] > 0]
    if len(tail) < 3:
        return None

    def fit(v):
        x, y = np.array(tail, float), np.log([v[t] for t in tail])
        slope, icpt = np.polyfit(x, y, 1)
        ss = float(((y - y.mean()) ** 2).sum())
        return float(slope), (1 - float(((y - (slope * x + icpt)) ** 2).sum()) / ss if ss > 0 else 1.0)

    sn, r2n = fit(N)
    sr, r2r = fit(R)
    j = np.arange(J + 1, dtype=float)
    if r2n >= TREND_R2 and sn > UNIT_BAND and N[T] >= 2 * N[tail[0]]:
        rate, kind = sn, f"the state norm grows geometrically ({fmt(math.exp(sn))}/loop, R² {fmt(r2n)})"
        with np.errstate(over="ignore"):
            total = N[T] * np.exp(sn * j)
            res = R[T] * np.exp(sn * j)
    else:
        conv = r2r >= TREND_R2 and sr < -UNIT_BAND and R[tail[0]] >= 4 * R[T]
        rate = sr if conv else 0.0
        kind = (f"the residual shrinks geometrically ({fmt(math.exp(sr))}/loop, R² {fmt(r2r)})" if conv else
                f"no clean geometric trend (residual {fmt(math.exp(sr))}/loop, R² {fmt(r2r)}; state "
                f"{fmt(math.exp(sn))}/loop): irregular, not shown to converge")
        total = np.full(J + 1, N[T])
        res = R[T] * np.exp(rate * j)
    tok = total * (S[T] / N[T] if N[T] > 0 else 1.0)
    detail = f"measured norms over loops {tail[0]}-{T}: {kind}"
    return ForecastModel("measured", total, res, tok, rate, np.zeros(0, complex), detail)
