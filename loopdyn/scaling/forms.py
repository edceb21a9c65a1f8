"""Functional forms of the scaling laws, their inputs, and prediction (docs/design.md §7).

Laws (parameter names as in shared/reference/paper-facts.md and docs/design.md §7):

- ``testtime`` (Parcae, test-time compute): L(T) = L_inf + Z·exp(−z·T), where T is the
  number of loops run at evaluation. Alternative forms, for comparison only:
  ``power_shifted`` L_inf + Z·(1+T)^(−z), ``power`` L_inf + Z·T^(−z), ``pure_power`` Z·T^(−z).
- ``parcae`` (training law): L(N, D) = E + A·N^(−a) + B·D^(−b), with N the parameter count
  of the fully unrolled model (CSV column ``params``) and D the training tokens (``tokens``).
- ``unified``: L(T | μ_rec, D) = E + X·N(μ_rec)^(−x) + Y·D^(−y) + Z·exp(−z·T/μ_rec).
- ``routed`` (Clark et al. 2022): log10 L = a·log10 N + b·log10 Ê + c·log10 N·log10 Ê + d,
  with the saturating expert count 1/Ê = 1/(E − 1 + (1/E_start − 1/E_max)^(−1)) + 1/E_max;
  :func:`effective_params` and :func:`n_cutoff` are derived from it.

Losses are in nats per token; N in parameters; D in tokens; T and μ_rec in loops. Each form
gives log L̂ and its Jacobian in the fit space θ (`loopdyn.scaling.fit` fits them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from loopdyn.models.errors import InputError

if TYPE_CHECKING:
    from loopdyn.scaling.fit import LawFit

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


def routed_loss(n, experts, coeffs: Mapping[str, float] | LawFit) -> np.ndarray:
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
    """Coefficients from a mapping or from a fit result (anything with a `params` mapping)."""
    return dict(c) if isinstance(c, Mapping) else dict(c.params)


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
