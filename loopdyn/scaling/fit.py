"""Fitting a scaling law: Huber on log-loss, L-BFGS-B from many seeded starts, bootstrap
intervals, and an honest `reliable` flag (docs/design.md §7).

Fitting follows the papers (Hoffmann et al. 2022 style, as used by Parcae): minimise the
Huber loss (δ = 1e-3 by default) of the log-loss residuals r_i = log L̂_i − log L_i with
L-BFGS-B (``scipy.optimize.minimize``, analytic gradients) from many seeded starting points,
keeping the best. Positive quantities are fitted through their logarithm. Confidence
intervals come from a seeded bootstrap over the fitted rows (percentile intervals). The
forms themselves are in `loopdyn.scaling.forms`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from loopdyn.dynamics.numbers import num
from loopdyn.models.errors import InputError
from loopdyn.scaling.forms import _FORMS, TESTTIME_FORMS, _Form, _form, _prepare, predict_law

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
            "params": {k: num(v) for k, v in self.params.items()},
            "ci": {k: (None if v is None or not all(map(math.isfinite, v))
                       else [float(v[0]), float(v[1])]) for k, v in self.ci.items()},
            "error": {"in_sample": num(self.in_sample_error),
                      "held_out": num(self.held_out_error)},
            "form": self.form,
            "reliable": bool(self.reliable),
            "reason": self.reason,
            "n_points": int(self.n_points),
            "n_held_out": int(self.n_held_out),
        }


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
def _threadpools():
    """threadpoolctl's view of the BLAS and OpenMP libraries loaded in this process (found once)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _blas_single_thread():
    """Run BLAS single-threaded while fitting (threadpoolctl; restored afterwards).

    L-BFGS-B on a handful of parameters gains nothing from BLAS threads, and on a busy
    machine OpenBLAS's spinning worker threads make each tiny call ~30x slower. The limit is
    process-wide while it lasts (BLAS has no per-thread setting threadpoolctl exposes)."""
    return _threadpools().limit(limits=1, user_api="blas")


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


def holdout_mask(columns, n: int | None = None, holdout=None, holdout_above: float | None = None) -> np.ndarray:
    """The rows withheld from a fit: the boolean mask `holdout`, or-ed with the rows whose
    `loops` (else `mean_recurrence`) exceed `holdout_above`; `n` rows (default: the loss's)."""
    n = len(columns["loss"]) if n is None else n
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
    held = holdout_mask(columns, n_all, holdout, holdout_above)
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
        return [{"form": f.form, "params": {k: num(v) for k, v in f.params.items()},
                 "error": {"in_sample": num(f.in_sample_error),
                           "held_out": num(f.held_out_error)},
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
