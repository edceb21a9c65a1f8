"""The figures of `loopdyn compare`, in loopdyn's one style: training loss, ρ(Ā), the state norm
during training, and validation loss against test-time loops, one panel per learning rate.

Each `plot_*` takes a `CompareResult` and returns (figure, caption); the caption is written
from what was drawn and measured. `PLOTS` names them for `loopdyn.report.write_outputs`.
"""
from __future__ import annotations

import math

import numpy as np

from loopdyn.compare import (EXPLOSION_LOOPS, INJECTIONS, UNIT, CompareResult, RunRecord, injections_in_order,
                             smoothed)
from loopdyn.plots import style

COLORS, LABELS = style.COLORS, style.LABELS


def _by_lr(records: list[RunRecord]) -> dict[float, list[RunRecord]]:
    out: dict[float, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.spec["lr"], []).append(r)
    return dict(sorted(out.items()))


def _panels(result: CompareResult, height: float = 2.3):
    """One panel per learning rate, up to three a row, at the full page width."""
    groups = _by_lr(result.records)
    n = max(len(groups), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = style.figure(style.DOUBLE if cols > 1 else style.SINGLE + 0.4, height * rows + 0.35,
                             nrows=rows, ncols=cols, squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n], groups


class _Drawn:
    """What a figure actually drew, for its legend and caption."""

    def __init__(self, result: CompareResult):
        self.handles: dict[str, object] = {}
        self.first_seed = min((r.spec.get("seed", 0) for r in result.records), default=0)

    def line(self, ax, r: RunRecord, x, y, **kw):
        """One run's curve in its parameterisation's colour (other seeds lighter)."""
        inj = r.spec["injection"]
        label = LABELS.get(inj, inj)
        kw.setdefault("ls", style.LINESTYLES.get(inj, "-"))
        alpha = 1.0 if r.spec.get("seed", 0) == self.first_seed else 0.5
        (h,) = ax.plot(x, y, color=COLORS.get(inj, "0.3"), alpha=alpha, label=label, **kw)
        self.handles.setdefault(label, h)
        return h

    def legend(self, fig, axes, extra: dict | None = None):
        handles = dict(self.handles, **(extra or {}))
        order = [LABELS.get(i, i) for i in injections_in_order(list(INJECTIONS) + list(COLORS))]
        labels = sorted(handles, key=lambda k: order.index(k) if k in order else len(order))
        if labels:
            style.figure_legend(fig, axes, [handles[k] for k in labels], labels)


def _seeds_note(result: CompareResult) -> str:
    seeds = sorted({r.spec.get("seed", 0) for r in result.records})
    return (f"; {len(seeds)} seeds per configuration share their parameterisation's colour (seed {seeds[0]} opaque)"
            if len(seeds) > 1 else "")


def _lrs(groups) -> str:
    return ", ".join(f"{lr:g}" for lr in groups)


@style.styled
def plot_loss_curves(result: CompareResult):
    fig, axes, groups = _panels(result)
    drawn = _Drawn(result)
    window = None
    unigram = None
    for ax, (lr, runs) in zip(axes, groups.items()):
        for r in runs:
            if not r.losses:
                continue
            w = max(5, len(r.losses) // 20)
            window = w
            y = smoothed(r.losses, w)
            drawn.line(ax, r, np.arange(1, len(y) + 1), y)
        unigram = runs[0].unigram_loss
        finite = [v for r in runs for v in smoothed(r.losses, max(5, len(r.losses) // 20)) if math.isfinite(v)]
        if math.isfinite(unigram):
            style.reference_line(ax, unigram, f"unigram baseline {unigram:.2f}", where=0.98)
        top = min(max(finite, default=unigram + 1.5), unigram + 1.5) if math.isfinite(unigram) else None
        bottom = min(finite, default=0.0)
        if top is not None:
            ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("training step")
        style.integer_axis(ax, "x")
        ax.set_xlim(left=0)
    axes[0].set_ylabel(f"training loss ({UNIT})")
    drawn.legend(fig, axes)
    n = sum(1 for r in result.records if r.losses)
    caption = (f"Training loss ({UNIT}, trailing mean over {window or 5} steps) of {n} runs, one panel per learning "
               f"rate ({_lrs(groups)}); dotted: the unigram baseline"
               + (f" ({unigram:.3f} {UNIT})" if unigram is not None and math.isfinite(unigram) else "")
               + "; the y axis is cut 1.5 nats above the baseline" + _seeds_note(result) + ".")
    return fig, caption


@style.styled
def plot_spectral_radius(result: CompareResult):
    fig, axes, groups = _panels(result)
    drawn = _Drawn(result)
    values = [v for r in result.records for v in r.spectral_radius if v is not None and math.isfinite(v)]
    scale = "linear"
    for ax, (lr, runs) in zip(axes, groups.items()):
        for r in runs:
            if r.spectral_radius:
                drawn.line(ax, r, r.probe_steps[: len(r.spectral_radius)], style.finite(r.spectral_radius),
                           marker=".", ms=2.5)
        scale = style.auto_scale(ax, values + [1.0])
        if scale == "linear":
            ax.set_ylim(0, max(values + [1.0]) * 1.08)
        style.reference_line(ax, 1.0, "ρ = 1 (stability limit)", style="--", where=0.02)
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("training step")
        style.integer_axis(ax, "x")
    axes[0].set_ylabel("spectral radius ρ(Ā)")
    drawn.legend(fig, axes)
    hi = max(values) if values else float("nan")
    above = sorted({f"{r.spec['lr']:g}" for r in result.records
                    if any(v is not None and math.isfinite(v) and v > 1 for v in r.spectral_radius)
                    and r.spec["injection"] != "additive"})
    caption = (f"Spectral radius ρ(Ā) of the injection's state operator during training ({len(values)} probes over "
               f"{sum(1 for r in result.records if r.spectral_radius)} looped runs, {scale} axis), one panel per "
               f"learning rate; dashed: ρ = 1, above which the LTI part of the loop is unstable. Largest value "
               f"{hi:.3g}" + (f"; ρ(Ā) > 1 at lr {', '.join(above)}" if above else "; no run except additive "
                              "(ρ = 1 by construction) reached 1") + _seeds_note(result) + ".")
    return fig, caption


@style.styled
def plot_state_norm(result: CompareResult):
    fig, axes, groups = _panels(result)
    drawn = _Drawn(result)
    values = [n[i] for r in result.records if r.mean_loops for n in r.state_norms
              for i in (r.mean_loops, -1) if len(n) > r.mean_loops and math.isfinite(n[i])]
    mus = sorted({r.mean_loops for r in result.records if r.mean_loops})
    scale = "linear"
    for ax, (lr, runs) in zip(axes, groups.items()):
        for r in runs:
            if not r.state_norms or not r.mean_loops:
                continue
            steps = r.probe_steps[: len(r.state_norms)]
            drawn.line(ax, r, steps, style.finite([n[r.mean_loops] for n in r.state_norms]), marker=".", ms=2.5)
            ax.plot(steps, style.finite([n[-1] for n in r.state_norms]), color=COLORS.get(r.spec["injection"], "0.3"),
                    ls=":", lw=1.0, alpha=0.9, label="_nolegend_")
        scale = style.auto_scale(ax, values)
        if scale == "linear" and values:
            ax.set_ylim(0, max(values) * 1.08)
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("training step")
        style.integer_axis(ax, "x")
    axes[0].set_ylabel("mean token ‖h_T‖₂")
    from matplotlib.lines import Line2D

    extra = {"T = μ_rec": Line2D([], [], color="0.3", ls="-"),
             f"T = {EXPLOSION_LOOPS}μ_rec": Line2D([], [], color="0.3", ls=":")} if values else {}
    drawn.legend(fig, axes, extra)
    mu_text = f"μ_rec = {mus[0]}" if len(mus) == 1 else "μ_rec"
    caption = (f"Mean token state norm ‖h_T‖₂ on a fixed probe batch during training, at the trained depth T = "
               f"{mu_text} (solid) and at T = {EXPLOSION_LOOPS}μ_rec (dotted), one panel per learning rate "
               f"({scale} axis)" + _seeds_note(result) + ".")
    return fig, caption


@style.styled
def plot_val_vs_loops(result: CompareResult):
    fig, axes, groups = _panels(result)
    drawn = _Drawn(result)
    from matplotlib.ticker import FixedLocator, NullLocator

    loops = sorted({int(k) for r in result.records if r.mean_loops for k in r.val_by_loops})
    mus = sorted({r.mean_loops for r in result.records if r.mean_loops})
    fixed_drawn = baseline_drawn = False
    for ax, (lr, runs) in zip(axes, groups.items()):
        shown = []
        for r in runs:
            if r.spec["injection"] == "fixed" or not r.mean_loops:
                v = r.val_by_loops.get("0")
                if v is not None and math.isfinite(v):
                    h = ax.axhline(v, color=COLORS["fixed"], ls=style.LINESTYLES["fixed"], lw=1.2,
                                   label=LABELS["fixed"])
                    drawn.handles.setdefault(LABELS["fixed"], h)
                    fixed_drawn = True
                    shown.append(v)
                continue
            ts = sorted(int(k) for k in r.val_by_loops)
            ys = style.finite([r.val_by_loops[str(t)] for t in ts])
            drawn.line(ax, r, ts, ys, marker=style.MARKERS.get(r.spec["injection"], "o"), ms=3)
            shown += [y for y in ys if math.isfinite(y)]
        unigram = runs[0].unigram_loss
        if shown:
            top = min(max(shown), unigram + 0.5) if math.isfinite(unigram) else max(shown)
            bottom = min(shown)
            near = math.isfinite(unigram) and bottom - 0.5 <= unigram <= top + 0.5
            if near:  # show the baseline when it is within half a nat of the data
                top, bottom = max(top, unigram), min(bottom, unigram)
            pad = 0.08 * max(top - bottom, 0.02)
            ax.set_ylim(bottom - pad, top + 2.5 * pad)
            if near:
                style.reference_line(ax, unigram, "unigram baseline", where=0.02)
                baseline_drawn = True
        if loops:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(loops))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(style.integer_formatter())
            ax.set_xlim(min(loops) / 1.3, max(loops) * 1.3)
        for mu in mus:
            style.reference_line(ax, mu, f"trained depth μ_rec = {mu}", orientation="v", where=0.98)
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("test-time loops T")
    axes[0].set_ylabel(f"validation loss ({UNIT})")
    drawn.legend(fig, axes)
    caption = (f"Validation loss ({UNIT}) of the trained models against the number of loops run at test time "
               f"(T = {', '.join(map(str, loops))}), one panel per learning rate; dotted vertical: the trained depth "
               + (f"μ_rec = {mus[0]}" if len(mus) == 1 else "μ_rec")
               + ("; dashed horizontal: the fixed-depth twin (no loops)" if fixed_drawn else "")
               + ("; dotted horizontal: the unigram baseline" if baseline_drawn else "")
               + "; the y axis is cut 0.5 nats above the unigram baseline" + _seeds_note(result) + ".")
    return fig, caption


PLOTS = {"loss_curves": plot_loss_curves, "spectral_radius": plot_spectral_radius,
         "state_norm": plot_state_norm, "val_vs_loops": plot_val_vs_loops}
