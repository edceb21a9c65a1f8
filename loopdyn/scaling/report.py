"""The text of a fitted scaling law, as `loopdyn fit` prints it (docs/design.md §7)."""
from __future__ import annotations

import numpy as np

from loopdyn.dynamics.numbers import fmt
from loopdyn.scaling.fit import LawFit, TestTimeComparison


def percent(x) -> str:
    """A relative error as a percentage with three decimals (`dynamics.numbers.fmt`); None is 'n/a'."""
    return "n/a" if x is None else f"{fmt(100.0 * x, '.3f')}%"


def format_fit(fit: LawFit, comparison: TestTimeComparison | None = None, *, holdout_above: float | None = None,
               seed: int = 0) -> str:
    """The fit as text: parameters with intervals, errors, reliability, and the test-time forms
    ranked (what `loopdyn fit` prints)."""
    lines = [f"law: {fit.law} ({fit.formula})"]
    held = f", {fit.n_held_out} held out (above {holdout_above:g})" if fit.n_held_out else ""
    boot = f"{fit.bootstrap} bootstrap refits" if fit.bootstrap else "no bootstrap"
    lines.append(f"fitted on {fit.n_points} rows{held}; {fit.restarts} restarts, {boot}, "
                 f"seed {seed}")
    level = f"{100 * fit.ci_level:g}% interval"
    lines.append(f"  {'parameter':<10} {'value':>14}   {level}")
    for name, value in fit.params.items():
        ci = fit.ci.get(name)
        interval = "-" if ci is None else f"[{ci[0]:.6g}, {ci[1]:.6g}]"
        lines.append(f"  {name:<10} {value:>14.6g}   {interval}")
    lines.append(f"error (mean |pred - loss| / loss): in-sample {percent(fit.in_sample_error)}, "
                 f"held-out {percent(fit.held_out_error)}")
    lines.append(f"reliable: {'yes' if fit.reliable else 'NO - ' + str(fit.reason)}")
    if comparison is not None:
        by = "held-out" if comparison.ranked_by == "held_out" else "in-sample"
        lines.append(f"test-time forms, ranked by {by} error:")
        lines.append(f"  {'form':<14} {'held-out':>10} {'in-sample':>10}")
        for i, f in enumerate(comparison.fits):
            mark = "  <- best" if i == 0 else ""
            flag = "" if f.reliable else "  (unreliable)"
            lines.append(f"  {f.form:<14} {percent(f.held_out_error):>10} "
                         f"{percent(f.in_sample_error):>10}{mark}{flag}")
    return "\n".join(lines)


def fit_warnings(fit: LawFit, cols, law: str) -> list[str]:
    """Warnings about a fit: unreliable, or a test-time law fitted to rows of several models."""
    out = []
    if not fit.reliable:
        out.append(f"the {law} fit is unreliable: {fit.reason}")
    if law == "testtime":
        varying = [c for c in ("mean_recurrence", "params", "tokens")
                   if c in cols and np.unique(cols[c][np.isfinite(cols[c])]).size > 1]
        if varying:
            out.append(f"rows differ in {', '.join(varying)}: the test-time law describes one "
                       f"model; consider --law unified")
    return out
