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

# the outcome thresholds and the rule live in one table: loopdyn.dynamics.verdict (docs/design.md §8)
from loopdyn.dynamics.verdict import (DIVERGE_MARGIN, EXPLOSION_LOOPS, EXPLOSION_RATIO, MARGINAL_RATIO,  # noqa: E402,F401
                                      MIN_TREND_STEPS, STEEP_DROP, STEEP_T, training_outcome)


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
    """(outcome, reason, note) by the criteria in the module docstring (the rule table:
    `loopdyn.dynamics.verdict.training_outcome`).

    `state_norms` are ‖h_t‖ of the trained model for t = 0..EXPLOSION_LOOPS·μ (empty for a
    fixed-depth model, with mean_loops None)."""
    x = np.asarray(losses, dtype=float)
    if len(x) and np.isfinite(x).all():
        s = smoothed(losses, max(5, len(x) // 10))
        last, best = float(s[-1]), float(s.min())
        falling = still_falling(losses)
    else:
        last = best = math.nan
        falling = (False, 0.0, 0.0)
    return training_outcome(list(x), last, best, final_val, unigram, falling, state_norms, mean_loops)
