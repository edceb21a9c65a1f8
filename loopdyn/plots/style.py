"""The one plotting style of loopdyn: every figure (audit, compare, fit, monitor) is drawn here.

In the manner of a journal style sheet:

* sizes in inches at the printed size (one column 3.5 in, two columns 7.2 in) with 8-pt
  text, so a figure placed at 100% in a paper reads like the paper's own figures;
* one colour-blind-safe palette (Okabe & Ito 2008) with a FIXED colour per parameterisation
  across every figure: diagonal (Parcae) blue, linear (Huginn/RDM) vermillion, additive
  bluish green, autonomous reddish purple, the fixed-depth twin orange (dashed);
* integer ticks on loop and index axes (`integer_axis`);
* reference lines carry their own label on the line (`reference_line`): ρ = 1, the unigram
  baseline, the trained depth μ_rec, zero for exponents;
* legends are placed where they cover no data (`place_legend`, checked with the artists'
  display-space extents), and outside the axes only when no inside corner is free;
* ρ and other positive quantities get a linear axis unless their range spans more than
  `LOG_RANGE` (`auto_scale`), and log axes print plain numbers (0.5, 1, 2), not 9×10⁻¹;
* files: PNG at 300 dpi by default, PDF or SVG (vector) on request (`render`, `save`).

matplotlib is imported only inside these functions and drawn on the Agg canvas (no pyplot,
no global backend); rcParams are applied per figure with `matplotlib.rc_context`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMATS = ("png", "pdf", "svg")
DPI = 300
SINGLE = 3.5  # inches: one journal column
DOUBLE = 7.2  # inches: full page width
LOG_RANGE = 30.0  # a positive axis whose max/min exceeds this is drawn on a log scale

# Okabe & Ito (2008), distinguishable with every common colour-vision deficiency.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7"}
COLORS = {"diagonal": OKABE_ITO["blue"], "linear": OKABE_ITO["vermillion"], "additive": OKABE_ITO["green"],
          "autonomous": OKABE_ITO["purple"], "fixed": OKABE_ITO["orange"]}
LINESTYLES = {"diagonal": "-", "linear": "-", "additive": "-", "autonomous": "-", "fixed": "--"}
MARKERS = {"diagonal": "o", "linear": "s", "additive": "^", "autonomous": "D", "fixed": "v"}
LABELS = {"diagonal": "diagonal (Parcae)", "linear": "linear (Huginn/RDM)", "additive": "additive",
          "autonomous": "autonomous", "fixed": "fixed-depth twin"}
REFERENCE = "#444444"  # reference lines: dark grey, thin, dotted or dashed, always labelled
SEQUENCE = [OKABE_ITO[k] for k in ("blue", "vermillion", "green", "purple", "orange", "sky", "black", "yellow")]

RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.frameon": True, "legend.framealpha": 0.9, "legend.edgecolor": "0.8",
    "legend.borderaxespad": 0.3, "legend.handlelength": 1.8, "figure.titlesize": 9,
    "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 3.5, "grid.linewidth": 0.4,
    "grid.alpha": 0.35, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4, "xtick.direction": "out", "ytick.direction": "out",
    "axes.spines.top": False, "axes.spines.right": False, "axes.prop_cycle": None,  # set in _rc()
    "savefig.dpi": DPI, "savefig.bbox": "standard", "pdf.fonttype": 42, "svg.fonttype": "path",
    "figure.dpi": 100, "axes.formatter.use_mathtext": False, "axes.unicode_minus": True,
}


def _rc() -> dict:
    from cycler import cycler

    return {**RC, "axes.prop_cycle": cycler(color=SEQUENCE)}


def styled(draw):
    """Decorator: run a plotting function inside loopdyn's rcParams (fonts, ticks, colours are
    read when artists are created, so the whole drawing happens in the context)."""
    import functools

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(_rc()):
            return draw(*args, **kwargs)

    return wrapper


def check_format(fmt: str | None, what: str = "--format") -> str:
    """The file format, lower-case; one clear InputError for anything but png, pdf, svg."""
    fmt = (fmt or "png").lower().lstrip(".")
    if fmt not in FORMATS:
        from loopdyn.models.errors import InputError

        raise InputError(f"{what}: unsupported format {fmt!r} (use {', '.join(FORMATS)})")
    return fmt


def loss_unit(vocab_size: int | None = None, byte_level: bool | None = None) -> str:
    """'nats/byte' for byte-level data (a 256-id vocabulary of raw bytes), else 'nats/token'."""
    if byte_level is None:
        byte_level = vocab_size == 256
    return "nats/byte" if byte_level else "nats/token"


# ---- figures --------------------------------------------------------------------------------

def figure(width: float = SINGLE, height: float | None = None, nrows: int = 1, ncols: int = 1,
           sharex: bool = False, squeeze: bool = True):
    """(fig, axes) at the printed size, in loopdyn's style, on an Agg canvas."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = height if height is not None else width * 0.72 * nrows / max(ncols, 1) ** 0.5
    with matplotlib.rc_context(_rc()):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.04, hspace=0.04)
        axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=squeeze)
    for ax in np.atleast_1d(axes).ravel():
        ax.grid(True, which="major")
    return fig, axes


