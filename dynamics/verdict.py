"""One vocabulary for every verdict loopdyn gives, and one table of the rules behind it.

Three verdicts, each a `str` enum (JSON and text keep the plain strings):

* `Verdict` — what the loop does as the loop count grows (audit, forecast, normalised loop):
  ``stable`` | ``marginal`` | ``explosive`` with the meanings of docs/design.md §4;
* `Outcome` — how a training run of `loopdyn compare` ended: ``converged`` | ``inconclusive`` |
  ``residual explosion`` | ``diverged``;
* `RunStatus` — the one-line verdict on a monitored training run: ``ok`` | ``warned`` | ``failed``.

Every threshold a verdict depends on is a module constant below (the table); every decision is
a pure predicate returning ``(verdict, reason)`` (the reason is one plain sentence), in the
style of SciPy's ``_status_message`` and Lightning's ``(decision, reason)``. `criteria()` and
`css_class()` give the HTML/text reports their criteria text and colours from the same table.

Invariants of the loop verdict (property-tested in tests/test_verdict.py):
non-finite ⇒ explosive; a state that leaves the safe region within the horizon ⇒ explosive unless
it drifts out sub-geometrically (a mode on the unit circle, no growing residual: marginal, and the
reason names the loop); ρ(Ā) > 1 behind a core that fades at large states ⇒ explosive; ``stable``
only when the forecast settles and stays in the safe region through the horizon.
"""
from __future__ import annotations

import math
from enum import Enum

try:  # Python ≥ 3.11
    from enum import StrEnum
except ImportError:  # pragma: no cover - Python 3.10
    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Verdict(StrEnum):
    """What the loop does as loops grow (docs/design.md §4)."""

    STABLE = "stable"  # bounded and converging to a fixed point (however slowly)
    MARGINAL = "marginal"  # bounded or sub-geometric, not converging (cycle, unit-circle mode, drift)
    EXPLOSIVE = "explosive"  # geometric growth, a transient out of the safe region, or non-finite values

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Verdict.STABLE: 0, Verdict.MARGINAL: 1, Verdict.EXPLOSIVE: 2}


class Outcome(StrEnum):
    """How a `loopdyn compare` training run ended (criteria: `criteria()`)."""

    CONVERGED = "converged"
    INCONCLUSIVE = "inconclusive"
    RESIDUAL_EXPLOSION = "residual explosion"
    DIVERGED = "diverged"


class RunStatus(StrEnum):
    """The one-line verdict on a (monitored) training run."""

    OK = "ok"
    WARNED = "warned"
    FAILED = "failed"


# ---- the table ---------------------------------------------------------------------------------------
# loop verdicts (dynamics.forecast, dynamics.audit)
EXPLOSION_FACTOR = 10.0  # safe region: finite and ‖h_t‖ ≤ EXPLOSION_FACTOR · ‖h_μ‖ (μ the trained depth)
UNIT_BAND = 2e-3  # nats/loop: |rate| ≤ this is a mode on the unit circle (|λ| within 0.2% of 1)
GROWTH_AT_CROSSING = 2.0  # residual growth (× ‖r_T‖) by the loop the state leaves the safe region: a burst
SETTLE_TOL = 1e-2  # relative residual ‖r_t‖/‖h_t‖ at or below which the state has settled
# normalised loops (dynamics.normalised)
PRE_NORM_RATE_TOL = 1e-2  # the pre-norm state growing by more than ×(1 + this) per loop is geometric growth
# training outcomes (loopdyn compare)
DIVERGE_MARGIN = 0.5  # nats
EXPLOSION_LOOPS = 4  # state norms are measured up to EXPLOSION_LOOPS · μ_rec loops
EXPLOSION_RATIO = 10.0  # ‖h_{4μ}‖ / ‖h_μ‖ above this is a residual explosion
MARGINAL_RATIO = 1.5  # above this (and not an explosion) the state "grows with loops" (a note)
STEEP_T = 2.0  # the last quarter's mean loss this many standard errors below the previous quarter's …
STEEP_DROP = 0.02  # … and at least this many nats lower: still falling steeply
MIN_TREND_STEPS = 8  # fewer steps cannot show a trend

