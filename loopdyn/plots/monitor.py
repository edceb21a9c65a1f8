"""The monitor figure: the signals a StabilityMonitor recorded over training, with its alerts.

`loopdyn train --probes --plots DIR` draws it after training; in Python,
`plot_monitor(monitor)` returns (figure, caption). It reads only the monitor's public API:
`monitor.history` (signal → Series with .steps and .values) and `monitor.alerts` (objects with
step, kind, severity, signal, value, message). One panel per signal group, sharing the step
axis; every alert is a vertical line across all panels and a marker on the panel of its
signal, by category:

* warning — early warnings of instability (`early_warning`, `spike_warning`,
  `loop_instability`, `trend`): orange ▲;
* spike — the spike is here (`spike`, `nonfinite`): vermillion ✕;
* action — what the monitor did (`action`: skip, rollback, cut-lr, stop): black ◆.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from loopdyn.plots import style

# (panel title/ylabel, [(signal, legend label, line style)], reference line at y or None)
PANELS = [
    ("training loss", [("loss", "loss", "-")], None),
    ("gradient norm", [("grad_norm", "‖g‖₂", "-")], None),
    ("injection Ā", [("injection_radius", "ρ(Ā)", "-"), ("injection_norm", "‖Ā‖₂", "--")], 1.0),
    ("state norm ‖h_T‖₂", [("state_norm", "mean token", "-"), ("state_norm_max", "max token", ":")], None),
    ("loop Jacobian", [("jacobian_norm", "σ_max(∂h_(t+1)/∂h_t)", "-")], 1.0),
    ("update / parameter", [("update_ratio", "‖Δθ‖/‖θ‖", "-")], None),
    ("max attention logit", [("attn_logit_max", "max logit", "-")], None),
]
CATEGORY = {"early_warning": "warning", "spike_warning": "warning", "loop_instability": "warning",
            "trend": "warning", "spike": "spike", "nonfinite": "spike", "action": "action"}
ALERT_STYLE = {"warning": dict(marker="^", color=style.OKABE_ITO["orange"], ls=":"),
               "spike": dict(marker="X", color=style.OKABE_ITO["vermillion"], ls="--"),
               "action": dict(marker="D", color=style.OKABE_ITO["black"], ls="-")}


def alert_category(alert) -> str | None:
    """warning | spike | action for an alert's kind (None for probe errors and unknown kinds)."""
    kind = str(getattr(alert, "kind", ""))
    if kind in CATEGORY:
        return CATEGORY[kind]
    if "warning" in kind or "instability" in kind:
        return "warning"
    if "spike" in kind:
        return "spike"
    return None


def _series(history, name):
    try:
        s = history[name]
    except KeyError:
        return None
    steps, values = np.asarray(s.steps), np.asarray(s.values, dtype=float)
    return (steps, values) if len(steps) else None


@style.styled
def plot_monitor(monitor, title: str | None = None):
    """(figure, caption) of the monitor's signals over training with its alerts marked."""
    history = monitor.history
    alerts = list(monitor.alerts)
    panels = []
    for name, signals, ref in PANELS:
        present = [(sig, label, ls, _series(history, sig)) for sig, label, ls in signals]
        present = [p for p in present if p[3] is not None]
        if present:
            panels.append((name, present, ref))
    if not panels:
        from loopdyn.models.errors import InputError

        raise InputError("the monitor recorded no signals to plot")
    n = len(panels)
    fig, axes = style.figure(style.DOUBLE if n > 3 else style.SINGLE + 0.6, 1.25 * n + 0.6, nrows=n, sharex=True,
                             squeeze=False)
    axes = list(axes.ravel())
    by_signal = {}
    for ax, (name, present, ref) in zip(axes, panels):
        values = []
        for i, (sig, label, ls, (steps, v)) in enumerate(present):
            sparse = len(steps) <= 20  # e.g. the Jacobian every 100 steps: show each value
            ax.plot(steps, style.finite(v), ls=ls, color=style.SEQUENCE[i], lw=0.9, label=label,
                    marker="o" if sparse else None, ms=3)
            values += [x for x in v if math.isfinite(x)]
            by_signal[sig] = (ax, steps, v)
        style.auto_scale(ax, values)
        if ref is not None and values and min(values) < ref * 3 and max(values) > ref / 3:
            style.reference_line(ax, ref, "ρ = 1" if "Ā" in name else "1", style="--", where=0.01)
        ax.set_ylabel(name, fontsize=7)
        if len(present) > 1:
            style.place_legend(ax)
    counts = {"warning": 0, "spike": 0, "action": 0}
    first = {}
    for a in alerts:
        cat = alert_category(a)
        if cat is None:
            continue
        counts[cat] += 1
        first.setdefault(cat, a.step)
        st = ALERT_STYLE[cat]
        for ax in axes:
            ax.axvline(a.step, color=st["color"], ls=st["ls"], lw=0.7, alpha=0.7, zorder=1, gid="reference-line")
        target = by_signal.get(getattr(a, "signal", None)) or by_signal.get("loss")
        ax, steps, v = target if target else (axes[0], None, None)
        y = None
        if steps is not None and len(steps):
            k = int(np.argmin(np.abs(np.asarray(steps) - a.step)))
            y = v[k] if math.isfinite(v[k]) else None
        if y is None:
            ax.plot([a.step], [0.97], marker=st["marker"], color=st["color"], ms=5, ls="none",
                    transform=ax.get_xaxis_transform(), clip_on=False, zorder=6)
        else:
            ax.plot([a.step], [y], marker=st["marker"], color=st["color"], ms=5, ls="none", mec="white", mew=0.5,
                    zorder=6)
    axes[-1].set_xlabel("training step")
    style.integer_axis(axes[-1], "x")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=ALERT_STYLE[c]["marker"], color=ALERT_STYLE[c]["color"], ls=ALERT_STYLE[c]["ls"],
                      lw=0.8, ms=5) for c in ("warning", "spike", "action")]
    labels = [f"{c} ({counts[c]})" for c in ("warning", "spike", "action")]
    style.figure_legend(fig, axes, handles, labels)
    if title:
        axes[0].set_title(title)
    drawn = ", ".join(f"{name}" for name, _, _ in panels)
    alert_text = ("; ".join(f"{counts[c]} {c}{'s' if counts[c] != 1 else ''}"
                            + (f" (first at step {first[c]})" if c in first else "") for c in counts))
    caption = (f"Signals recorded by the stability monitor over training ({drawn}), one panel each, against the "
               f"optimiser step; alerts are vertical lines across all panels with a marker on their signal: "
               f"warnings ▲ dotted, spikes ✕ dashed, actions ◆ solid — {alert_text}.")
    return fig, caption


def write_monitor_plot(monitor, directory, fmt: str = "png", title: str | None = None) -> tuple[Path, str]:
    """Write DIR/monitor.{fmt} (atomically, caption in the file's metadata); return (path, caption)."""
    fmt = style.check_format(fmt)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        from loopdyn.models.errors import InputError

        raise InputError(f"--plots {directory}: exists and is not a folder")
    fig, caption = plot_monitor(monitor, title)
    return style.save(fig, directory / f"monitor.{fmt}", fmt, caption=caption), caption