def render(fig, fmt: str = "png", dpi: int = DPI, caption: str | None = None) -> bytes:
    """The figure as bytes in `fmt` (PNG at `dpi`, or vector PDF/SVG), with the caption in the
    file's metadata (PNG Description, PDF Subject, SVG dc:description) when given."""
    import matplotlib

    fmt = check_format(fmt)
    meta = {"png": {"Software": "loopdyn", "Description": caption},
            "pdf": {"Creator": "loopdyn", "Subject": caption},
            "svg": {"Creator": "loopdyn", "Description": caption}}[fmt]
    meta = {k: v for k, v in meta.items() if v}
    buf = io.BytesIO()
    with matplotlib.rc_context(_rc()):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
    return buf.getvalue()


def save(fig, path, fmt: str | None = None, caption: str | None = None) -> Path:
    """Write the figure atomically to `path` (format from `fmt`, else the suffix, else PNG)."""
    from loopdyn.io import atomic_write_bytes

    path = Path(path)
    fmt = check_format(fmt or path.suffix.lstrip(".") or "png")
    return atomic_write_bytes(path, render(fig, fmt, caption=caption))


# ---- axes -----------------------------------------------------------------------------------

def integer_axis(ax, which: str = "x") -> None:
    """Ticks at integers only (loops, exponent index, steps)."""
    from matplotlib.ticker import MaxNLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(MaxNLocator(integer=True, nbins="auto", min_n_ticks=3))


def integer_formatter():
    """Tick labels as plain integers (for loop counts on a log₂ axis: 1, 2, 4, 8, 16)."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos=None: f"{int(round(x))}")


def _plain(x, _pos=None) -> str:
    if x == 0 or not math.isfinite(x):
        return "0"
    e = math.floor(math.log10(abs(x)))
    if -3 <= e <= 4:
        return f"{x:.{max(0, -e)}f}".rstrip("0").rstrip(".") if e < 0 else f"{x:g}"
    return f"1e{e}" if abs(x / 10 ** e - 1) < 1e-9 else f"{x:.0e}"


def log_axis(ax, which: str = "y", span: float | None = None) -> None:
    """A log axis whose labels are plain numbers (0.5, 1, 2, 1e6), never 9×10⁻¹. `span` is
    max/min of the data: within two decades ticks go at 1-2-5, beyond at powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    subs = (1.0, 2.0, 5.0) if span is not None and span <= 100 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=7))
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(NullFormatter())


def auto_scale(ax, values: Iterable[float], which: str = "y", log_range: float = LOG_RANGE) -> str:
    """Linear unless the finite positive values span more than `log_range`; returns the scale."""
    v = np.asarray([x for x in np.ravel(np.asarray(list(values), dtype=float)) if np.isfinite(x)])
    pos = v[v > 0]
    if pos.size and (pos.size < v.size or pos.max() / pos.min() <= log_range):
        return "linear"
    if pos.size >= 2 and pos.max() / pos.min() > log_range:
        log_axis(ax, which, span=float(pos.max() / pos.min()))
        return "log"
    return "linear"


def reference_line(ax, value: float, label: str, orientation: str = "h", style: str = ":",
                   color: str = REFERENCE, where: float = 0.98, lw: float = 0.9, **kw):
    """A thin reference line labelled on the line itself (no legend entry): e.g. ρ = 1,
    the unigram baseline, μ_rec, zero. `where` is the label's position along the line
    (axes fraction). Returns (line, text)."""
    ha = "right" if where > 0.5 else "left"
    if orientation == "h":
        line = ax.axhline(value, color=color, ls=style, lw=lw, zorder=1.5, label="_nolegend_", **kw)
        text = ax.text(where, value, label, transform=ax.get_yaxis_transform(), ha=ha, va="bottom",
                       fontsize=6.5, color=color, zorder=5, clip_on=False)
    else:
        line = ax.axvline(value, color=color, ls=style, lw=lw, zorder=1.5, label="_nolegend_", **kw)
        text = ax.text(value, where, " " + label, transform=ax.get_xaxis_transform(), ha="left",
                       va="top", rotation=90, fontsize=6.5, color=color, zorder=5, clip_on=False)
    text.set_gid("reference-label")
    text.set_in_layout(False)  # a label on a line never resizes the axes
    line.set_gid("reference-line")
    return line, text


def finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.where(np.isfinite(x), x, np.nan)


# ---- legends that cover no data -----------------------------------------------------------------

INSIDE = ("upper right", "upper left", "lower left", "lower right", "center right", "center left",
          "upper center", "lower center", "center")


