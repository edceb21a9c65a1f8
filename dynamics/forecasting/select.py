"""Judge every model, select the one that decides, and build the Forecast (docs/design.md §4).

Hindcast (the same for every model): with w = min(3, ⌊(T−1)/2⌋) and t₀ = T − w, each model is built
from what was known at loop t₀ and propagates r_{t₀} to loops t₀+1..T; its hindcast error is
max_t ‖r̂_t − r_t‖ / max(‖r_t‖, round-off). A model *reproduces the past* when the error is ≤
`HINDCAST_TOL`.

Selection (one model decides): if the LTI model reproduces the past to `EXACT_HINDCAST`, the loop is
its LTI part to measurement precision and that model decides. Otherwise the candidates are the models
that reproduce the past about as well as the best one (error ≤ max(3 × best, 0.05)); among them the
one with the most severe verdict decides (an invisible unstable mode is not outvoted by a model that
does not know it), then the lowest error. Curve, rate, safe-loop count and verdict are all that one
model's; the others are evidence. The verdict rules themselves are `loopdyn.dynamics.verdict`'s.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from loopdyn.dynamics.forecasting.common import hindcast_window
from loopdyn.dynamics.forecasting.large_state import large_state_floor
from loopdyn.dynamics.forecasting.result import (BAND_PER_ERROR, EXACT_HINDCAST, HINDCAST_TOL, MODEL_ORDER, OVERFLOW,
                                                 SAFE_WIDEN, SELECT_BAND, Forecast, ForecastModel, LargeState)
from loopdyn.dynamics.numbers import fmt
from loopdyn.dynamics.verdict import (GROWTH_AT_CROSSING, UNIT_BAND, Verdict, large_state_unstable, loop_verdict,
                                      lti_exit_loop, model_verdict, nonfinite_verdict)


def _loops(n: int) -> str:
    return f"{n} loop" if n == 1 else f"{n} loops"


def judge(m: ForecastModel, T: int, H: int, limit_fn, settle_tol: float, w: int = 1) -> ForecastModel:
    """A model's own verdict, safe-loop crossing and settling loop; returns a judged copy of `m`.

    Safe region: loop t is safe when the state is finite and ‖ĥ_t‖ ≤ limit_fn(m) (explosion_factor ×
    the state at the trained depth). `first_unsafe` is the first loop the prediction leaves it;
    `safe_bound` the same for the prediction widened by its hindcast error e, ×(1 + e)^{j/w} at loop
    T + j (at most ×SAFE_WIDEN) — max_safe_loops is a bound. The verdict is
    `verdict.model_verdict(rate, crossing, burst)` (burst: the residual exceeds GROWTH_AT_CROSSING ×
    ‖r_T‖ by the crossing). For a fitted rate the unit band widens with the hindcast error e over w
    loops to max(UNIT_BAND, e / 4w): a modulus error δ shows as a relative error ≈ wδ after w loops
    (the factor 4: most of a hindcast error is direction, not modulus), so a rate that close to 0 is
    not resolved. `settle_loops` (stable only): the first loop whose predicted relative residual is
    ≤ settle_tol, extrapolated at the model's rate past the horizon."""
    J = H - T
    band = max(UNIT_BAND, m.hindcast_error / (BAND_PER_ERROR * max(w, 1))) if m.checked and not m.exact_rate \
        else UNIT_BAND
    safe_limit = limit_fn(m)
    first = None
    if J > 0:
        s = m.state_norm[1: J + 1]
        bad = ~np.isfinite(s) | (s > min(safe_limit, OVERFLOW))
        hit = np.nonzero(bad)[0]
        if hit.size:
            first = int(hit[0]) + 1
    first_unsafe = None if first is None else T + first
    # the bound for max_safe_loops: the prediction widened by (1 + e)^(j/w), at most SAFE_WIDEN
    safe_bound = first_unsafe
    if J > 0 and m.checked and m.hindcast_error > 0:
        j = np.arange(1, J + 1, dtype=float)
        u = np.minimum((1 + m.hindcast_error) ** (j / max(w, 1)), SAFE_WIDEN)
        with np.errstate(over="ignore", invalid="ignore"):
            s = m.state_norm[1: J + 1] * u
        hit = np.nonzero(~np.isfinite(s) | (s > min(safe_limit, OVERFLOW)))[0]
        if hit.size:
            safe_bound = T + int(hit[0]) + 1
    burst = first is not None and (not np.isfinite(m.residual[first]) or
                                   np.nanmax(m.residual[1: first + 1]) > GROWTH_AT_CROSSING * max(m.residual[0], 1e-300))
    verdict = model_verdict(m.rate, crossing=first_unsafe, burst=burst, band=band)[0]
    settle = None
    if verdict == Verdict.STABLE:
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(m.total_norm > 0, m.residual / m.total_norm, 0.0)
        above = np.nonzero(~(rel[: J + 1] <= settle_tol))[0]  # loops T + j not settled (NaN counts)
        if not above.size:
            settle = T
        elif above[-1] < J:
            settle = T + int(above[-1]) + 1
        else:
            last = rel[J] if J > 0 else rel[0]
            extra = math.ceil(math.log(settle_tol / max(last, 1e-300)) / m.rate) if m.rate < 0 else 0
            settle = H + max(extra, 1) if J > 0 else T + max(extra, 1)
    return replace(m, band=band, safe_limit=safe_limit, first_unsafe=first_unsafe, safe_bound=safe_bound,
                   verdict=verdict, settle_loops=settle, used=(not m.checked) or m.hindcast_error <= HINDCAST_TOL)


