"""`loopdyn fit CSV --law testtime|parcae|unified|routed`: fit a scaling law to measurements.

Prints the parameters with bootstrap intervals and the fit errors; `--json` writes the
docs/design.md §7 record, `--plot` a figure (data, fit, bootstrap band clipped to the data's range,
held-out points open, the extrapolation shaded) in loopdyn's style. For `testtime` the
exponential law is also compared against the three power-law forms.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from loopdyn import style
from loopdyn.dynamics import laws
from loopdyn.models.errors import InputError
from loopdyn.io import atomic_write_json

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
    p.add_argument("--plot", metavar="FILE", help="write a figure, format from --format or the suffix (default: none)")
    p.add_argument("--format", type=str.lower, choices=["png", "pdf", "svg"], default=None,
                   help="figure format for --plot: png (300 dpi), pdf or svg (default: the suffix, else png)")
    p.add_argument("--unit", choices=["nats/byte", "nats/token"], default=None,
                   help="loss unit for the labels (default: the CSV's `unit` column, else plain nats)")
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
    from loopdyn.io import check_outputs

    plot_format = _plot_format(args.plot, args.format) if args.plot else None
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
        fig, caption = _plot(fit, cols, held, comparison, _unit(args, args.csv))
        style.save(fig, args.plot, plot_format, caption=caption)
        print(f"wrote {args.plot}: {caption}")
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

def _plot_format(path: str, fmt: str | None) -> str:
    """--format, else the --plot suffix, else png; a suffix naming another format is an error."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if fmt is not None:
        fmt = style.check_format(fmt)
        if suffix in style.FORMATS and suffix != fmt:
            raise InputError(f"--plot {path}: the suffix .{suffix} contradicts --format {fmt}")
        return fmt
    if suffix and suffix not in style.FORMATS:
        raise InputError(f"--plot {path}: unsupported format {suffix!r} (use .png, .pdf or .svg, or --format)")
    return suffix or "png"


def _unit(args, path) -> str:
    """Loss unit for the labels: --unit, else a `unit` column of the CSV, else plain nats."""
    if args.unit:
        return args.unit
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return "nats"
    units = {(r.get("unit") or "").strip() for r in rows} - {""}
    return units.pop() if len(units) == 1 else "nats"


def _plot(fit: laws.LawFit, cols, held, comparison, unit: str = "nats"):
    """(figure, caption): data, fit and bootstrap band, in loopdyn's style.

    The y axis is set by the data (the band is clipped to it, never stretching the axis);
    fitted points are filled, held-out points open; beyond the fitted range the plot is
    shaded as extrapolation."""
    return style.styled(_draw)(fit, cols, held, comparison, unit)


def _draw(fit, cols, held, comparison, unit):
    fig, ax = style.figure(style.SINGLE + 0.6, 3.4)
    loss = cols["loss"]
    band = fit.samples is not None and len(fit.samples) > 0
    band_label = f"{100 * fit.ci_level:g}% bootstrap band"
    notes: list[str] = []
    if fit.law == "testtime":
        x = cols["loops"]
        grid = np.linspace(max(1.0, min(1.0, x.min())), max(x.max() * 1.5, x.max() + 2), 300)
        colour = style.SEQUENCE[0]
        _curve(ax, fit, {"loops": grid}, grid, colour, band, band_label, f"fit: {fit.formula}")
        if comparison is not None:
            others = [f for f in comparison.fits if f.form != fit.form]
            for i, other in enumerate(others):
                ax.plot(grid, other.predict(loops=grid), lw=0.9, ls=(0, (4, 2)), color=style.SEQUENCE[(i + 1) % 8],
                        label=other.form)
            notes.append(f"dashed: the alternative forms {', '.join(o.form for o in others)}")
        _points(ax, x, loss, held, "0.1", label=True)
        ax.set_xlabel("loops T")
        style.integer_axis(ax, "x")
        fitted_x, xlabel_note = x[~held], "loops"
        title = f"test-time law: {fit.formula}"
    else:
        groups, fitted_x = _plot_families(ax, fit, cols, held, band, band_label)
        if not groups:
            _plot_residuals(ax, fit, cols, held, band_label)
            fitted_x = None
        xlabel_note = _FAMILY_X.get(fit.law)
        title = f"{fit.law} law: {fit.formula}"
    y_data = loss if fitted_x is not None else None
    if y_data is not None:
        lo, hi = float(y_data.min()), float(y_data.max())
        pad = 0.12 * max(hi - lo, 0.01 * hi)
        ax.set_ylim(lo - pad, hi + 2.2 * pad)
        ax.set_ylabel(f"loss ({unit})")
        edge = float(fitted_x.max()) if fitted_x is not None and len(fitted_x) else None
        right = ax.get_xlim()[1]
        if edge is not None and right > edge:
            ax.axvspan(edge, right, color="0.5", alpha=0.12, lw=0, zorder=0)
            ax.text(edge, 0.02, "  extrapolation", transform=ax.get_xaxis_transform(), fontsize=6.5, color="0.3",
                    ha="left", va="bottom", gid="reference-label")
            ax.set_xlim(right=right)
            notes.append(f"shaded: extrapolation beyond the fitted {xlabel_note} range (> {edge:g})")
        if band:
            clipped = _band_leaves(ax)
            if clipped:
                notes.append(f"the band leaves the plotted range {clipped} and is clipped there")
    err = f"in-sample error {_pct(fit.in_sample_error)}, held-out {_pct(fit.held_out_error)}"
    ax.set_title(f"{title}\n{err}", fontsize=7)
    style.place_legend(ax, outside="below")
    n_held = int(held.sum())
    caption = (f"{fit.law} law ({fit.formula}) fitted to {fit.n_points} rows (filled markers)"
               + (f"; {n_held} held-out rows drawn open, not used in the fit" if n_held else "")
               + (f"; band: {band_label} from {len(fit.samples)} refits" if band else "; no bootstrap band")
               + ("; " + "; ".join(notes) if notes else "") + f"; loss in {unit}; {err}"
               + ("" if fit.reliable else f"; the fit is flagged unreliable: {fit.reason}") + ".")
    return fig, caption


