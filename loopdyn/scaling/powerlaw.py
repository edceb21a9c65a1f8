"""Plain power laws y = k·x^α, isoFLOP parabolas and compute-optimal exponents.

`fit_power_law` is ordinary least squares in log-log space (`scipy.stats.linregress`) with a
Student-t interval on α; `fit_isoflop` a parabola in ln x at one compute budget;
`fit_compute_optimal` an isoFLOP profile per budget, then a power law through the optima.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loopdyn.models.errors import InputError

def _positive_1d(x, name):
    v = np.atleast_1d(np.asarray(x, dtype=float)).ravel()
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise InputError(f"{name} must be finite and positive")
    return v


@dataclass
class PowerLawFit:
    """y = k·x^alpha, fitted by least squares on log y = log k + alpha·log x.

    ``alpha_ci`` is the ``ci_level`` Student-t interval of alpha (None with 2 points);
    ``r2`` the coefficient of determination in log space.
    """

    k: float
    alpha: float
    alpha_ci: tuple[float, float] | None
    r2: float
    n_points: int
    ci_level: float = 0.95

    def predict(self, x) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.alpha

    def to_json(self) -> dict:
        return {"k": self.k, "alpha": self.alpha,
                "alpha_ci": None if self.alpha_ci is None else list(self.alpha_ci),
                "r2": self.r2, "n_points": self.n_points}


def fit_power_law(x, y, *, ci_level: float = 0.95) -> PowerLawFit:
    """Fit y = k·x^α (both positive) by ordinary least squares in log-log space."""
    from scipy import stats

    lx, ly = np.log(_positive_1d(x, "x")), np.log(_positive_1d(y, "y"))
    if lx.size != ly.size:
        raise InputError(f"x has {lx.size} values and y {ly.size}")
    if lx.size < 2 or np.ptp(lx) == 0:
        raise InputError("a power law needs at least two distinct x values")
    line = stats.linregress(lx, ly)
    alpha, lnk = float(line.slope), float(line.intercept)
    r2 = float(line.rvalue) ** 2 if np.ptp(ly) > 0 else 1.0  # a flat y is fitted exactly
    ci = None
    if lx.size > 2:
        t = float(stats.t.ppf(0.5 + ci_level / 2.0, lx.size - 2))
        ci = (float(alpha - t * line.stderr), float(alpha + t * line.stderr))
    return PowerLawFit(float(math.exp(lnk)), float(alpha), ci, r2, int(lx.size), ci_level)


@dataclass
class IsoFLOPFit:
    """Parabola L = c2·(ln x)² + c1·ln x + c0 at fixed compute; optimum at ln x* = −c1/(2·c2).

    ``x_opt`` and ``loss_opt`` are the vertex; ``inside`` says whether x* lies within the
    sampled range of x (an optimum outside it is an extrapolation).
    """

    x_opt: float
    loss_opt: float
    coeffs: tuple[float, float, float]  # c2, c1, c0
    inside: bool
    n_points: int
    compute: float | None = None

    def predict(self, x) -> np.ndarray:
        lx = np.log(np.asarray(x, dtype=float))
        c2, c1, c0 = self.coeffs
        return c2 * lx**2 + c1 * lx + c0


def fit_isoflop(x, loss, *, compute: float | None = None) -> IsoFLOPFit:
    """Fit an isoFLOP profile: loss as a quadratic in ln x (x = μ_rec, tokens, ...).

    Raises InputError with fewer than three distinct x values or when the parabola opens
    downwards (no minimum).
    """
    lx = np.log(_positive_1d(x, "x"))
    L = _positive_1d(loss, "loss")
    if lx.size != L.size:
        raise InputError(f"x has {lx.size} values and loss {L.size}")
    if np.unique(lx).size < 3:
        raise InputError("an isoFLOP parabola needs at least three distinct x values")
    c2, c1, c0 = np.polyfit(lx, L, 2)
    where = "" if compute is None else f" at compute {compute:.3g}"
    if not c2 > 0:
        raise InputError(f"isoFLOP profile{where} has no minimum (the parabola opens downwards)")
    lopt = -c1 / (2.0 * c2)
    return IsoFLOPFit(float(math.exp(lopt)), float(c0 - c1 * c1 / (4.0 * c2)),
                      (float(c2), float(c1), float(c0)),
                      bool(lx.min() <= lopt <= lx.max()), int(lx.size), compute)


@dataclass
class ComputeOptimalFit:
    """Optimal x across compute budgets and the power law x* = k·C^alpha through them."""

    budgets: list[float]
    profiles: list[IsoFLOPFit]
    law: PowerLawFit

    @property
    def alpha(self) -> float:
        return self.law.alpha


def fit_compute_optimal(compute, x, loss, *, rtol: float = 1e-6) -> ComputeOptimalFit:
    """Group rows by compute budget C (equal within ``rtol``), fit an isoFLOP parabola per
    budget, then fit x*(C) ∝ C^α. Needs at least two budgets."""
    C = _positive_1d(compute, "compute")
    xs, L = _positive_1d(x, "x"), _positive_1d(loss, "loss")
    if not C.size == xs.size == L.size:
        raise InputError("compute, x and loss must have the same length")
    order = np.argsort(C)
    groups: list[list[int]] = []
    for i in order:
        if groups and abs(C[i] - C[groups[-1][0]]) <= rtol * C[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) < 2:
        raise InputError("need at least two compute budgets")
    profiles = [fit_isoflop(xs[g], L[g], compute=float(C[g[0]])) for g in groups]
    budgets = [p.compute for p in profiles]
    return ComputeOptimalFit(budgets, profiles,
                             fit_power_law(budgets, [p.x_opt for p in profiles]))