def select(models: list[ForecastModel]) -> tuple[ForecastModel, str]:
    """The deciding model and why (selection: module docstring)."""
    fallback = next((m for m in models if m.name == "measured"), None)
    models = [m for m in models if m.name != "measured"]
    if not models and fallback is not None:
        return fallback, "no linear model could be built"
    exact = [m for m in models if m.name == "LTI" and m.checked and m.hindcast_error <= EXACT_HINDCAST]
    if exact:
        return exact[0], "the LTI part reproduces the measured loops to measurement precision"
    checked = [m for m in models if m.checked]
    good = [m for m in checked if m.hindcast_error <= HINDCAST_TOL]
    if good:
        best = min(m.hindcast_error for m in good)
        band = max(SELECT_BAND[0] * best, SELECT_BAND[1])
        cands = [m for m in good if m.hindcast_error <= band]
        why = (f"reproduces the measured residuals within {fmt(min(cands, key=lambda m: m.hindcast_error).hindcast_error)}"
               if len(cands) == 1 else
               f"{len(cands)} models reproduce the measured residuals about equally well "
               f"(within {fmt(band)}); the most cautious decides")
    elif [m for m in models if not m.checked]:
        cands = [m for m in models if not m.checked]
        why = "too few measured loops to hindcast"
    else:
        best = min(checked, key=lambda m: m.hindcast_error)
        if fallback is not None:
            return fallback, (f"no linear model reproduces the measured residual vectors within {HINDCAST_TOL:g} "
                              f"(best: {best.name}, {fmt(best.hindcast_error)}): the motion is not linear about a "
                              f"fixed point, so the measured norms decide")
        return best, (f"no model reproduces the measured residuals within {HINDCAST_TOL:g}; the best "
                      f"({fmt(best.hindcast_error)}) decides")
    pick = max(cands, key=lambda m: (Verdict(m.verdict).severity, -(m.hindcast_error if m.checked else 1e9),
                                     -MODEL_ORDER.get(m.name, 9)))
    return pick, why


def nonfinite_forecast(traj, horizon: int, explosion_factor: float = 10.0, nonfinite_weights=None,
                       extra_evidence=None, models=(), mean_loops: int = 0) -> Forecast:
    """The verdict for non-finite weights or states: explosive, no forecast needed."""
    T, H = traj.n_loops, int(horizon)
    bad_t = traj.nonfinite_at
    first = 1 if nonfinite_weights and bad_t is None else max(bad_t or 1, 1)
    norms, rel = np.full(H, math.nan), np.full(H, math.nan)
    upto = min(first - 1, T, H)
    norms[:upto] = traj.state_norm[1: upto + 1]
    rel[:upto] = traj.rel_residual[1: upto + 1]
    why = []
    if nonfinite_weights:
        names = ", ".join(nonfinite_weights[:4]) + (" …" if len(nonfinite_weights) > 4 else "")
        why.append(f"non-finite: {len(nonfinite_weights)} parameter(s) hold NaN/Inf ({names})")
    if bad_t is not None:
        why.append(f"non-finite: the state holds NaN/Inf at loop {bad_t}"
                   + (" (the loop overflows at the first step)" if bad_t <= 1 else ""))
    return Forecast(nonfinite_verdict("")[0], math.nan, max(first - 1, 0), H, T, norms, rel, math.nan,
                    why + list(extra_evidence or []), "non-finite", UNIT_BAND, explosion_factor, list(models),
                    trained_depth=int(mean_loops or T))