def _band_leaves(ax) -> str:
    """Where a drawn band (PolyCollection) extends past the y limits, as text ('above' / 'below')."""
    from matplotlib.collections import PolyCollection

    lo, hi = ax.get_ylim()
    out = set()
    for c in ax.collections:
        if isinstance(c, PolyCollection):
            for path in c.get_paths():
                y = path.vertices[:, 1]
                if np.nanmax(y) > hi:
                    out.add("above")
                if np.nanmin(y) < lo:
                    out.add("below")
    return " and ".join(sorted(out))


def _curve(ax, fit, inputs, grid, colour, band, band_label, label):
    if band:
        lo, hi = fit.predict_interval(**inputs)
        ax.fill_between(grid, lo, hi, color=colour, alpha=0.18, lw=0, label=band_label)
    ax.plot(grid, fit.predict(**inputs), color=colour, lw=1.4, label=label)


def _points(ax, x, loss, held, colour, label: bool):
    ax.plot(x[~held], loss[~held], "o", color=colour, ms=4, label="fitted" if label else "_nolegend_", zorder=4)
    if held.any():
        ax.plot(x[held], loss[held], "o", mfc="white", mec=style.OKABE_ITO["vermillion"], ms=5.5, mew=1.2,
                label="held out" if label else "_nolegend_", zorder=4)


# the x axis of the laws drawn as families of curves (one curve per setting of the rest)
_FAMILY_X = {"parcae": "tokens", "routed": "experts", "unified": "loops"}
_MAX_CURVES = 8


def _plot_families(ax, fit: laws.LawFit, cols, held, band, band_label):
    """Loss against one input, one curve per setting of the others, extended past the data.

    Returns (number of curves, fitted x values), or (0, None) — nothing drawn — when there
    would be too many curves to read."""
    xcol = _FAMILY_X[fit.law]
    others = [c for c in fit.columns if c != xcol]
    keys = np.stack([cols[c] for c in others], axis=1)
    groups, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    if len(groups) > _MAX_CURVES:
        return 0, None
    x, loss = cols[xcol], cols["loss"]
    lo_x, hi_x = x.min(), x.max()
    grid = np.geomspace(lo_x, hi_x * 4.0, 200) if xcol != "loops" else \
        np.linspace(min(1.0, lo_x), hi_x * 1.5, 200)
    for g, values in enumerate(groups):
        colour = style.SEQUENCE[g % len(style.SEQUENCE)]
        inputs = {c: np.full_like(grid, v) for c, v in zip(others, values)}
        inputs[xcol] = grid
        label = ", ".join(f"{c}={v:.3g}" for c, v in zip(others, values))
        if band:
            lo, hi = fit.predict_interval(**inputs)
            ax.fill_between(grid, lo, hi, color=colour, alpha=0.15, lw=0)
        ax.plot(grid, fit.predict(**inputs), color=colour, lw=1.2, label=label)
        rows = inverse == g
        ax.plot(x[rows & ~held], loss[rows & ~held], "o", color=colour, ms=3.5, zorder=4)
        ax.plot(x[rows & held], loss[rows & held], "o", mfc="white", mec=colour, ms=5.5, mew=1.2, zorder=4)
    ax.plot([], [], "o", color="0.2", ms=3.5, label="fitted")
    if held.any():
        ax.plot([], [], "o", mfc="white", mec="0.2", ms=5.5, mew=1.2, label="held out")
    if band:
        ax.fill_between([], [], [], color="0.5", alpha=0.3, lw=0, label=band_label)
    if xcol != "loops":
        style.log_axis(ax, "x", span=float(grid[-1] / grid[0]))
    else:
        style.integer_axis(ax, "x")
    ax.set_xlabel({"tokens": "training tokens D", "experts": "experts E", "loops": "loops T"}[xcol])
    return len(groups), x[~held]


def _plot_residuals(ax, fit: laws.LawFit, cols, held, band_label) -> None:
    """Relative residual (prediction / observation − 1) against the observed loss."""
    inputs = {c: cols[c] for c in fit.columns}
    loss = cols["loss"]
    pred = fit.predict(**inputs)
    rel = 100.0 * (pred / loss - 1.0)
    if fit.samples is not None and len(fit.samples):
        lo, hi = fit.predict_interval(**inputs)
        ax.errorbar(loss, rel, yerr=[100.0 * (pred - lo) / loss, 100.0 * (hi - pred) / loss],
                    fmt="none", ecolor=style.SEQUENCE[0], alpha=0.6, lw=0.8, label=band_label)
    _points(ax, loss, rel, held, "0.1", label=True)
    style.reference_line(ax, 0.0, "0", style="--", where=0.99)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("prediction error (%)")
