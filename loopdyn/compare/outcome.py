"""The outcome of a compare run (`classify`), by these stated criteria (tested on synthetic curves):

- diverged: the loss stopped being finite; or the final smoothed training loss is more than
  DIVERGE_MARGIN nats above its best smoothed value (it learned, then blew up); or the final
  validation loss is not below the unigram baseline while the training loss has stalled more
  than DIVERGE_MARGIN above that baseline (it did not even learn byte frequencies).
- residual explosion (not diverged): the trained loop's state blows up as loops grow: a state
  norm is not finite at T ≤ EXPLOSION_LOOPS·μ_rec, or ‖h_{4μ}‖ / ‖h_μ‖ > EXPLOSION_RATIO
  (geometric growth; linear growth, as with the additive injection, gives about 4).
- inconclusive (not diverged, no explosion): too short to judge. The final validation loss
  is not yet below the unigram baseline, but nothing diverged: the training loss is finite,
  has not risen from its best, and is either still falling steeply (`still_falling`: the
  mean of the last quarter of the steps is below the mean of the quarter before by more than
  STEEP_T standard errors and by at least STEEP_DROP nats) or resting on the unigram plateau
  (within DIVERGE_MARGIN of the baseline) that byte-level models sit on before they learn
  context; or the run has fewer than MIN_TREND_STEPS steps, too few to show a trend. A
  longer run decides it.
- converged: otherwise. A state that grows between 1.5× and EXPLOSION_RATIO over that range
  is noted as "state grows with loops" (marginal).

docs/design.md ("loopdyn compare") records these thresholds.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

DIVERGE_MARGIN = 0.5  # nats
EXPLOSION_LOOPS = 4  # state norms are measured up to 4·μ_rec loops
EXPLOSION_RATIO = 10.0  # ‖h_{4μ}‖ / ‖h_μ‖ above this is a residual explosion
MARGINAL_RATIO = 1.5
STEEP_T = 2.0  # the last quarter's mean loss must be this many standard errors below the previous quarter's
STEEP_DROP = 0.02  # nats, and at least this much lower
MIN_TREND_STEPS = 8  # fewer steps cannot show a trend: such a run is inconclusive unless it diverged


def smoothed(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start); NaN stays NaN."""
    x = np.asarray(losses, dtype=float)
    if len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def still_falling(losses: list[float]) -> tuple[bool, float, float]:
    """(falling, drop, t): is the training loss still falling at the end of the run?

    drop = mean of the third quarter of the steps − mean of the last quarter (nats), t its
    Welch t statistic; falling when t ≥ STEEP_T and drop ≥ STEEP_DROP. Needs 8 steps."""
    x = np.asarray(losses, dtype=float)
    q = len(x) // 4
    if len(x) < MIN_TREND_STEPS or q < 2 or not np.isfinite(x).all():
        return False, float("nan"), float("nan")
    a, b = x[-2 * q:-q], x[-q:]
    drop = float(a.mean() - b.mean())
    from scipy import stats  # imported on use: every `loopdyn` start loads this module

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # two constant quarters: t is ±inf or nan
        t = float(stats.ttest_ind(a, b, equal_var=False).statistic)
    if not math.isfinite(t):  # no spread in either quarter: any drop is certain
        t = math.inf if drop > 0 else 0.0
    return bool(t >= STEEP_T and drop >= STEEP_DROP), drop, float(t)


def classify(losses: list[float], final_val: float | None, unigram: float,
             state_norms: list[float], mean_loops: int | None) -> tuple[str, str, str]:
    """(outcome, reason, note) by the criteria in the module docstring.

    `state_norms` are ‖h_t‖ of the trained model for t = 0..EXPLOSION_LOOPS·μ (empty for a
    fixed-depth model, with mean_loops None)."""
    x = np.asarray(losses, dtype=float)
    if len(x) == 0:
        return "diverged", "no training step finished", ""
    if not np.isfinite(x).all():
        step = int(np.argmin(np.isfinite(x))) + 1
        return "diverged", f"the loss became {x[step - 1]} at step {step}", ""
    s = smoothed(losses, max(5, len(x) // 10))
    if s[-1] > s.min() + DIVERGE_MARGIN:
        return "diverged", (f"the smoothed loss rose from {s.min():.2f} to {s[-1]:.2f} "
                            f"(> {DIVERGE_MARGIN} nats above its best)"), ""
    if final_val is not None and not math.isfinite(final_val):
        return "diverged", f"the validation loss is {final_val}", ""
    learned = final_val is not None and final_val < unigram
    pending = ""  # why the run is inconclusive, if it is
    if not learned:
        shown = "n/a" if final_val is None else f"{final_val:.3f}"
        falling, drop, t = still_falling(losses)
        if len(x) < MIN_TREND_STEPS:
            pending = (f"too short to judge: {len(x)} step(s) are too few to tell a trend (validation loss {shown}, "
                       f"unigram baseline {unigram:.3f}); nothing diverged")
        elif falling:
            pending = (f"too short to judge: validation loss {shown} is not yet below the unigram baseline "
                       f"{unigram:.3f}, and the training loss is still falling steeply (by {drop:.3f} nats "
                       f"between the last two quarters of the run, t = {t:.1f})")
        elif s[-1] <= unigram + DIVERGE_MARGIN:
            pending = (f"too short to judge: the training loss ({s[-1]:.3f}) rests on the unigram plateau "
                       f"({unigram:.3f}) without having risen; validation loss {shown}; "
                       f"a longer run decides whether it learns context")
        else:
            return "diverged", (f"validation loss {shown} is not below the unigram baseline {unigram:.3f}, and the "
                                f"training loss stalled at {s[-1]:.3f} (> {DIVERGE_MARGIN} above the baseline, "
                                f"not falling)"), ""
    if mean_loops is None or not state_norms:
        return ("inconclusive", pending, "") if pending else ("converged", f"validation loss {final_val:.3f}", "")
    norms = np.asarray(state_norms, dtype=float)
    if not np.isfinite(norms).all():
        t = int(np.argmin(np.isfinite(norms)))
        return "residual explosion", f"the state norm is not finite at T = {t}", ""
    mu, last = mean_loops, len(norms) - 1
    ratio = norms[last] / max(norms[mu], 1e-30)
    if ratio > EXPLOSION_RATIO:
        return "residual explosion", (f"‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.3g} > {EXPLOSION_RATIO:g} "
                                      f"(the state grows geometrically with loops)"), ""
    note = f"state grows with loops (‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.2f})" if ratio > MARGINAL_RATIO else ""
    if pending:
        return "inconclusive", pending, note
    return "converged", f"validation loss {final_val:.3f}; ‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.2f}", note