def combine(traj, models, horizon: int, explosion_factor: float = 10.0, settle_tol: float = 1e-2,
            extra_evidence: list[str] | None = None, nonfinite_weights: list[str] | None = None, *,
            mean_loops: int | None = None, large: LargeState | None = None) -> Forecast:
    """Judge every model, select the deciding one, apply the verdict rules (`verdict.loop_verdict`:
    the large-state limit, never stable past the safe-loop bound) and build the Forecast. The safe
    region is measured against N_ref = ‖h_μ‖, the state at the trained depth μ = mean_loops (the
    deciding model's prediction when μ > T). With non-finite weights or states: `explosive`."""
    T, H = traj.n_loops, int(horizon)
    if nonfinite_weights or traj.nonfinite_at is not None:
        return nonfinite_forecast(traj, H, explosion_factor, nonfinite_weights, extra_evidence,
                                  [m for m in models if m is not None], mean_loops or T)
    models = [m for m in models if m is not None]
    mu = int(mean_loops) if mean_loops else T
    extra = list(extra_evidence or [])
    measured = traj.state_norm

    def ref_of(m: ForecastModel) -> float:
        if mu <= T:
            return float(measured[mu])
        j = mu - T
        v = float(m.state_norm[j]) if j < len(m.state_norm) else math.nan
        return v if math.isfinite(v) and v > 0 else float(measured[T])

    def limit_of(m: ForecastModel) -> float:
        return explosion_factor * max(ref_of(m), 1e-30)

    w = max(hindcast_window(T), 1)
    if large is not None:
        models = [large_state_floor(m, large) for m in models]
    models = [judge(m, T, H, limit_of, settle_tol, w) for m in models]
    if not models:  # nothing to extrapolate with (a single measured loop): the measurement only
        m = ForecastModel("trajectory", np.array([traj.total_norm[T]]), np.array([traj.total_residual[T]]),
                          np.array([measured[T]]), 0.0, np.zeros(0, complex), "one measured loop: no model")
        H = max(H, T)
        models = [judge(m, T, T, limit_of, settle_tol)]
    pick, why = select(models)
    limit = pick.safe_limit
    # the measured loops past the trained depth first
    first_unsafe = None
    crossing_by = None
    for t in range(mu + 1, min(T, H) + 1):
        if not np.isfinite(measured[t]) or measured[t] > limit:
            first_unsafe = t
            break
    verdict, reason = Verdict(pick.verdict), ""
    if first_unsafe is not None:  # the measured state already left the safe region
        burst = traj.total_residual[first_unsafe] > GROWTH_AT_CROSSING * traj.total_residual[mu] if mu >= 1 else True
        if verdict != Verdict.EXPLOSIVE:
            verdict, reason = model_verdict(pick.rate, crossing=first_unsafe, burst=burst, band=pick.band)
        bound = first_unsafe
    else:
        first_unsafe = pick.first_unsafe
        # the safe-loop count is a bound: the earliest loop at which the deciding model or any other model
        # that reproduces the past, its prediction widened by its hindcast error, could leave the safe region
        bound = pick.safe_bound
        for m in models:
            if m is not pick and m.used and m.checked and m.name != "measured" and m.safe_bound is not None \
                    and (bound is None or m.safe_bound < bound):
                bound, crossing_by = m.safe_bound, m.name
        if bound is not None and crossing_by is None and bound != first_unsafe:
            crossing_by = pick.name
    max_safe = H if bound is None else min(bound - 1, H)
    large_rho = large.spectral_radius if large is not None and large.limit_is_lti else None
    lti_exit = lti_exit_loop(float(measured[T]), limit, math.log(large_rho), T) \
        if large_state_unstable(large_rho) else None
    before = verdict
    verdict, why_final = loop_verdict((verdict, reason), horizon=H, max_safe_loops=max_safe,
                                      settles=pick.settle_loops is not None, band=pick.band,
                                      large_state_radius=large_rho, leaves_past_horizon=first_unsafe is None,
                                      lti_exit=lti_exit)
    large_txt = None if verdict == before else (f"large-state limit: {why_final}" if large_rho is not None
                                                else f"verdict: {why_final}")

    # curves in state_norm units, loops 1..H
    J = H - T
    state, rel = np.empty(H), np.empty(H)
    upto = min(T, H)
    state[:upto] = measured[1: upto + 1]
    rel[:upto] = traj.rel_residual[1: upto + 1]
    if J > 0:
        state[T:] = pick.state_norm[1: J + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel[T:] = np.where(pick.total_norm[1: J + 1] > 0, pick.residual[1: J + 1] / pick.total_norm[1: J + 1], 0.0)

    # evidence, the deciding model first
    rate_txt = f"rate {fmt(pick.rate)}/loop (unit band ±{fmt(UNIT_BAND)})"
    if first_unsafe is not None and first_unsafe <= T:
        outcome = (f"the measured state already exceeds {explosion_factor:g}× ‖h_{mu}‖ at loop {first_unsafe} "
                   f"(‖h‖ {fmt(measured[first_unsafe])} vs limit {fmt(limit)})")
    elif first_unsafe is not None:
        how = "grows geometrically" if pick.rate > pick.band else "drifts" if verdict != Verdict.EXPLOSIVE else \
            "is carried by a bounded transient" if pick.rate < -pick.band else "bursts (transient growth)"
        outcome = (f"the state {how} past {explosion_factor:g}× the state at the trained depth (‖h_{mu}‖) at loop "
                   f"{first_unsafe}; {rate_txt}")
    elif verdict == "explosive":
        outcome = f"safe through {_loops(H)}, but it grows geometrically past the horizon ({rate_txt})"
    elif verdict == "stable":
        outcome = f"bounded and converging ({rate_txt}); it settles (relative residual ≤ {settle_tol:g}) by loop " \
                  f"{pick.settle_loops}"
    else:
        lead = pick.eigenvalues[0] if len(pick.eigenvalues) else None
        outcome = (f"bounded or sub-geometric but not converging within the unit band ({rate_txt}"
                   + (f"; leading eigenvalue {fmt(complex(lead))}" if lead is not None else "") + ")")
    hind = "" if not pick.checked else f"; hindcast error {fmt(pick.hindcast_error)}"
    evidence = [f"{pick.name}: {pick.detail}; {outcome} [selected: {why}{hind}]"]
    if crossing_by is not None:
        evidence.append(f"safe-loop count: safe through {max_safe} loops — {crossing_by}'s prediction (it reproduces "
                        f"the past), widened by its hindcast error (×(1 + e)^(j/w), at most ×{SAFE_WIDEN:g}), could "
                        f"leave the safe region at loop {bound}")
    if large_txt:
        evidence.append(large_txt)
    for m in models:
        if m is pick or (m.name == "measured" and m is not pick):
            continue
        h_txt = "not hindcast" if not m.checked else f"hindcast error {fmt(m.hindcast_error)}" + \
            ("" if m.used else f" > {HINDCAST_TOL:g}: does not reproduce the past, not used")
        evidence.append(f"{m.name}: {m.detail}; its verdict {m.verdict}, rate {fmt(m.rate)}/loop ({h_txt})")
    if large is not None and large.text:
        evidence.append(f"large-state limit: {large.text}")
    evidence += extra
    lead_src = next((m for m in models if m.name == "Jacobian" and len(m.eigenvalues)), pick)
    return Forecast(verdict, pick.rate, max_safe, H, T, state, rel, limit, evidence, pick.name, UNIT_BAND,
                    explosion_factor, models, pick.settle_loops if verdict == "stable" else None,
                    np.asarray(lead_src.eigenvalues), lead_src.name, large, mu)