# the report's colours: one CSS class per verdict word, one colour per class
_CLASS = {Verdict.STABLE: "ok", Verdict.MARGINAL: "wait", Verdict.EXPLOSIVE: "bad",
          Outcome.CONVERGED: "ok", Outcome.INCONCLUSIVE: "wait", Outcome.RESIDUAL_EXPLOSION: "bad",
          Outcome.DIVERGED: "bad", RunStatus.OK: "ok", RunStatus.WARNED: "wait", RunStatus.FAILED: "bad"}
COLOURS = {"ok": "#d9efe6", "wait": "#ececec", "bad": "#f7dccb"}


def css_class(word: str) -> str:
    """The report's CSS class ("ok" | "wait" | "bad") of any verdict word; "" for an empty or unknown one."""
    for enum in (Verdict, Outcome, RunStatus):
        try:
            return _CLASS[enum(word)]
        except ValueError:
            continue
    return ""


def colour(word: str) -> str | None:
    """The background colour of a verdict word in the reports (None: no colour)."""
    return COLOURS.get(css_class(word))


def criteria() -> dict[str, str]:
    """The `loopdyn compare` outcome criteria, in the words of `summary.json` (key "criteria")."""
    return {
        Outcome.DIVERGED.value:
            f"non-finite loss; or final smoothed loss > best smoothed loss + {DIVERGE_MARGIN} nats; or final "
            f"validation loss not below the unigram baseline while the training loss stalled more than "
            f"{DIVERGE_MARGIN} nats above it",
        Outcome.RESIDUAL_EXPLOSION.value:
            f"not diverged, and a state norm is non-finite for T ≤ {EXPLOSION_LOOPS}·μ_rec "
            f"or ‖h_{{{EXPLOSION_LOOPS}μ}}‖/‖h_μ‖ > {EXPLOSION_RATIO:g}",
        Outcome.INCONCLUSIVE.value:
            f"too short to judge: not diverged, no explosion, the final validation loss not yet below the "
            f"unigram baseline, and the training loss still falling steeply (last quarter of the steps "
            f"≥ {STEEP_DROP} nats and {STEEP_T:g} standard errors below the quarter before) or resting on "
            f"the unigram plateau (within {DIVERGE_MARGIN} nats), or fewer than {MIN_TREND_STEPS} steps",
        Outcome.CONVERGED.value: "otherwise",
    }


def verdict_criteria(explosion_factor: float = EXPLOSION_FACTOR) -> dict[str, str]:
    """The loop verdicts' criteria (docs/design.md §4), for reports."""
    return {
        Verdict.EXPLOSIVE.value:
            f"non-finite values; geometric growth (rate > {UNIT_BAND:g} nats/loop); or a state that leaves the "
            f"safe region (‖h‖ ≤ {explosion_factor:g}·‖h_μ‖) within the horizon other than by drift; or "
            f"ρ(Ā) > 1 behind a core that fades at large states",
        Verdict.MARGINAL.value:
            f"bounded or sub-geometric but not converging (|rate| ≤ {UNIT_BAND:g} nats/loop: a cycle, a mode on "
            f"the unit circle, drift — a drift that leaves the safe region names the loop)",
        Verdict.STABLE.value:
            f"bounded and converging (rate < −{UNIT_BAND:g} nats/loop), settling to relative residual "
            f"≤ {SETTLE_TOL:g}, safe through the horizon",
    }


def _loops(n: int) -> str:
    return f"{n} loop" if n == 1 else f"{n} loops"


# ---- loop verdicts ---------------------------------------------------------------------------------

def nonfinite_verdict(where: str) -> tuple[Verdict, str]:
    """Non-finite weights or states: always explosive."""
    return Verdict.EXPLOSIVE, f"non-finite: {where}"


