"""Figures for `loopdyn exits --plots DIR` (and `loopdyn audit --exits --plots DIR`):

* exits_pareto — mean loops per token against the relative loss change, one curve per exit
  criterion (its thresholds, the Pareto front solid), the published defaults as large open
  markers, the threshold calibrated for the loss budget filled, the oracle's mean loops and the
  budget as labelled reference lines;
* exits_lens — the per-loop lens: mean loss, entropy, top-1 agreement and KL with the long-run
  output, and the relative residual against loops, with the trained depth and the budget;
* exits_depth — the best depth per token (stacked by dynamical reason) and the probe's best depth
  with its bootstrap interval.

Each `plot_*` takes an `ExitsReport` and returns (figure, caption).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from loopdyn.plots import style

MARK = {"entropy-diff": "o", "latent-diff": "s", "kl": "^", "minp-kl": "v", "argmax-stability": "D",
        "cosine": "P", "exit-gate": "X", "contraction": "*", "none": "."}


def _colour(i: int) -> str:
    return style.SEQUENCE[i % len(style.SEQUENCE)]


@style.styled
def plot_pareto(report):
    cal = report.calibration
    fig, ax = style.figure(style.DOUBLE * 0.62, 3.2)
    names = [n for n in cal.criteria if n != "none"]
    for i, name in enumerate(names):
        pts = [p for p in cal.of(name) if math.isfinite(p.loss_change)]
        if not pts:
            continue
        c = _colour(i)
        front = cal.front(name)
        x = [p.mean_loops for p in sorted(pts, key=lambda p: p.threshold)]
        y = [100 * p.loss_change for p in sorted(pts, key=lambda p: p.threshold)]
        ax.plot(x, y, ls=":", lw=0.6, color=c, marker=MARK.get(name, "o"), ms=2.2, alpha=0.6, label="_nolegend_")
        ax.plot([p.mean_loops for p in front], [100 * p.loss_change for p in front], "-", color=c, lw=1.2,
                marker=MARK.get(name, "o"), ms=3, label=name)
        d = cal.defaults.get(name)
        if d is not None and math.isfinite(d.loss_change):
            ax.plot([d.mean_loops], [100 * d.loss_change], MARK.get(name, "o"), ms=8, mfc="none", mec=c, mew=1.2,
                    label="_nolegend_")
        ch = cal.chosen.get(name)
        if ch is not None:
            ax.plot([ch.mean_loops], [100 * ch.loss_change], MARK.get(name, "o"), ms=7, color=c, mec="black",
                    mew=0.6, label="_nolegend_")
    style.reference_line(ax, 100 * cal.budget, f"budget {100 * cal.budget:g}%", where=0.02)
    style.reference_line(ax, cal.oracle_mean(), "oracle", orientation="v")
    ax.axhline(0, color=style.REFERENCE, lw=0.5)
    ax.set_xlabel(f"mean loops per token (budget T = {cal.budget_loops})")
    ax.set_ylabel("loss change vs. T loops (%)")
    # markers in the legend: the default (open) and the calibrated threshold (filled)
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker="o", ms=7, mfc="none", mec="0.3"),
                Line2D([], [], ls="", marker="o", ms=6, color="0.5", mec="black", mew=0.6)]
    labels += ["published default", f"calibrated (≤ {100 * cal.budget:g}%)"]
    style.place_legend(ax, handles, labels)
    chosen = ", ".join(f"{k} {v.threshold:.3g} ({v.mean_loops:.2f} loops)" for k, v in cal.chosen.items() if v)
    caption = (f"Exit criteria on {report.tokens} probe tokens of {report.model}: mean loops per token against the "
               f"relative loss change from running every token T = {cal.budget_loops} loops, one curve per criterion "
               f"over its thresholds (solid: Pareto front), open markers the published defaults, filled markers the "
               f"threshold with the fewest loops within the {100 * cal.budget:g}% loss budget ({chosen or 'none'}). "
               f"The oracle (the loop after which the prediction stays within KL {cal.oracle_kl:g} nats of the "
               f"{cal.horizon}-loop output) needs {cal.oracle_mean():.2f} loops on average.")
    return fig, caption


@style.styled
def plot_lens(report):
    lens = report.lens
    s = lens.summary()
    t = np.arange(1, lens.loops + 1)
    fig, axes = style.figure(style.DOUBLE, 4.2, nrows=2, ncols=2, sharex=True, squeeze=False)
    (a, b), (c, d) = axes
    a.plot(t, s["loss"], color=_colour(0), label="loss")
    a.set_ylabel("loss (nats)")
    a2 = a.twinx()
    a2.plot(t, s["entropy"], color=_colour(1), ls="--", label="entropy")
    a2.set_ylabel("entropy (nats)", color=_colour(1))
    a2.spines["right"].set_visible(True)
    b.plot(t, 100 * s["top1_agreement"], color=_colour(2))
    b.set_ylabel("top-1 = long run (%)")
    kl = style.finite(s["kl_to_long_run"])
    c.plot(t, np.where(s["kl_to_long_run"] > 0, s["kl_to_long_run"], np.nan), color=_colour(3))
    c.set_ylabel("KL(long run ‖ loop t) (nats)")
    if (kl > 0).any():
        c.set_yscale("log")
    rr = s["rel_residual"]
    d.plot(t, np.where(rr > 0, rr, np.nan), color=_colour(4))
    d.set_ylabel("relative residual ‖hₜ − hₜ₋₁‖/‖hₜ‖")
    if (rr > 0).any():
        d.set_yscale("log")
    for ax in (a, b, c, d):
        style.reference_line(ax, lens.mean_loops, f"μ = {lens.mean_loops}", orientation="v")
        style.integer_axis(ax, "x")
    for ax in (c, d):
        ax.set_xlabel("loop t")
    style.place_legend(a, [a.lines[0], a2.lines[0]], ["loss", "entropy"])
    phases = ", ".join(f"{v} {k}" for k, v in lens.phase_counts().items())
    caption = (f"Per-loop lens of {report.model} on {lens.n_tokens} probe tokens over {lens.loops} loops (trained depth "
               f"μ = {lens.mean_loops}), means over tokens: loss and entropy of the next-token distribution, the share "
               f"of tokens whose top-1 prediction equals the long-run one, the KL from the long-run distribution, and "
               f"the relative residual. Long-run phases: {phases}.")
    return fig, caption


@style.styled
def plot_depth(report):
    dep = report.depth
    from loopdyn.dynamics.exits.depth import REASONS

    fig, (ax, bx) = style.figure(style.DOUBLE, 2.6, ncols=2)
    t = np.arange(1, dep.horizon + 1)
    bottom = np.zeros(dep.horizon)
    for i, reason in enumerate(REASONS):
        mask = np.array([r == reason for r in dep.reason], bool)
        if not mask.any():
            continue
        h = np.bincount(dep.best[mask], minlength=dep.horizon + 1)[1:]
        ax.bar(t, h, bottom=bottom, color=_colour(i), width=0.85, label=f"{reason} ({int(mask.sum())})")
        bottom += h
    style.reference_line(ax, dep.mean_loops, f"μ = {dep.mean_loops}", orientation="v")
    ax.set_xlabel("best depth (loops)")
    ax.set_ylabel("tokens")
    style.integer_axis(ax, "x")
    style.integer_axis(ax, "y")
    style.place_legend(ax)
    bx.plot(t, dep.mean_loss, color=_colour(0), label="mean loss over tokens")
    lo, hi = dep.interval
    bx.axvspan(lo - 0.5, hi + 0.5, color=_colour(5), alpha=0.25, lw=0, label=f"95% bootstrap {lo}–{hi}")
    bx.plot([dep.probe_best], [dep.mean_loss[dep.probe_best - 1]], "o", color=_colour(1), ms=6,
            label=f"best depth T = {dep.probe_best}")
    style.reference_line(bx, dep.mean_loops, f"μ = {dep.mean_loops}", orientation="v")
    bx.set_xlabel("loops")
    bx.set_ylabel("loss (nats)")
    style.integer_axis(bx, "x")
    style.place_legend(bx)
    counts = ", ".join(f"{v} {k}" for k, v in dep.counts().items() if v)
    caption = (f"Best depth per token of {report.model} ({len(dep.best)} tokens with a next token; {counts}) and the "
               f"probe's mean loss against loops, with its best depth T = {dep.probe_best} and a 95% bootstrap "
               f"interval over tokens ({lo}–{hi}).")
    return fig, caption


PLOTS = {"exits_pareto": plot_pareto, "exits_lens": plot_lens, "exits_depth": plot_depth}


def write_exits_plots(report, directory, fmt: str = "png") -> list[tuple[Path, str]]:
    """Draw every figure into `directory` (created if needed) as NAME.{fmt}, each written
    atomically with its caption in the file's metadata. Returns [(path, caption), ...]."""
    return style.write_figures(PLOTS, report, directory, fmt)


__all__ = ["plot_pareto", "plot_lens", "plot_depth", "write_exits_plots", "PLOTS"]
