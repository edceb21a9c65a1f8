"""`loopdyn fit CSV --law testtime|parcae|unified|routed`: fit a scaling law to measurements.

Prints the parameters with bootstrap intervals and the fit errors; `--json` writes the
DESIGN §7 record, `--plot` a figure (data, fit, bootstrap band). For `testtime` the
exponential law is also compared against the three power-law forms.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from loopdyn.dynamics import laws
from loopdyn.models.errors import InputError
from loopdyn.models.fileio import atomic_write_bytes, atomic_write_json

DEFAULT_RESTARTS = 64
DEFAULT_BOOTSTRAP = 50


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit a scaling law (test-time, Parcae, unified or routed) to a CSV",
        description=(
            "Fit a scaling law to a CSV with a header row. Columns by name: loops, "
            "mean_recurrence, params, tokens, experts, flops, loss. Laws and the columns "
            "they need: testtime (loops) L_inf + Z*exp(-z*T); parcae (params, tokens) "
            "E + A*N^-a + B*D^-b; unified (loops, mean_recurrence, params, tokens) "
            "E + X*N^-x + Y*D^-y + Z*exp(-z*T/mu_rec); routed (params, experts) Clark et al. "
            "2022. Fitting: Huber loss on log-loss residuals, L-BFGS-B from many seeded "
            "starts, bootstrap intervals."
        ),
    )
    p.add_argument("csv", metavar="CSV", help="measurements, one row per (model, setting)")
    p.add_argument("--law", required=True, choices=laws.LAWS, help="which law to fit")
    p.add_argument("--json", metavar="FILE", help="write {law, params, ci, error} as JSON (default: none)")
    p.add_argument("--plot", metavar="FILE", help="write a figure, .png, .pdf or .svg (default: none)")
    p.add_argument("--holdout-above", type=float, metavar="T", default=None,
                   help="withhold rows with loops > T (or mean_recurrence > T when there is "
                        "no loops column) and report the error on them (default: none, fit every row)")
    p.add_argument("--restarts", type=_int_at_least(1), default=DEFAULT_RESTARTS, metavar="N",
                   help=f"optimiser starting points (default {DEFAULT_RESTARTS})")
    p.add_argument("--bootstrap", type=_int_at_least(0), default=DEFAULT_BOOTSTRAP, metavar="N",
                   help=f"bootstrap refits for the intervals (default {DEFAULT_BOOTSTRAP}; 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from loopdyn.commands.common import check_outputs

    plot_format = _plot_format(args.plot) if args.plot else None
    check_outputs(files={"--json": args.json, "--plot": args.plot}, inputs={"CSV": args.csv})
    cols = laws.read_law_csv(args.csv, args.law)
    kw = dict(holdout_above=args.holdout_above, restarts=args.restarts, seed=args.seed)
    if args.holdout_above is not None and "loops" not in cols and "mean_recurrence" not in cols:
        raise InputError("--holdout-above needs a loops (or mean_recurrence) column")
    fit = laws.fit_law(args.law, cols, bootstrap=args.bootstrap, **kw)

    comparison = None
    if args.law == "testtime":
        others = [laws.fit_law(form, cols, bootstrap=0, **kw) for form in laws.TESTTIME_FORMS[1:]]
        comparison = laws.TestTimeComparison.rank([fit, *others])

    print(_report(fit, args, comparison))
    for warning in _warnings(fit, cols, args.law):
        print(f"loopdyn fit: warning: {warning}", file=sys.stderr)

    if args.json:
        doc = fit.to_json()
        if comparison is not None:
            doc["comparison"] = comparison.to_json()
        atomic_write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        held = _held_mask(cols, args.holdout_above)
        atomic_write_bytes(args.plot, _plot(fit, cols, held, comparison, plot_format))
        print(f"wrote {args.plot}")
    return 0


# -- text output ------------------------------------------------------------------------------

def _pct(x) -> str:
    return "n/a" if x is None else f"{100.0 * x:.3f}%"


def _report(fit: laws.LawFit, args, comparison) -> str:
    lines = [f"law: {fit.law} ({fit.formula})"]
    held = f", {fit.n_held_out} held out (above {args.holdout_above:g})" if fit.n_held_out else ""
    boot = f"{fit.bootstrap} bootstrap refits" if fit.bootstrap else "no bootstrap"
    lines.append(f"fitted on {fit.n_points} rows{held}; {fit.restarts} restarts, {boot}, "
                 f"seed {args.seed}")
    level = f"{100 * fit.ci_level:g}% interval"
    lines.append(f"  {'parameter':<10} {'value':>14}   {level}")
    for name, value in fit.params.items():
        ci = fit.ci.get(name)
        interval = "-" if ci is None else f"[{ci[0]:.6g}, {ci[1]:.6g}]"
        lines.append(f"  {name:<10} {value:>14.6g}   {interval}")
    lines.append(f"error (mean |pred - loss| / loss): in-sample {_pct(fit.in_sample_error)}, "
                 f"held-out {_pct(fit.held_out_error)}")
    lines.append(f"reliable: {'yes' if fit.reliable else 'NO - ' + str(fit.reason)}")
    if comparison is not None:
        by = "held-out" if comparison.ranked_by == "held_out" else "in-sample"
        lines.append(f"test-time forms, ranked by {by} error:")
        lines.append(f"  {'form':<14} {'held-out':>10} {'in-sample':>10}")
        for i, f in enumerate(comparison.fits):
            mark = "  <- best" if i == 0 else ""
            flag = "" if f.reliable else "  (unreliable)"
            lines.append(f"  {f.form:<14} {_pct(f.held_out_error):>10} "
                         f"{_pct(f.in_sample_error):>10}{mark}{flag}")
    return "\n".join(lines)


def _warnings(fit: laws.LawFit, cols, law: str) -> list[str]:
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


def _held_mask(cols, above) -> np.ndarray:
    n = cols["loss"].size
    if above is None:
        return np.zeros(n, dtype=bool)
    key = "loops" if "loops" in cols else "mean_recurrence"
    return cols[key] > above


# -- plot ---------------------------------------------------------------------------------------

def _plot_format(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    fmt = suffix or "png"
    if fmt not in ("png", "pdf", "svg"):
        raise InputError(f"--plot {path}: unsupported format {suffix!r} (use .png, .pdf or .svg)")
    return fmt


def _plot(fit: laws.LawFit, cols, held, comparison, fmt: str) -> bytes:
    """Draw the figure with the Agg canvas (no pyplot, no global backend) and return bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    loss = cols["loss"]
    band_label = f"{100 * fit.ci_level:g}% bootstrap band"
    if fit.law == "testtime":
        T = cols["loops"]
        grid = np.linspace(min(1.0, T.min()), max(T.max() * 1.5, T.max() + 2), 300)
        if fit.samples is not None and len(fit.samples):
            lo, hi = fit.predict_interval(loops=grid)
            ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, lw=0, label=band_label)
        ax.plot(grid, fit.predict(loops=grid), color="C0", lw=2, label=f"fit: {fit.formula}")
        if comparison is not None:
            for i, other in enumerate(f for f in comparison.fits if f.form != fit.form):
                ax.plot(grid, other.predict(loops=grid), lw=1, ls="--", color=f"C{i + 2}",
                        label=other.form)
        ax.plot(T[~held], loss[~held], "o", color="k", ms=5, label="fitted")
        if held.any():
            ax.plot(T[held], loss[held], "o", mfc="none", mec="C3", ms=7, mew=1.5,
                    label="held out")
            ax.axvline(T[~held].max(), color="0.6", lw=1, ls=":")
        ax.set_xlabel("loops T")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"test-time law: {fit.formula}")
    elif not _plot_families(ax, fit, cols, held, band_label):
        _plot_residuals(ax, fit, cols, held, band_label)
    err = f"error: in-sample {_pct(fit.in_sample_error)}, held-out {_pct(fit.held_out_error)}"
    ax.set_title(f"{ax.get_title()}\n{err}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()


# the x axis of the laws drawn as families of curves (one curve per setting of the rest)
_FAMILY_X = {"parcae": "tokens", "routed": "experts", "unified": "loops"}
_MAX_CURVES = 8


def _plot_families(ax, fit: laws.LawFit, cols, held, band_label) -> bool:
    """Loss against one input, one curve per setting of the others, extended past the data.

    Returns False (draw nothing) when there would be too many curves to read.
    """
    xcol = _FAMILY_X[fit.law]
    others = [c for c in fit.columns if c != xcol]
    keys = np.stack([cols[c] for c in others], axis=1)
    groups, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    if len(groups) > _MAX_CURVES:
        return False
    x, loss = cols[xcol], cols["loss"]
    lo_x, hi_x = x.min(), x.max()
    grid = np.geomspace(lo_x, hi_x * 4.0, 200) if xcol != "loops" else \
        np.linspace(min(1.0, lo_x), hi_x * 1.5, 200)
    have_band = fit.samples is not None and len(fit.samples) > 0
    for g, values in enumerate(groups):
        colour = f"C{g % 10}"
        inputs = {c: np.full_like(grid, v) for c, v in zip(others, values)}
        inputs[xcol] = grid
        label = ", ".join(f"{c}={v:.3g}" for c, v in zip(others, values))
        if have_band:
            lo, hi = fit.predict_interval(**inputs)
            ax.fill_between(grid, lo, hi, color=colour, alpha=0.15, lw=0)
        ax.plot(grid, fit.predict(**inputs), color=colour, lw=1.5, label=label)
        rows = inverse == g
        ax.plot(x[rows & ~held], loss[rows & ~held], "o", color=colour, ms=4)
        ax.plot(x[rows & held], loss[rows & held], "o", mfc="none", mec=colour, ms=7, mew=1.5)
    ax.plot([], [], "o", color="k", ms=4, label="fitted")
    if held.any():
        ax.plot([], [], "o", mfc="none", mec="k", ms=7, mew=1.5, label="held out")
    if have_band:
        ax.fill_between([], [], [], color="0.5", alpha=0.3, lw=0, label=band_label)
    if xcol != "loops":
        ax.set_xscale("log", base=2 if xcol == "experts" else 10)
    ax.set_xlabel({"tokens": "training tokens D", "experts": "experts E",
                   "loops": "loops T"}[xcol])
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{fit.law} law: {fit.formula}", fontsize=9)
    return True


def _plot_residuals(ax, fit: laws.LawFit, cols, held, band_label) -> None:
    """Relative residual (prediction / observation − 1) against the observed loss."""
    inputs = {c: cols[c] for c in fit.columns}
    loss = cols["loss"]
    pred = fit.predict(**inputs)
    rel = 100.0 * (pred / loss - 1.0)
    if fit.samples is not None and len(fit.samples):
        lo, hi = fit.predict_interval(**inputs)
        ax.errorbar(loss, rel, yerr=[100.0 * (pred - lo) / loss, 100.0 * (hi - pred) / loss],
                    fmt="none", ecolor="C0", alpha=0.5, lw=1, label=band_label)
    ax.plot(loss[~held], rel[~held], "o", color="k", ms=4, label="fitted")
    if held.any():
        ax.plot(loss[held], rel[held], "o", mfc="none", mec="C3", ms=7, mew=1.5,
                label="held out")
    ax.axhline(0.0, color="0.5", lw=1, ls="--")
    ax.set_xlabel("observed loss (nats/token)")
    ax.set_ylabel("prediction error (%)")
    ax.set_title(f"{fit.law} law: {fit.formula}", fontsize=9)