def model_verdict(rate: float, *, crossing: int | None = None, burst: bool = False,
                  band: float = UNIT_BAND) -> tuple[Verdict, str]:
    """One prediction's verdict from its asymptotic rate (nats/loop) and the loop `crossing` at which
    it leaves the safe region within the horizon (None: it does not); `burst` = the residual grew
    by more than GROWTH_AT_CROSSING × ‖r_T‖ by then.

    Leaving the safe region is explosive when the state bursts out, grows geometrically
    (rate > band) or is carried out by a bounded transient (rate < −band: it converges, to a state
    outside the safe region — e.g. a non-normal Ā's distant fixed point); only a drift (|rate| ≤
    band, no burst) that leaves it is marginal. Within the safe region: rate > band is explosive
    (geometric growth past the horizon), |rate| ≤ band marginal, else stable."""
    if crossing is not None:
        if burst:
            return Verdict.EXPLOSIVE, f"the state bursts out of the safe region at loop {crossing} (transient growth)"
        if rate > band:
            return Verdict.EXPLOSIVE, f"the state grows geometrically out of the safe region at loop {crossing}"
        if rate < -band:
            return Verdict.EXPLOSIVE, (f"a bounded transient carries the state out of the safe region at loop "
                                       f"{crossing} (it converges, outside the safe region)")
        return Verdict.MARGINAL, f"the state drifts out of the safe region at loop {crossing}"
    if rate > band:
        return Verdict.EXPLOSIVE, "safe through the horizon, but it grows geometrically past it"
    if rate >= -band:
        return Verdict.MARGINAL, "bounded or sub-geometric but not converging (a mode on the unit circle)"
    return Verdict.STABLE, "bounded and converging"


def lti_exit_loop(state: float, limit: float, rate: float, start: int) -> int | None:
    """The loop at which a state of norm `state` at loop `start`, growing at `rate` nats/loop (the LTI
    rate log ρ(Ā)), first exceeds `limit`: start + ⌈log(limit/state)/rate⌉ (None if it never does)."""
    if not (rate > 0 and state > 0 and math.isfinite(limit)):
        return None
    if state > limit:
        return start
    return start + max(1, math.ceil(math.log(limit / state) / rate))


def large_state_unstable(radius: float | None) -> bool:
    """ρ(Ā) of a loop that tends to Ā at large states is above 1 beyond the unit band (log ρ > UNIT_BAND):
    such a loop is explosive (docs/design.md §4). None: the large-state limit is not Ā."""
    return radius is not None and math.isfinite(radius) and radius > 0 and math.log(radius) > UNIT_BAND


def loop_verdict(model: tuple[Verdict, str], *, horizon: int, max_safe_loops: int,
                 settles: bool, rate: float = math.nan, band: float = UNIT_BAND,
                 large_state_radius: float | None = None, leaves_past_horizon: bool = False,
                 lti_exit: int | None = None) -> tuple[Verdict, str]:
    """The forecast's verdict from the deciding model's own `(verdict, reason)` and the forecast's
    numbers, so that the verdict never contradicts them (docs/design.md §4):

    * large_state_radius = ρ(Ā) when the loop tends to its LTI part at large states (a core that
      fades there, e.g. pre-norm), else None. ρ(Ā) > 1 ⇒ explosive: a large enough state grows like
      ρ(Ā)ᵗ whatever the core does at this one (`lti_exit`: the loop at which a state growing at
      that rate from h_T leaves the safe region). ρ(Ā) < 1 and explosive only by growth past the
      horizon (`leaves_past_horizon`) ⇒ marginal: that growth saturates.
    * max_safe_loops < horizon ⇒ never stable (the safe-loop bound says it could leave).
    * stable only when the forecast settles (`settles`)."""
    verdict, reason = model
    if large_state_unstable(large_state_radius):
        if verdict != Verdict.EXPLOSIVE:
            where = f"; from ‖h_T‖ at that rate it leaves the safe region at loop {lti_exit}" if lti_exit else ""
            return Verdict.EXPLOSIVE, (f"ρ(Ā) = {large_state_radius:.3g} > 1 and the core fades at large states: "
                                       f"a large enough state grows like ρ(Ā)ᵗ (the core only holds this one)"
                                       f"{where}")
        return verdict, reason
    if large_state_radius is not None and large_state_radius < 1.0 and verdict == Verdict.EXPLOSIVE \
            and leaves_past_horizon:
        return Verdict.MARGINAL, (f"ρ(Ā) = {large_state_radius:.3g} < 1 and the core fades at large states: the "
                                  f"growth past the horizon saturates (bounded, not converging)")
    if verdict == Verdict.STABLE and max_safe_loops < horizon:
        return Verdict.MARGINAL, (f"converging by the forecast, but the safe-loop bound ends at loop "
                                  f"{max_safe_loops} of {horizon}: it could leave the safe region at loop "
                                  f"{max_safe_loops + 1}")
    if verdict == Verdict.STABLE and not settles:
        return Verdict.MARGINAL, "converging, but the forecast does not settle"
    return verdict, reason