def data_points(ax, step_px: float = 2.0) -> np.ndarray:
    """Display-space points (N, 2) that stand for the data drawn in `ax`: every line densified
    to ~`step_px` pixels (markers and segments), scatter offsets, bar rectangles (their
    outline, densified), error-bar segments. Reference lines (gid 'reference-line') and filled
    bands are not data. Used to keep legends off the data."""
    from matplotlib.collections import LineCollection, PathCollection
    from matplotlib.patches import Rectangle

    fig = ax.figure
    fig.canvas.draw()  # positions are final only after a draw (constrained layout)
    pts = []

    def dense(xy):
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) < 2:
            return xy
        seg = np.diff(xy, axis=0)
        n = np.maximum(1, (np.hypot(seg[:, 0], seg[:, 1]) / step_px).astype(int))
        out = [xy[:1]]
        for a, s, k in zip(xy[:-1], seg, n):
            out.append(a + s * (np.arange(1, k + 1)[:, None] / k))
        return np.vstack(out)

    for line in ax.get_lines():
        if line.get_gid() == "reference-line" or not line.get_visible():
            continue
        xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
        pts.append(dense(xy) if line.get_linestyle() not in ("None", "", " ", "none") else xy)
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and len(coll.get_offsets()):
            pts.append(coll.get_offset_transform().transform(np.asarray(coll.get_offsets(), dtype=float)))
        elif isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                pts.append(dense(coll.get_transform().transform(np.asarray(seg, dtype=float))))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible():
            bb = patch.get_window_extent()
            corners = np.array([[bb.x0, bb.y0], [bb.x1, bb.y0], [bb.x1, bb.y1], [bb.x0, bb.y1], [bb.x0, bb.y0]])
            pts.append(dense(corners))
            # the inside of a bar is data too: a coarse grid over it
            gx, gy = np.meshgrid(np.linspace(bb.x0, bb.x1, 4), np.linspace(bb.y0, bb.y1, 8))
            pts.append(np.column_stack([gx.ravel(), gy.ravel()]))
    if not pts:
        return np.empty((0, 2))
    xy = np.vstack([p for p in pts if len(p)]) if any(len(p) for p in pts) else np.empty((0, 2))
    return xy[np.isfinite(xy).all(axis=1)]


def covered(bbox, points: np.ndarray, pad: float = 1.0) -> int:
    """How many display-space points lie inside `bbox` (grown by `pad` pixels)."""
    if not len(points):
        return 0
    x, y = points[:, 0], points[:, 1]
    return int(np.count_nonzero((x >= bbox.x0 - pad) & (x <= bbox.x1 + pad) & (y >= bbox.y0 - pad)
                                & (y <= bbox.y1 + pad)))


def _inside_axes(ax, bbox) -> bool:
    a = ax.get_window_extent()
    return bbox.x0 >= a.x0 - 0.5 and bbox.x1 <= a.x1 + 0.5 and bbox.y0 >= a.y0 - 0.5 and bbox.y1 <= a.y1 + 0.5


def place_legend(ax, handles=None, labels=None, outside: str = "right", **kw):
    """Draw the legend in the first inside position where it covers no data point and no
    reference label; if every inside position covers data, put it outside the axes
    (`outside`: 'right' or 'below'). Returns the Legend (or None when there is nothing)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    points = data_points(ax)
    labels_bb = [t.get_window_extent() for t in ax.texts if t.get_gid() == "reference-label"]
    best = None
    for loc in INSIDE:
        leg = ax.legend(handles, labels, loc=loc, **kw)
        ax.figure.canvas.draw()
        bb = leg.get_window_extent()
        hits = covered(bb, points) + sum(bb.overlaps(t) for t in labels_bb)
        if hits == 0 and _inside_axes(ax, bb):
            leg.set_gid(f"legend-inside:{loc}")
            return leg
        if best is None or hits < best[0]:
            best = (hits, loc)
        leg.remove()
    if outside == "below":
        leg = ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=min(2, len(handles)),
                        **kw)
    else:
        leg = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), **kw)
    leg.set_gid("legend-outside")
    return leg


def figure_legend(fig, axes: Sequence, handles, labels, **kw):
    """One legend for a multi-panel figure, above the panels (covers no data by construction)."""
    leg = fig.legend(handles, labels, loc="outside upper center", ncols=min(len(handles), 4), **kw)
    leg.set_gid("legend-figure")
    return leg


def write_figures(plots: dict, report, directory, fmt: str = "png") -> list[tuple[Path, str]]:
    """Draw `plots` (name → draw(report) → (figure, caption)) into `directory` (created if needed)
    as NAME.{fmt}, each written atomically with its caption in the file's metadata.
    Returns [(path, caption), ...]. A `directory` that is a file is an InputError."""
    fmt = check_format(fmt)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        from loopdyn.models.errors import InputError

        raise InputError(f"--plots {directory}: exists and is not a folder")
    out = []
    for name, draw in plots.items():
        fig, caption = draw(report)
        out.append((save(fig, directory / f"{name}.{fmt}", fmt, caption=caption), caption))
    return out
