"""Scaling laws for looped (and routed) language models: fit, predict, compare.

Laws (parameter names as in shared/reference/paper-facts.md and docs/design.md §7):

- ``testtime`` (Parcae, test-time compute): L(T) = L_inf + Z·exp(−z·T), where T is the
  number of loops run at evaluation. Alternative forms, for comparison only:
  ``power_shifted`` L_inf + Z·(1+T)^(−z), ``power`` L_inf + Z·T^(−z), ``pure_power`` Z·T^(−z).
- ``parcae`` (training law): L(N, D) = E + A·N^(−a) + B·D^(−b), with N the parameter count
  of the fully unrolled model (CSV column ``params``) and D the training tokens (``tokens``).
- ``unified``: L(T | μ_rec, D) = E + X·N(μ_rec)^(−x) + Y·D^(−y) + Z·exp(−z·T/μ_rec).
- ``routed`` (Clark et al. 2022): log10 L = a·log10 N + b·log10 Ê + c·log10 N·log10 Ê + d,
  with the saturating expert count 1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^(−1)) + 1/E_max.

Losses are in nats per token; N in parameters; D in tokens; T and μ_rec in loops.

Fitting follows the papers (Hoffmann et al. 2022 style, as used by Parcae): minimise the
Huber loss (δ = 1e-3 by default) of the log-loss residuals r_i = log L̂_i − log L_i with
L-BFGS-B (``scipy.optimize.minimize``, analytic gradients) from many seeded starting points,
keeping the best. Positive quantities are fitted through their logarithm. Confidence
intervals come from a seeded bootstrap over the fitted rows (percentile intervals).

Also here: plain power laws y = k·x^α (:func:`fit_power_law`), isoFLOP parabolas
(:func:`fit_isoflop`), compute-optimal exponents (:func:`fit_compute_optimal`),
:func:`effective_params` and :func:`n_cutoff` for routed models, and :func:`read_law_csv`.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import optimize

from loopdyn.models.errors import InputError

__all__ = [
    "COLUMNS", "LAWS", "TESTTIME_FORMS", "LAW_COLUMNS", "LAW_PARAMS",
    "PARCAE_PUBLISHED", "CLARK_PUBLISHED",
    "LawFit", "TestTimeComparison", "PowerLawFit", "IsoFLOPFit", "ComputeOptimalFit",
    "read_law_csv", "fit_law", "fit_testtime", "compare_testtime", "fit_parcae",
    "fit_unified", "fit_routed", "predict_law",
    "saturating_experts", "routed_loss", "effective_params", "n_cutoff",
    "fit_power_law", "fit_isoflop", "fit_compute_optimal",
]

COLUMNS = ("loops", "mean_recurrence", "params", "tokens", "experts", "flops", "loss")
LAWS = ("testtime", "parcae", "unified", "routed")
TESTTIME_FORMS = ("exponential", "power_shifted", "power", "pure_power")

#: Published coefficients (Parcae training law; nats, N = unrolled parameters, D = tokens).
PARCAE_PUBLISHED = {
    "140M": {"E": 2.662, "A": 522733.307, "a": 0.771, "B": 25420.102, "b": 0.525},
    "370M": {"E": 2.439, "A": 832134.346, "a": 0.775, "B": 6386.865, "b": 0.448},
}
#: Published routed-LM coefficients (Clark et al. 2022) and their quoted N_cutoff.
CLARK_PUBLISHED = {
    "S-BASE": {"a": -0.082, "b": -0.108, "c": 0.009, "d": 1.104, "E_start": 1.847, "E_max": 314.478},
    "RL-R": {"a": -0.083, "b": -0.126, "c": 0.012, "d": 1.111, "E_start": 1.880, "E_max": 469.982},
    "HASH": {"a": -0.087, "b": -0.136, "c": 0.012, "d": 1.157, "E_start": 4.175, "E_max": 477.741},
}
CLARK_N_CUTOFF = {"S-BASE": 9e11, "RL-R": 8.5e10, "HASH": 8.3e10}

_LN10 = math.log(10.0)


# ---------------------------------------------------------------------------------------
# Functional forms
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Form:
    """One functional form: names, inputs, and log L̂ with its Jacobian in fit space θ.

    θ holds log(value) for the names in ``log_params`` and the value itself otherwise,
    except where ``to_params``/``from_params`` say differently (the routed form fits
    log(E_max − E_start) so that E_max > E_start always).
    """

    name: str
    law: str
    params: tuple[str, ...]
    columns: tuple[str, ...]
    formula: str
    log_predict: Callable[[np.ndarray, Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
    init: Callable[[Mapping[str, np.ndarray], np.ndarray, np.random.Generator, int], np.ndarray]
    bounds: Callable[[Mapping[str, np.ndarray], np.ndarray], list[tuple[float, float]]]
    to_params: Callable[[np.ndarray], dict[str, float]]
    from_params: Callable[[Mapping[str, float]], np.ndarray]
    positive: frozenset[str] = frozenset()
    # input columns that enter through a power or log and so need two distinct values
    varying: tuple[str, ...] = ()
    # the additive terms beside the constant, for the identifiability check: θ, cols →
    # {term formula: its value on each row}; None for forms with no constant (pure power, routed)
    terms: Callable[[np.ndarray, Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    constant: str | None = None  # the constant a negligible term trades off against


def _log_to_params(names: Sequence[str], logged: Sequence[str]):
    logged = set(logged)

    def to_params(theta):
        return {n: float(math.exp(t) if n in logged else t) for n, t in zip(names, theta)}

    def from_params(p):
        return np.array([math.log(p[n]) if n in logged else float(p[n]) for n in names])

    return to_params, from_params


def _safe_log(x):
    return np.log(np.maximum(x, 1e-300))


# -- test-time forms ------------------------------------------------------------------

def _tt_term(kind, T, z):
    """Return (g(T), ∂g/∂z) for the decay shape g of a test-time form."""
    if kind == "exponential":
        g = np.exp(-z * T)
        return g, -T * g
    if kind == "power_shifted":
        lt = np.log1p(T)
        g = np.exp(-z * lt)
        return g, -lt * g
    lt = np.log(T)
    g = np.exp(-z * lt)
    return g, -lt * g


def _make_testtime(kind: str) -> _Form:
    has_inf = kind != "pure_power"
    names = ("L_inf", "Z", "z") if has_inf else ("Z", "z")
    formulas = {
        "exponential": "L(T) = L_inf + Z*exp(-z*T)",
        "power_shifted": "L(T) = L_inf + Z*(1+T)^(-z)",
        "power": "L(T) = L_inf + Z*T^(-z)",
        "pure_power": "L(T) = Z*T^(-z)",
    }
    to_params, from_params = _log_to_params(names, names)

    def log_predict(theta, cols):
        T = cols["loops"]
        if has_inf:
            Linf, Z, z = np.exp(theta)
        else:
            Z, z = np.exp(theta)
            Linf = 0.0
        g, dg = _tt_term(kind, T, z)
        t = Z * g
        pred = Linf + t
        jac = [t, Z * dg * z]  # d/dlnZ, d/dlnz
        if has_inf:
            jac.insert(0, np.full_like(T, Linf))
        return _safe_log(pred), np.stack(jac, axis=1) / pred[:, None]

    def init(cols, loss, rng, k):
        T = cols["loops"]
        lo, hi = float(loss.min()), float(loss.max())
        span = max(hi - lo, 1e-3 * hi)
        out = np.empty((k, len(names)))
        for i in range(k):
            if has_inf:
                linf = lo - span * rng.uniform(0.0, 1.0) if i else lo - 0.05 * span
                linf = max(linf, 1e-3 * lo)
            else:
                linf = 0.0
            if kind == "exponential":
                z = math.exp(rng.uniform(math.log(0.02), math.log(5.0))) if i else 1.0 / max(np.median(T), 1e-3)
            else:
                z = math.exp(rng.uniform(math.log(0.05), math.log(3.0))) if i else 0.5
            g, _ = _tt_term(kind, T, z)
            # choose Z so that the curve passes through the mean excess loss
            Z = max(float(np.mean(loss - linf) / max(np.mean(g), 1e-300)), 1e-12)
            row = [math.log(Z), math.log(z)]
            if has_inf:
                row.insert(0, math.log(linf))
            out[i] = row
        return out

    def bounds(cols, loss):
        hi = math.log(float(loss.max())) + 1.0
        b = [(-40.0, 60.0), (math.log(1e-6), math.log(50.0 if kind == "exponential" else 20.0))]
        if has_inf:
            b.insert(0, (math.log(float(loss.min())) - 25.0, hi))
        return b

    def terms(theta, cols):
        Z, z = np.exp(theta[-2:])
        shape = formulas[kind].split(" + ")[-1]
        return {shape: Z * _tt_term(kind, cols["loops"], z)[0]}

    return _Form(kind, "testtime", names, ("loops",), formulas[kind], log_predict, init,
                 bounds, to_params, from_params, frozenset(names), ("loops",),
                 terms if has_inf else None, "L_inf" if has_inf else None)


# -- parcae / unified ---------------------------------------------------------------------

def _power_init(x, loss_scale, rng, lo=0.05, hi=1.5):
    """Random exponent and a log-coefficient giving a term of `loss_scale`·U(0.01, 1)."""
    e = rng.uniform(lo, hi)
    frac = math.exp(rng.uniform(math.log(0.01), 0.0))
    return math.log(frac * loss_scale) + e * float(np.median(np.log(x))), e


def _make_parcae() -> _Form:
    names = ("E", "A", "a", "B", "b")
    to_params, from_params = _log_to_params(names, ("E", "A", "B"))

    def log_predict(theta, cols):
        lnE, lnA, a, lnB, b = theta
        lnN, lnD = cols["_lnparams"], cols["_lntokens"]
        E = math.exp(lnE)
        tA = np.exp(lnA - a * lnN)
        tB = np.exp(lnB - b * lnD)
        pred = E + tA + tB
        jac = np.stack([np.full_like(tA, E), tA, -lnN * tA, tB, -lnD * tB], axis=1)
        return _safe_log(pred), jac / pred[:, None]

    def init(cols, loss, rng, k):
        lo = float(loss.min())
        out = np.empty((k, 5))
        for i in range(k):
            E = lo * rng.uniform(0.3, 0.98)
            lnA, a = _power_init(cols["params"], lo, rng)
            lnB, b = _power_init(cols["tokens"], lo, rng)
            out[i] = [math.log(E), lnA, a, lnB, b]
        return out

    def bounds(cols, loss):
        top = math.log(float(loss.max())) + 1.0
        return [(math.log(float(loss.min())) - 25.0, top), (-60.0, 150.0), (0.0, 4.0),
                (-60.0, 150.0), (0.0, 4.0)]

    def terms(theta, cols):
        _, lnA, a, lnB, b = theta
        return {"A*N^(-a)": np.exp(lnA - a * cols["_lnparams"]),
                "B*D^(-b)": np.exp(lnB - b * cols["_lntokens"])}

    return _Form("parcae", "parcae", names, ("params", "tokens"),
                 "L(N, D) = E + A*N^(-a) + B*D^(-b)", log_predict, init, bounds,
                 to_params, from_params, frozenset(("E", "A", "B")), ("params", "tokens"),
                 terms, "E")


def _make_unified() -> _Form:
    names = ("E", "X", "x", "Y", "y", "Z", "z")
    logged = ("E", "X", "Y", "Z", "z")
    to_params, from_params = _log_to_params(names, logged)

    def log_predict(theta, cols):
        lnE, lnX, x, lnY, y, lnZ, lnz = theta
        lnN, lnD = cols["_lnparams"], cols["_lntokens"]
        s = cols["loops"] / cols["mean_recurrence"]
        E, z = math.exp(lnE), math.exp(lnz)
        tX = np.exp(lnX - x * lnN)
        tY = np.exp(lnY - y * lnD)
        tZ = np.exp(lnZ - z * s)
        pred = E + tX + tY + tZ
        jac = np.stack([np.full_like(tX, E), tX, -lnN * tX, tY, -lnD * tY, tZ, -z * s * tZ],
                       axis=1)
        return _safe_log(pred), jac / pred[:, None]

    def init(cols, loss, rng, k):
        lo, hi = float(loss.min()), float(loss.max())
        s = cols["loops"] / cols["mean_recurrence"]
        out = np.empty((k, 7))
        for i in range(k):
            E = lo * rng.uniform(0.3, 0.98)
            lnX, x = _power_init(cols["params"], lo, rng)
            lnY, y = _power_init(cols["tokens"], lo, rng)
            z = math.exp(rng.uniform(math.log(0.1), math.log(20.0)))
            Z = max(hi - lo, 1e-3 * lo) * math.exp(rng.uniform(-1.0, 1.0)) * math.exp(z * float(s.min()))
            out[i] = [math.log(E), lnX, x, lnY, y, math.log(Z), math.log(z)]
        return out

    def bounds(cols, loss):
        top = math.log(float(loss.max())) + 1.0
        return [(math.log(float(loss.min())) - 25.0, top), (-60.0, 150.0), (0.0, 4.0),
                (-60.0, 150.0), (0.0, 4.0), (-40.0, 150.0), (math.log(1e-4), math.log(500.0))]

    def terms(theta, cols):
        _, lnX, x, lnY, y, lnZ, lnz = theta
        s = cols["loops"] / cols["mean_recurrence"]
        return {"X*N^(-x)": np.exp(lnX - x * cols["_lnparams"]),
                "Y*D^(-y)": np.exp(lnY - y * cols["_lntokens"]),
                "Z*exp(-z*T/mu_rec)": np.exp(lnZ - math.exp(lnz) * s)}

    return _Form("unified", "unified", names, ("loops", "mean_recurrence", "params", "tokens"),
                 "L(T | mu_rec, D) = E + X*N^(-x) + Y*D^(-y) + Z*exp(-z*T/mu_rec)",
                 log_predict, init, bounds, to_params, from_params,
                 frozenset(logged), ("loops", "params", "tokens"), terms, "E")


# -- routed (Clark et al. 2022) ------------------------------------------------------------

def saturating_experts(experts, E_start: float, E_max: float) -> np.ndarray:
    """Saturating expert count Ê of Clark et al. (2022), eq. for the routed law.

    1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^(−1)) + 1/E_max, so Ê(1) = E_start and
    Ê → E_max as E → ∞. Requires 0 < E_start < E_max and E ≥ 1 (a count of experts).
    """
    E = np.asarray(experts, dtype=float)
    if not 0.0 < E_start < E_max:
        raise InputError(f"need 0 < E_start < E_max, got E_start={E_start}, E_max={E_max}")
    K = 1.0 / (1.0 / E_start - 1.0 / E_max)
    return 1.0 / (1.0 / (E - 1.0 + K) + 1.0 / E_max)


def routed_loss(n, experts, coeffs: Mapping[str, float] | "LawFit") -> np.ndarray:
    """L(N, E) from the routed law: 10^(a·log10 N + b·log10 Ê + c·log10 N·log10 Ê + d)."""
    p = _coeffs(coeffs)
    lN = np.log10(np.asarray(n, dtype=float))
    lE = np.log10(saturating_experts(experts, p["E_start"], p["E_max"]))
    return 10.0 ** (p["a"] * lN + p["b"] * lE + p["c"] * lN * lE + p["d"])


def _routed_parts(Es, G, E):
    Em = Es + G
    K = Es * Em / G
    u = E - 1.0 + K
    w = 1.0 / u + 1.0 / Em
    lE = -np.log10(w)
    # dw/dEs (G fixed: Em moves with Es) and dw/dG (Es fixed)
    dK_dEs = 2.0 * Es / G + 1.0
    dK_dG = -(Es / G) ** 2
    dw_dEs = -dK_dEs / u**2 - 1.0 / Em**2
    dw_dG = -dK_dG / u**2 - 1.0 / Em**2
    return lE, w, dw_dEs, dw_dG


def _make_routed() -> _Form:
    names = ("a", "b", "c", "d", "E_start", "E_max")

    def to_params(theta):
        a, b, c, d, lnEs, lnG = (float(t) for t in theta)
        Es = math.exp(lnEs)
        return {"a": a, "b": b, "c": c, "d": d, "E_start": Es, "E_max": Es + math.exp(lnG)}

    def from_params(p):
        return np.array([p["a"], p["b"], p["c"], p["d"], math.log(p["E_start"]),
                         math.log(p["E_max"] - p["E_start"])])

    def log_predict(theta, cols):
        a, b, c, d, lnEs, lnG = theta
        Es, G = math.exp(lnEs), math.exp(lnG)
        lN = cols["_log10params"]
        lE, w, dw_dEs, dw_dG = _routed_parts(Es, G, cols["experts"])
        logpred = _LN10 * (a * lN + b * lE + c * lN * lE + d)
        slope = b + c * lN  # ∂log10 L/∂log10 Ê
        # ∂ln L/∂lnEs = ln10·slope·∂log10Ê/∂lnEs = slope·(−1/w)·∂w/∂Es·Es
        jac = np.stack([_LN10 * lN, _LN10 * lE, _LN10 * lN * lE, np.full_like(lN, _LN10),
                        -slope * dw_dEs * Es / w, -slope * dw_dG * G / w], axis=1)
        return logpred, jac

    def init(cols, loss, rng, k):
        lN = cols["_log10params"]
        y = np.log10(loss)
        Emax_obs = float(cols["experts"].max())
        out = np.empty((k, 6))
        for i in range(k):
            Es = math.exp(rng.uniform(0.0, math.log(10.0)))
            Em = Es + Emax_obs * math.exp(rng.uniform(math.log(0.05), math.log(20.0)))
            lE = np.log10(saturating_experts(cols["experts"], Es, Em))
            X = np.stack([lN, lE, lN * lE, np.ones_like(lN)], axis=1)
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            out[i] = [*np.clip(coef, -9.0, 9.0), math.log(Es), math.log(Em - Es)]
        return out

    def bounds(cols, loss):
        return [(-10.0, 10.0), (-10.0, 10.0), (-10.0, 10.0), (-50.0, 50.0),
                (math.log(1e-2), math.log(1e4)), (math.log(1e-3), math.log(1e7))]

    return _Form("routed", "routed", names, ("params", "experts"),
                 "log10 L = a*log10 N + b*log10 E^ + c*log10 N*log10 E^ + d",
                 log_predict, init, bounds, to_params, from_params,
                 frozenset(("E_start", "E_max")), ("params", "experts"))


_FORMS: dict[str, _Form] = {f: _make_testtime(f) for f in TESTTIME_FORMS}
_FORMS["parcae"] = _make_parcae()
_FORMS["unified"] = _make_unified()
_FORMS["routed"] = _make_routed()
_LAW_FORM = {"testtime": "exponential", "parcae": "parcae", "unified": "unified", "routed": "routed"}

#: Columns each law needs (besides ``loss``).
LAW_COLUMNS = {law: _FORMS[_LAW_FORM[law]].columns for law in LAWS}
#: Parameter names of each law, in order (docs/design.md §7).
LAW_PARAMS = {law: _FORMS[_LAW_FORM[law]].params for law in LAWS}


def _coeffs(c) -> dict[str, float]:
    return dict(c.params) if isinstance(c, LawFit) else dict(c)


def _prepare(form: _Form, columns: Mapping[str, object], need_loss: bool) -> dict[str, np.ndarray]:
    """Validate and convert the inputs a form needs; add cached logs."""
    need = list(form.columns) + (["loss"] if need_loss else [])
    missing = [c for c in need if c not in columns]
    if missing:
        raise InputError(f"the {form.law} law needs column(s) {', '.join(missing)}")
    cols: dict[str, np.ndarray] = {}
    n = None
    for c in need:
        v = np.atleast_1d(np.asarray(columns[c], dtype=float)).ravel()
        if n is None:
            n = v.size
        elif v.size != n:
            raise InputError(f"column {c} has {v.size} values, expected {n}")
        if not np.all(np.isfinite(v)):
            raise InputError(f"column {c} has a non-finite value at index {int(np.argmin(np.isfinite(v)))}")
        if np.any(v <= 0):
            raise InputError(f"column {c} must be positive; index {int(np.argmax(v <= 0))} is {v[v <= 0][0]:g}")
        cols[c] = v
    if "experts" in cols and np.any(cols["experts"] < 1):
        raise InputError("column experts must be >= 1 (a number of experts)")
    if "params" in cols:
        cols["_lnparams"] = np.log(cols["params"])
        cols["_log10params"] = np.log10(cols["params"])
    if "tokens" in cols:
        cols["_lntokens"] = np.log(cols["tokens"])
    return cols


def predict_law(law: str, coeffs: Mapping[str, float], /, **columns) -> np.ndarray:
    """Evaluate a law (``testtime``/``parcae``/``unified``/``routed`` or a test-time form name
    such as ``power_shifted``) with coefficients ``coeffs`` at the given input columns, e.g.
    ``predict_law("parcae", {"E": ..., ...}, params=N, tokens=D)``; returns loss in nats."""
    f = _form(law)
    cols = _prepare(f, columns, need_loss=False)
    logpred, _ = f.log_predict(f.from_params(coeffs), cols)
    return np.exp(logpred)


def _form(name: str) -> _Form:
    name = _LAW_FORM.get(name, name)
    if name not in _FORMS:
        raise InputError(f"unknown law {name!r}; choose one of {', '.join(LAWS + TESTTIME_FORMS[1:])}")
    return _FORMS[name]


# ---------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------

@dataclass
class LawFit:
    """The result of fitting one law.

    ``params`` are the fitted values (names as in docs/design.md §7); ``ci`` the bootstrap percentile
    intervals at level ``ci_level`` (None when ``bootstrap == 0``). Errors are the mean
    absolute relative error of the loss, |L̂ − L|/L: ``in_sample_error`` on the fitted rows,
    ``held_out_error`` on the withheld rows (None when none were withheld).
    ``reliable`` is False, with a human ``reason``, when the optimiser did not converge, a
    parameter sits at its bound, an interval is huge, or there are no spare data points.
    """

    law: str
    form: str
    formula: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float] | None]
    in_sample_error: float
    held_out_error: float | None
    n_points: int
    n_held_out: int
    converged: bool
    reliable: bool
    reason: str | None
    objective: float
    restarts: int
    bootstrap: int
    ci_level: float
    samples: np.ndarray | None = field(default=None, repr=False)  # bootstrap draws, (B, p)

    @property
    def columns(self) -> tuple[str, ...]:
        """Input columns ``predict`` needs."""
        return _FORMS[self.form].columns

    def predict(self, **columns) -> np.ndarray:
        """Predicted loss (nats) at the given inputs, e.g. ``fit.predict(loops=[1, 2, 4])``."""
        return predict_law(self.form, self.params, **columns)

    def predict_interval(self, level: float | None = None, /, **columns) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band (lo, hi) of the prediction at the given inputs.

        Uses the bootstrap parameter draws; raises InputError if there were none.
        """
        if self.samples is None or len(self.samples) == 0:
            raise InputError("no bootstrap samples: refit with bootstrap > 0")
        level = self.ci_level if level is None else level
        f = _FORMS[self.form]
        cols = _prepare(f, columns, need_loss=False)
        preds = np.array([np.exp(f.log_predict(f.from_params(dict(zip(f.params, s))), cols)[0])
                          for s in self.samples])
        q = (1.0 - level) / 2.0
        return np.quantile(preds, q, axis=0), np.quantile(preds, 1.0 - q, axis=0)

    def to_json(self) -> dict:
        """docs/design.md §7 shape ``{law, params, ci: {name: [lo, hi]}, error: {in_sample, held_out}}``
        plus ``form``, ``reliable``, ``reason``, ``n_points``, ``n_held_out``."""
        return {
            "law": self.law,
            "params": {k: _json_float(v) for k, v in self.params.items()},
            "ci": {k: (None if v is None or not all(map(math.isfinite, v))
                       else [float(v[0]), float(v[1])]) for k, v in self.ci.items()},
            "error": {"in_sample": _json_float(self.in_sample_error),
                      "held_out": _json_float(self.held_out_error)},
            "form": self.form,
            "reliable": bool(self.reliable),
            "reason": self.reason,
            "n_points": int(self.n_points),
            "n_held_out": int(self.n_held_out),
        }