def audit_verdict(forecast: tuple[Verdict, str], normalised: tuple[Verdict, str] | None = None,
                  broken: bool = False) -> tuple[Verdict, str]:
    """The audit's verdict: the forecast's, except for a loop that renormalises its state inside the step,
    whose ‖h‖ is flat by construction — its verdict comes from the normalised-loop analysis
    (`normalised_verdict`: what the norm hides). Non-finite weights or states keep the forecast's
    (explosive)."""
    if normalised is None or broken:
        return forecast
    verdict, reason = normalised
    return Verdict(verdict), f"decided by the normalised loop: {reason}"


def normalised_verdict(*, nonfinite_at: int | None, pre_norm_rate: float, all_fixed: bool, cycles: int,
                       not_converging: int, n_tokens: int, settle: int | None = None,
                       rate_tol: float = PRE_NORM_RATE_TOL) -> tuple[Verdict, str]:
    """The verdict of a loop that renormalises its state (dynamics.normalised): explosive if a state
    is non-finite or the pre-norm state grows geometrically (rate > 1 + rate_tol per loop); stable
    if every token is at or approaching a fixed point; marginal otherwise (cycles, not converging)."""
    if nonfinite_at is not None:
        return Verdict.EXPLOSIVE, f"non-finite state at loop {nonfinite_at}"
    if math.isfinite(pre_norm_rate) and pre_norm_rate > 1 + rate_tol:
        return Verdict.EXPLOSIVE, f"pre-norm state grows ×{pre_norm_rate:.3g} per loop"
    if all_fixed:
        more = f", settling within {settle} more loops" if settle else ""
        return Verdict.STABLE, f"all {n_tokens} tokens at or approaching a fixed point{more}"
    parts = []
    if cycles:
        parts.append(f"{cycles} tokens in or approaching a cycle")
    if not_converging:
        parts.append(f"{not_converging} tokens not converging")
    return Verdict.MARGINAL, f"{', '.join(parts)} of {n_tokens}"


# ---- training outcomes (loopdyn compare) ------------------------------------------------------------

def state_outcome(norms, mean_loops: int) -> tuple[Outcome | None, str, str]:
    """The state-norm part of a run's outcome: (RESIDUAL_EXPLOSION or None, reason, note), from ‖h_t‖ for
    t = 0..EXPLOSION_LOOPS·μ: non-finite, or ‖h_last‖/‖h_μ‖ > EXPLOSION_RATIO, is an explosion;
    a ratio above MARGINAL_RATIO is noted ("state grows with loops")."""
    finite = [math.isfinite(float(x)) for x in norms]
    if not all(finite):
        t = finite.index(False)
        return Outcome.RESIDUAL_EXPLOSION, f"the state norm is not finite at T = {t}", ""
    mu, last = mean_loops, len(norms) - 1
    ratio = float(norms[last]) / max(float(norms[mu]), 1e-30)
    if ratio > EXPLOSION_RATIO:
        return Outcome.RESIDUAL_EXPLOSION, (f"‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.3g} > {EXPLOSION_RATIO:g} "
                                            f"(the state grows geometrically with loops)"), ""
    note = f"state grows with loops (‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.2f})" if ratio > MARGINAL_RATIO else ""
    return None, f"‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.2f}", note


