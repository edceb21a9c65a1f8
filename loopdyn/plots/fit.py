"""The figure of `loopdyn fit --plot`: data, fit, bootstrap band clipped to the data's range,
held-out points open, the extrapolation shaded, in loopdyn's style. For the test-time law the
three power-law forms are drawn dashed; laws with more inputs are drawn as families of curves
(or, with too many, as relative residuals). `plot_fit` returns (figure, caption).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loopdyn.models.errors import InputError
from loopdyn.plots import style
from loopdyn.scaling.fit import LawFit
from loopdyn.scaling.report import percent


def plot_format(path: str, fmt: str | None) -> str:
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


def csv_unit(path) -> str:
    """Loss unit for the labels: a `unit` column of the CSV (one value), else plain nats."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return "nats"
    units = {(r.get("unit") or "").strip() for r in rows} - {""}
    return units.pop() if len(units) == 1 else "nats"


def plot_fit(fit: LawFit, cols, held, comparison, unit: str = "nats"):
    """(figure, caption): data, fit and bootstrap band, in loopdyn's style.

    The y axis is set by the data (the band is clipped to it, never stretching the axis);
    fitted points are filled, held-out points open; beyond the fitted range the plot is
    shaded as extrapolation."""
    return style.styled(_draw)(fit, cols, held, comparison, unit)


def write_fit_plot(path, fmt: str, fit: LawFit, cols, held, comparison, unit: str = "nats") -> str:
    """Draw `plot_fit` and write it atomically to `path` in `fmt`; return the caption."""
    fig, caption = plot_fit(fit, cols, held, comparison, unit)
    style.save(fig, path, fmt, caption=caption)
    return caption


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
    err = f"in-sample error {percent(fit.in_sample_error)}, held-out {percent(fit.held_out_error)}"
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


def _plot_families(ax, fit: LawFit, cols, held, band, band_label):
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


def _plot_residuals(ax, fit: LawFit, cols, held, band_label) -> None:
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