def _json_float(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _huber_objective(form: _Form, cols, logL, delta):
    """f(θ) = Σ H_δ(log L̂ − log L) / (n·δ²) and its gradient (H_δ the Huber function).

    Dividing by n·δ² keeps f of order (mean |r|)/δ ≈ 1 whatever the data size and δ, so
    L-BFGS-B's tolerances mean the same thing for every fit.
    """
    n = logL.size
    scale = 1.0 / (n * delta * delta)

    def fun(theta):
        lp, jac = form.log_predict(theta, cols)
        r = lp - logL
        a = np.abs(r)
        h = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
        psi = np.clip(r, -delta, delta)
        f = float(h.sum()) * scale
        g = (psi @ jac) * scale
        if not np.isfinite(f) or not np.all(np.isfinite(g)):
            return 1e300, np.zeros_like(theta)
        return f, g

    return fun


@functools.lru_cache(maxsize=1)
def _openblas_thread_setters() -> tuple:
    """``openblas_set_num_threads_local`` of every OpenBLAS loaded in this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
    except OSError:
        return ()
    setters = []
    for path in paths:
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        setters.append(fn)
    return tuple(setters)


@contextlib.contextmanager
def _blas_single_thread():
    """Run BLAS single-threaded in this thread only (other threads are unaffected).

    L-BFGS-B on a handful of parameters gains nothing from BLAS threads, and on a busy
    machine OpenBLAS's spinning worker threads make each tiny call ~30x slower.
    """
    previous = [(fn, fn(1)) for fn in _openblas_thread_setters()]
    try:
        yield
    finally:
        for fn, n in previous:
            fn(n)


def _minimise(form, cols, loss, inits, delta, bounds):
    with _blas_single_thread():
        return _minimise_inner(form, cols, loss, inits, delta, bounds)


def _minimise_inner(form, cols, loss, inits, delta, bounds):
    fun = _huber_objective(form, cols, np.log(loss), delta)
    results = []
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    for x0 in inits:
        x0 = np.clip(x0, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
        res = optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                options={"maxiter": 1000, "ftol": 1e-11, "gtol": 1e-8})
        results.append(res)
    return results


def _rows(mask_or_none, n, name):
    if mask_or_none is None:
        return np.zeros(n, dtype=bool)
    m = np.asarray(mask_or_none)
    if m.dtype != bool:
        raise InputError(f"{name} must be a boolean mask")
    if m.shape != (n,):
        raise InputError(f"{name} has {m.size} entries, expected {n}")
    return m


def _holdout_mask(columns, n, holdout, holdout_above):
    mask = _rows(holdout, n, "holdout")
    if holdout_above is not None:
        key = "loops" if "loops" in columns else "mean_recurrence" if "mean_recurrence" in columns else None
        if key is None:
            raise InputError("holdout_above needs a `loops` (or `mean_recurrence`) column")
        mask = mask | (np.asarray(columns[key], dtype=float) > float(holdout_above))
    return mask


def _mare(pred, obs):
    return float(np.mean(np.abs(pred - obs) / obs)) if obs.size else None


def fit_law(
    law: str,
    columns: Mapping[str, object],
    *,
    holdout: np.ndarray | None = None,
    holdout_above: float | None = None,
    restarts: int = 32,
    bootstrap: int = 20,
    seed: int = 0,
    delta: float = 1e-3,
    ci_level: float = 0.95,
    bootstrap_restarts: int = 3,
) -> LawFit:
    """Fit one law to data by Huber-on-log-loss, L-BFGS-B from many seeded starts.

    ``law`` is ``testtime`` (= ``exponential``), ``parcae``, ``unified``, ``routed`` or one of
    the test-time alternatives ``power_shifted``, ``power``, ``pure_power``. ``columns`` maps
    CSV column names to arrays (see :func:`read_law_csv`); ``loss`` is required.
    Rows selected by ``holdout`` (boolean mask) or with ``loops > holdout_above`` (falling back
    to ``mean_recurrence`` when there is no ``loops`` column) are withheld from the fit and
    scored as the held-out error.

    ``restarts`` starting points are drawn (seeded) around data-scaled guesses; the best
    minimum wins. ``bootstrap`` refits on rows resampled with replacement, each from the best
    fit plus ``bootstrap_restarts − 1`` fresh starts, give percentile intervals.
    Raises InputError for missing columns, bad values, or fewer fit points than parameters.
    """
    form = _form(law)
    if restarts < 1:
        raise InputError("restarts must be at least 1")
    if bootstrap < 0:
        raise InputError("bootstrap must be >= 0")
    if not 0.0 < ci_level < 1.0:
        raise InputError("ci_level must be in (0, 1)")
    if not delta > 0:
        raise InputError("delta must be positive")
    cols = _prepare(form, columns, need_loss=True)
    n_all = cols["loss"].size
    held = _holdout_mask(columns, n_all, holdout, holdout_above)
    fit_rows = ~held
    p = len(form.params)
    n = int(fit_rows.sum())
    if n < p:
        raise InputError(
            f"the {form.name} law has {p} parameters but only {n} data point(s) to fit"
            + (f" ({int(held.sum())} held out)" if held.any() else ""))
    for c in form.varying:
        if np.unique(cols[c][fit_rows]).size < 2:
            raise InputError(f"column {c} has a single value in the fitted rows; "
                             f"the {form.name} law needs it to vary")
    sub = {k: v[fit_rows] for k, v in cols.items()}
    loss = sub["loss"]
    rng = np.random.default_rng(seed)
    bounds = form.bounds(sub, loss)
    results = _minimise(form, sub, loss, form.init(sub, loss, rng, restarts), delta, bounds)
    finite = [r for r in results if np.isfinite(r.fun) and r.fun < 1e299]
    if not finite:
        raise InputError(f"the {form.name} law could not be evaluated on this data")
    best = min(finite, key=lambda r: r.fun)
    n_agree = sum(1 for r in finite if r.fun <= best.fun * (1 + 1e-4) + 1e-12)
    converged = bool(best.success) or n_agree >= 2
    theta = best.x
    params = form.to_params(theta)

    pred_all = np.exp(form.log_predict(theta, cols)[0])
    in_err = _mare(pred_all[fit_rows], cols["loss"][fit_rows])
    out_err = _mare(pred_all[held], cols["loss"][held]) if held.any() else None

    samples = None
    ci: dict[str, tuple[float, float] | None] = {k: None for k in form.params}
    if bootstrap > 0:
        draws = []
        for _ in range(bootstrap):
            for _attempt in range(20):
                idx = rng.integers(0, n, n)
                if all(np.unique(sub[c][idx]).size >= 2 for c in form.varying) and np.unique(idx).size >= p:
                    break
            bsub = {k: v[idx] for k, v in sub.items()}
            inits = np.vstack([theta[None, :],
                               form.init(bsub, bsub["loss"], rng, max(bootstrap_restarts - 1, 0))])
            res = _minimise(form, bsub, bsub["loss"], inits, delta, bounds)
            rb = min(res, key=lambda r: r.fun)
            if np.isfinite(rb.fun) and rb.fun < 1e299:
                pb = form.to_params(rb.x)
                draws.append([pb[k] for k in form.params])
        if draws:
            samples = np.array(draws)
            q = (1.0 - ci_level) / 2.0
            lo = np.quantile(samples, q, axis=0)
            hi = np.quantile(samples, 1.0 - q, axis=0)
            ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(form.params)}

    reasons = _reliability(form, theta, params, ci, bounds, converged, best, n, p,
                           bootstrap, samples)
    reasons += _unidentified_terms(form, theta, sub, in_err)
    return LawFit(
        law=form.law, form=form.name, formula=form.formula, params=params, ci=ci,
        in_sample_error=in_err, held_out_error=out_err, n_points=n, n_held_out=int(held.sum()),
        converged=converged, reliable=not reasons, reason="; ".join(reasons) or None,
        objective=float(best.fun), restarts=restarts, bootstrap=bootstrap, ci_level=ci_level,
        samples=samples,
    )


#: A positive parameter whose interval spans more than this factor is "poorly identified";
#: a signed one whose interval is wider than this many times max(|value|, 0.01) likewise.
HUGE_CI_RATIO = 100.0
HUGE_CI_WIDTH = 4.0


def _reliability(form, theta, params, ci, bounds, converged, best, n, p, bootstrap, samples):
    reasons = []
    if not converged:
        reasons.append(f"optimiser did not converge ({best.message})")
    if n == p:
        reasons.append(f"{n} points for {p} parameters: no residual degrees of freedom")
    for i, name in enumerate(form.params):
        lo, hi = bounds[i]
        tol = 1e-6 * (hi - lo)
        if theta[i] <= lo + tol or theta[i] >= hi - tol:
            reasons.append(f"parameter {name} = {params[name]:.4g} is at the edge of its allowed range")
    if bootstrap > 0 and (samples is None or len(samples) < max(2, bootstrap // 2)):
        reasons.append("most bootstrap refits failed")
    for name, iv in ci.items():
        if iv is None:
            continue
        lo, hi = iv
        if name in form.positive:
            if lo <= 0 or hi / lo > HUGE_CI_RATIO:
                reasons.append(f"{name} is poorly identified (interval [{lo:.3g}, {hi:.3g}])")
        elif hi - lo > HUGE_CI_WIDTH * max(abs(params[name]), 0.01):
            reasons.append(f"{name} is poorly identified (interval [{lo:.3g}, {hi:.3g}])")
    return reasons


#: A term whose variation over the fitted rows stays below this fraction of the mean loss
#: (or below twice the fit's mean relative residual, the noise level) cannot be told apart
#: from a constant.
NEGLIGIBLE_TERM = 1e-4


def _unidentified_terms(form, theta, cols, in_sample_error) -> list[str]:
    """Terms the data cannot identify. Each additive term must rise above its own minimum by
    more than the noise at two or more distinct inputs:

    - at none, it is a constant that trades off against ``form.constant`` (e.g. A·N^(−a) with
      a → 0 on data with no N dependence: A and a are meaningless, and E is determined only
      up to the value of that term);
    - at one, it is bent to fit that single row (e.g. Z·e^(−zT) with z ≈ 18 absorbing the
      noise of the T = 1 point), and its coefficients are again arbitrary.

    The noise level is max(NEGLIGIBLE_TERM, 2 · in-sample mean relative error) × mean loss."""
    if form.terms is None:
        return []
    mean_loss = float(np.mean(cols["loss"]))
    floor = max(NEGLIGIBLE_TERM, 2.0 * (in_sample_error or 0.0))
    out = []
    for label, values in form.terms(theta, cols).items():
        rise = (values - values.min()) / mean_loss
        support = np.unique(values[rise > floor]).size
        if support == 0:
            out.append(f"the term {label} changes by only {100 * float(rise.max()):.2g}% of the loss over "
                       f"the data (noise level {100 * floor:.2g}%): it acts as a constant that trades off "
                       f"against {form.constant}, so its coefficients are not identified")
        elif support == 1:
            out.append(f"the term {label} rises above the noise level ({100 * floor:.2g}% of the loss) at a "
                       f"single input: it fits one row, so its coefficients are not identified")
    return out


# -- convenience wrappers -------------------------------------------------------------------

def fit_testtime(loops, loss, *, form: str = "exponential", **kw) -> LawFit:
    """Fit a test-time law L(T) (default the paper's L_inf + Z·exp(−z·T)); see fit_law."""
    if form not in TESTTIME_FORMS:
        raise InputError(f"unknown test-time form {form!r}; choose one of {', '.join(TESTTIME_FORMS)}")
    return fit_law(form, {"loops": loops, "loss": loss}, **kw)


def fit_parcae(params, tokens, loss, **kw) -> LawFit:
    """Fit L(N, D) = E + A·N^(−a) + B·D^(−b) (N unrolled parameters, D tokens); see fit_law."""
    return fit_law("parcae", {"params": params, "tokens": tokens, "loss": loss}, **kw)


def fit_unified(loops, mean_recurrence, params, tokens, loss, **kw) -> LawFit:
    """Fit L(T | μ_rec, D) = E + X·N^(−x) + Y·D^(−y) + Z·exp(−z·T/μ_rec); see fit_law."""
    return fit_law("unified", {"loops": loops, "mean_recurrence": mean_recurrence,
                               "params": params, "tokens": tokens, "loss": loss}, **kw)


def fit_routed(params, experts, loss, **kw) -> LawFit:
    """Fit the Clark et al. routed law log10 L(N, E); see fit_law."""
    return fit_law("routed", {"params": params, "experts": experts, "loss": loss}, **kw)


@dataclass
class TestTimeComparison:
    """All four test-time forms fitted to the same rows, best first.

    Ranked by held-out error when rows were withheld, else by in-sample error.
    """

    __test__ = False  # not a pytest class

    fits: list[LawFit]
    ranked_by: str  # "held_out" or "in_sample"

    @classmethod
    def rank(cls, fits: Sequence[LawFit]) -> "TestTimeComparison":
        """Order fits of the same rows by held-out error (in-sample error if none held out)."""
        by = "held_out" if all(f.held_out_error is not None for f in fits) else "in_sample"
        key = (lambda f: f.held_out_error) if by == "held_out" else (lambda f: f.in_sample_error)
        return cls(sorted(fits, key=key), by)

    @property
    def best(self) -> LawFit:
        return self.fits[0]

    @property
    def order(self) -> list[str]:
        return [f.form for f in self.fits]

    def to_json(self) -> list[dict]:
        return [{"form": f.form, "params": {k: _json_float(v) for k, v in f.params.items()},
                 "error": {"in_sample": _json_float(f.in_sample_error),
                           "held_out": _json_float(f.held_out_error)},
                 "reliable": f.reliable} for f in self.fits]


def compare_testtime(columns: Mapping[str, object] | None = None, *, loops=None, loss=None,
                     **kw) -> TestTimeComparison:
    """Fit exponential, power_shifted, power and pure_power forms; rank by held-out error.

    Pass either ``columns`` (with ``loops`` and ``loss``) or ``loops=`` and ``loss=``;
    other keywords go to :func:`fit_law` (e.g. ``holdout_above=mu_rec``).
    """
    if columns is None:
        columns = {"loops": loops, "loss": loss}
    return TestTimeComparison.rank([fit_law(f, columns, **kw) for f in TESTTIME_FORMS])


# ---------------------------------------------------------------------------------------
# Routed-law derived quantities
# ---------------------------------------------------------------------------------------

def effective_params(n, experts, coeffs: Mapping[str, float] | LawFit) -> np.ndarray:
    """Effective parameter count N̄ of a routed model: the dense N̄ with L(N̄, 1) = L(N, E).

    With ℓ = log10 and Ê₁ = Ê(1) = E_start, L(N̄, 1) is a power law in N̄, so
    ℓN̄ = (ℓL(N, E) − d − b·ℓÊ₁) / (a + c·ℓÊ₁). N̄ = N for E = 1 and, at N = N_cutoff
    (where the law no longer depends on Ê), for every E. Units: parameters.
    """
    p = _coeffs(coeffs)
    lL = np.log10(routed_loss(n, experts, p))
    lE1 = math.log10(p["E_start"])
    slope = p["a"] + p["c"] * lE1
    if slope == 0:
        raise InputError("the dense law L(N, 1) does not depend on N (a + c·log10 E_start = 0)")
    return 10.0 ** ((lL - p["d"] - p["b"] * lE1) / slope)


def n_cutoff(coeffs: Mapping[str, float] | LawFit) -> float:
    """Parameter count past which routing stops helping: the root of ∂log L/∂log Ê = 0.

    The routed law's slope in log10 Ê is b + c·log10 N, so N_cutoff = 10^(−b/c)
    (b < 0, c > 0: routing helps below N_cutoff and hurts above), the definition in Clark et
    al. (2022). Their quoted figures (≈9e11 S-BASE, 8.5e10 RL-R, 8.3e10 HASH) come from
    unrounded coefficients: the three-decimal table values give 1.0e12, 3.2e10 and 2.2e11
    (up to 2.7x off), because −b/c is very sensitive to rounding c (for RL-R, c = 0.012 stands
    for anything in [0.0115, 0.0125], a factor ≈ 7 in N_cutoff). Each quoted figure lies inside
    the range that the rounded b, c allow, and the c it implies rounds to the table's c.
    With c = 0 the slope never changes sign: inf if b < 0 (routing always helps), else 0.
    With c < 0 the root is where routing *starts* helping; it is still returned.
    """
    p = _coeffs(coeffs)
    b, c = float(p["b"]), float(p["c"])
    if c == 0:
        return math.inf if b < 0 else 0.0
    root = -b / c
    return math.inf if root > 308 else float(10.0**root)


# ---------------------------------------------------------------------------------------
# Power laws and isoFLOP profiles
# ---------------------------------------------------------------------------------------

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
    alpha, lnk = np.polyfit(lx, ly, 1)
    resid = ly - (alpha * lx + lnk)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    ci = None
    if lx.size > 2:
        s2 = float(np.sum(resid**2)) / (lx.size - 2)
        se = math.sqrt(s2 / float(np.sum((lx - lx.mean()) ** 2)))
        t = float(stats.t.ppf(0.5 + ci_level / 2.0, lx.size - 2))
        ci = (float(alpha - t * se), float(alpha + t * se))
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


# ---------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------

def read_law_csv(path: str | Path, law: str | None = None) -> dict[str, np.ndarray]:
    """Read a CSV with a header row into ``{column: float array}``.

    Known columns (``loops, mean_recurrence, params, tokens, experts, flops, loss``) are
    returned; others are ignored. With ``law`` given, that law's columns and ``loss`` must
    be present and every value in them a finite positive number (errors name the column and
    the line), and there must be at least as many rows as the law has parameters. Columns a
    law does not need are read leniently (unparseable cells become NaN).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a CSV file")
    required: tuple[str, ...] = ()
    if law is not None:
        form = _form(law)
        required = form.columns + ("loss",)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text CSV file") from None
    reader = csv.reader(line for line in text.splitlines())
    rows = [(i + 1, r) for i, r in enumerate(reader) if r and any(c.strip() for c in r)
            and not r[0].lstrip().startswith("#")]
    if not rows:
        raise InputError(f"{path} is empty (expected a header row)")
    header = [h.strip().lower() for h in rows[0][1]]
    data = rows[1:]
    missing = [c for c in required if c not in header]
    if missing:
        have = ", ".join(h for h in header if h) or "none"
        raise InputError(f"{path}: the {law} law needs column(s) {', '.join(missing)} "
                         f"(found: {have})")
    if not data:
        raise InputError(f"{path} has a header but no data rows")
    out: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        if name not in header:
            continue
        j = header.index(name)
        strict = name in required
        vals = np.empty(len(data))
        for k, (lineno, r) in enumerate(data):
            cell = r[j].strip() if j < len(r) else ""
            try:
                v = float(cell)
            except ValueError:
                if strict:
                    shown = repr(cell) if cell else "empty"
                    raise InputError(f"{path} line {lineno}: {name} is {shown}, not a number") from None
                v = math.nan
            if strict and not math.isfinite(v):
                raise InputError(f"{path} line {lineno}: {name} is {cell}, not a finite number")
            if strict and v <= 0:
                raise InputError(f"{path} line {lineno}: {name} must be positive, got {cell}")
            vals[k] = v
        out[name] = vals
    if law is not None:
        p = len(_form(law).params)
        if len(data) < p:
            raise InputError(f"{path}: the {law} law has {p} parameters but the file has only "
                             f"{len(data)} data row(s)")
        if "experts" in required and np.any(out["experts"] < 1):
            k = int(np.argmax(out["experts"] < 1))
            raise InputError(f"{path} line {data[k][0]}: experts must be >= 1")
    return out