def training_outcome(losses, smoothed_last: float, smoothed_best: float, final_val: float | None,
                     unigram: float, falling: tuple[bool, float, float], state_norms, mean_loops: int | None
                     ) -> tuple[Outcome, str, str]:
    """(outcome, reason, note) of a training run by the criteria of `criteria()`.

    losses: the training losses; smoothed_last/best: the last and the best smoothed loss;
    falling: `still_falling(losses)` = (steeply falling, drop in nats, t); state_norms: ‖h_t‖ of the
    trained model for t = 0..EXPLOSION_LOOPS·μ (empty for a fixed-depth model, mean_loops None)."""
    n = len(losses)
    if n == 0:
        return Outcome.DIVERGED, "no training step finished", ""
    bad = [i for i, x in enumerate(losses) if not math.isfinite(float(x))]
    if bad:
        step = bad[0] + 1
        return Outcome.DIVERGED, f"the loss became {losses[step - 1]} at step {step}", ""
    if smoothed_last > smoothed_best + DIVERGE_MARGIN:
        return Outcome.DIVERGED, (f"the smoothed loss rose from {smoothed_best:.2f} to {smoothed_last:.2f} "
                                  f"(> {DIVERGE_MARGIN} nats above its best)"), ""
    if final_val is not None and not math.isfinite(final_val):
        return Outcome.DIVERGED, f"the validation loss is {final_val}", ""
    learned = final_val is not None and final_val < unigram
    pending = ""  # why the run is inconclusive, if it is
    if not learned:
        shown = "n/a" if final_val is None else f"{final_val:.3f}"
        steep, drop, t = falling
        if n < MIN_TREND_STEPS:
            pending = (f"too short to judge: {n} step(s) are too few to tell a trend (validation loss {shown}, "
                       f"unigram baseline {unigram:.3f}); nothing diverged")
        elif steep:
            pending = (f"too short to judge: validation loss {shown} is not yet below the unigram baseline "
                       f"{unigram:.3f}, and the training loss is still falling steeply (by {drop:.3f} nats "
                       f"between the last two quarters of the run, t = {t:.1f})")
        elif smoothed_last <= unigram + DIVERGE_MARGIN:
            pending = (f"too short to judge: the training loss ({smoothed_last:.3f}) rests on the unigram plateau "
                       f"({unigram:.3f}) without having risen; validation loss {shown}; "
                       f"a longer run decides whether it learns context")
        else:
            return Outcome.DIVERGED, (f"validation loss {shown} is not below the unigram baseline {unigram:.3f}, "
                                      f"and the training loss stalled at {smoothed_last:.3f} (> {DIVERGE_MARGIN} "
                                      f"above the baseline, not falling)"), ""
    if mean_loops is None or not len(state_norms):
        return (Outcome.INCONCLUSIVE, pending, "") if pending else \
            (Outcome.CONVERGED, f"validation loss {final_val:.3f}", "")
    exploded, why, note = state_outcome(state_norms, mean_loops)
    if exploded is not None:
        return exploded, why, note
    if pending:
        return Outcome.INCONCLUSIVE, pending, note
    return Outcome.CONVERGED, f"validation loss {final_val:.3f}; {why}", note


# ---- run status (probes.monitor, loopdyn.train) ------------------------------------------------------

def run_status(failed: list[str], warned: list[str]) -> tuple[RunStatus, list[str]]:
    """failed if any failure reason (the loss diverged, the monitor stopped the run, the validation loss
    is not below the unigram baseline, a non-finite value the monitor did not recover from), warned if
    any warning (spikes, spike warnings, loop instability, actions taken), else ok. The reasons come
    back failures first."""
    status = RunStatus.FAILED if failed else (RunStatus.WARNED if warned else RunStatus.OK)
    return status, list(failed) + list(warned)


def validation_failure(val_loss: float | None, baseline: float | None) -> str | None:
    """The failure reason when the final validation loss is not below the unigram baseline, else None."""
    if val_loss is not None and baseline is not None and not (val_loss < baseline):
        return f"validation loss {val_loss:.3f} above the unigram baseline {baseline:.3f}"
    return None


def run_line(status: RunStatus, reasons: list[str], empty: str = "no instability seen") -> str:
    """"run <status>: <reasons>" — the one line printed at the end of a run."""
    return f"run {status}: " + ("; ".join(reasons) if reasons else empty)


__all__ = ["Verdict", "Outcome", "RunStatus", "EXPLOSION_FACTOR", "UNIT_BAND", "GROWTH_AT_CROSSING", "SETTLE_TOL",
           "PRE_NORM_RATE_TOL", "DIVERGE_MARGIN", "EXPLOSION_LOOPS", "EXPLOSION_RATIO", "MARGINAL_RATIO",
           "STEEP_T", "STEEP_DROP", "MIN_TREND_STEPS", "COLOURS", "css_class", "colour", "criteria",
           "verdict_criteria", "nonfinite_verdict", "model_verdict", "lti_exit_loop", "large_state_unstable", "loop_verdict", "audit_verdict",
           "normalised_verdict", "state_outcome", "training_outcome", "run_status", "validation_failure",
           "run_line"]
