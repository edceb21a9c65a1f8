"""The outputs of `loopdyn compare`: summary.json, figures, findings and a self-contained report.html.

Figures are drawn in loopdyn's one style (loopdyn.style): PNG at 300 dpi, or PDF/SVG with
`--format`; each comes with a caption written from what was drawn and measured. The report
page stamps the loopdyn version, the exact command, the date and the machine; it gives one
short verdict per run with the deciding evidence in a <details> element, and prints to PDF
(A4, the convergence matrix on the first page). Everything is written atomically.
"""
from __future__ import annotations

import base64
import html
import math
import os
import platform
import shlex
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from loopdyn.models.fileio import atomic_write_json, atomic_write_text, json_safe
from loopdyn import style
from loopdyn.gridstatus import status_html
from loopdyn.compare import (DIVERGE_MARGIN, EXPLOSION_LOOPS, EXPLOSION_RATIO, INJECTIONS, MIN_TREND_STEPS,
                             STEEP_DROP, STEEP_T, CompareResult, RunRecord, smoothed)

COLORS, LABELS = style.COLORS, style.LABELS
OUTCOME_MARK = {"converged": "✓ converged", "inconclusive": "… inconclusive", "diverged": "✗ diverged",
                "residual explosion": "✗ residual explosion", "pending": "· pending", "running": "▸ running",
                "failed": "✗ failed"}
# loopdyn.data reads every corpus as bytes (a 256-id vocabulary): losses are per byte
UNIT = style.loss_unit(byte_level=True)


def _injections(names) -> list[str]:
    """Parameterisations in the canonical order (INJECTIONS first, then any other, sorted)."""
    names = set(names)
    return [i for i in INJECTIONS if i in names] + sorted(names - set(INJECTIONS))


# ---- numbers ---------------------------------------------------------------------------------

def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def run_summary(r: RunRecord) -> dict:
    mu = r.mean_loops
    norms = r.final_state_norms
    growth = None
    if mu and len(norms) > mu and norms[mu]:
        growth = _finite(norms[-1] / norms[mu])
    rho = [v for v in r.spectral_radius if v is not None and math.isfinite(v)]
    return {
        "name": _name(r), "injection": r.spec["injection"], "lr": r.spec["lr"], "seed": r.spec["seed"],
        "params": r.params, "mean_loops": mu, "steps": r.steps, "tokens": r.tokens, "seconds": round(r.seconds, 1),
        "outcome": r.outcome, "outcome_reason": r.outcome_reason, "note": r.note,
        "final_train_loss": _finite(np.mean(r.losses[-max(5, len(r.losses) // 10):])) if r.losses else None,
        "val_by_loops": {k: _finite(v) for k, v in r.val_by_loops.items()},
        "spectral_radius_final": _finite(r.spectral_radius[-1]) if r.spectral_radius else None,
        "spectral_radius_max": max(rho) if rho else None,
        "spectral_norm_final": _finite(r.spectral_norm[-1]) if r.spectral_norm else None,
        "state_growth": growth,  # ‖h_{4μ}‖ / ‖h_μ‖ of the trained model
        "audit_verdict": (r.audit or {}).get("verdict"),
        "audit_evidence": (r.audit or {}).get("evidence"),
        "alerts": len(r.alerts), "stop_reason": r.stop_reason,
    }


def _name(r: RunRecord) -> str:
    s = r.spec
    return f"{s['injection']}-lr{s['lr']:g}-seed{s['seed']}"


def findings(result: CompareResult) -> list[str]:
    """One sentence per parameterization (all seeds and learning rates), then the best run."""
    out = []
    by_inj: dict[str, list[dict]] = {}
    for r in result.records:
        by_inj.setdefault(r.spec["injection"], []).append(run_summary(r))
    for inj in _injections(by_inj):
        s = by_inj[inj]
        sentence = f"The {LABELS.get(inj, inj)}{'' if inj == 'fixed' else ' injection'} {_outcomes_by_lr(s)}"
        rho = [x["spectral_radius_max"] for x in s if x["spectral_radius_max"] is not None]
        if inj == "additive":
            sentence += "; ρ(Ā) = 1 by construction"
        elif rho and max(rho) < 1:
            sentence += f"; ρ(Ā) stayed below 1 in every run (at most {max(rho):.2f})"
        elif rho:
            above = sorted({x["lr"] for x in s if (x["spectral_radius_max"] or 0) >= 1})
            sentence += (f"; ρ(Ā) climbed past 1 at lr {', '.join(f'{lr:g}' for lr in above)} "
                         f"(up to {max(rho):.2f})")
        growing = [x["state_growth"] for x in s if x["note"] and x["state_growth"]]
        if growing:
            sentence += f"; the state keeps growing with loops (‖h_4μ‖/‖h_μ‖ up to {max(growing):.2f})"
        verdicts = [x["audit_verdict"] for x in s if x["audit_verdict"]]
        if verdicts:
            counts = {v: verdicts.count(v) for v in ("stable", "marginal", "explosive") if v in verdicts}
            sentence += "; audit: " + ", ".join(f"{v} {n}/{len(verdicts)}" for v, n in counts.items())
        if inj == "fixed":
            vals = [x["val_by_loops"].get("0") for x in s if x["val_by_loops"].get("0") is not None]
            if vals:
                sentence += f"; best validation loss {min(vals):.3f} {UNIT}"
        out.append(sentence + ".")
    best = _best_run(result)
    if best is not None:
        out.append(f"Best validation loss at the trained depth: {best[1]:.3f} {UNIT} ({best[0]}).")
    pending = [run_summary(r)["name"] for r in result.records if r.outcome == "inconclusive"]
    if pending:
        out.append(f"{len(pending)} run(s) too short to judge (inconclusive: not yet below the unigram baseline, "
                   f"nothing diverged): {', '.join(pending)}; train longer (--steps) to decide them.")
    return out


def _outcomes_by_lr(runs: list[dict]) -> str:
    """'converged at every learning rate (…)', or per learning rate what happened across seeds."""
    by_lr: dict[float, list[str]] = {}
    for x in runs:
        by_lr.setdefault(x["lr"], []).append(x["outcome"])
    lrs = sorted(by_lr)
    seeds = max(len(v) for v in by_lr.values())
    every = " in every seed" if seeds > 1 else ""
    if all(o == "converged" for v in by_lr.values() for o in v):
        return f"converged at every learning rate ({', '.join(f'{lr:g}' for lr in lrs)}){every}"
    groups: dict[str, list[float]] = {}  # outcome description → learning rates, in order
    for lr in lrs:
        outcomes = by_lr[lr]
        if len(set(outcomes)) == 1:
            what = outcomes[0]
        else:
            what = ", ".join(f"{outcomes.count(o)}/{len(outcomes)} {o}" for o in sorted(set(outcomes)))
        groups.setdefault(what, []).append(lr)
    return "; ".join(f"{what} at lr {' and '.join(f'{lr:g}' for lr in group)}" for what, group in groups.items())


def _best_run(result: CompareResult) -> tuple[str, float] | None:
    best = None
    for r in result.records:
        mu = r.mean_loops
        v = r.val_by_loops.get(str(mu) if mu else "0")
        if v is not None and math.isfinite(v) and r.outcome == "converged" and (best is None or v < best[1]):
            best = (_name(r), v)
    return best


CRITERIA = {
    "diverged": f"non-finite loss; or final smoothed loss > best smoothed loss + {DIVERGE_MARGIN} nats; or final "
                f"validation loss not below the unigram baseline while the training loss stalled more than "
                f"{DIVERGE_MARGIN} nats above it",
    "residual explosion": f"not diverged, and a state norm is non-finite for T ≤ {EXPLOSION_LOOPS}·μ_rec "
                          f"or ‖h_{{{EXPLOSION_LOOPS}μ}}‖/‖h_μ‖ > {EXPLOSION_RATIO:g}",
    "inconclusive": f"too short to judge: not diverged, no explosion, the final validation loss not yet below the "
                    f"unigram baseline, and the training loss still falling steeply (last quarter of the steps "
                    f"≥ {STEEP_DROP} nats and {STEEP_T:g} standard errors below the quarter before) or resting on "
                    f"the unigram plateau (within {DIVERGE_MARGIN} nats), or fewer than {MIN_TREND_STEPS} steps",
    "converged": "otherwise",
}


def summary(result: CompareResult) -> dict:
    runs = [run_summary(r) for r in result.records]
    first = result.records[0].spec if result.records else {}
    return json_safe({
        "setup": {k: first.get(k) for k in ("preset", "steps", "batch_size", "seq_len", "data")},
        "unit": UNIT,
        "criteria": CRITERIA,
        "matrix": result.matrix(),
        "findings": findings(result),
        "runs": runs,
        **({"status": result.status} if result.status else {}),  # pending / running / failed runs
    })


# ---- figures ---------------------------------------------------------------------------------

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
        order = [LABELS.get(i, i) for i in _injections(list(INJECTIONS) + list(COLORS))]
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


# ---- provenance --------------------------------------------------------------------------------

def provenance(command: str | None, result: CompareResult | None = None) -> dict:
    """loopdyn version, the exact command, the date (UTC) and the machine (CPU, GPU, threads)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("loopdyn")
    except PackageNotFoundError:
        ver = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001 - provenance must never stop a report
        torch_version = "unknown"
    threads = (f"{result.jobs} process(es) × {result.threads} thread(s)" if result is not None
               else f"{os.cpu_count()} core(s)")
    return {"loopdyn": ver, "command": command or "(called from Python)",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "threads": threads,
                        "python": platform.python_version(), "torch": torch_version,
                        "platform": platform.platform(terse=True)}}


def command_line(name: str, options: list[tuple[str, object]], flags: list[str] = ()) -> str:
    """`loopdyn NAME --opt value ...` with every option spelled out (shell-quoted)."""
    parts = ["loopdyn", name]
    for opt, value in options:
        if value is not None:
            parts += [opt, str(value)]
    parts += list(flags)
    return shlex.join(parts)


# ---- writing everything ----------------------------------------------------------------------

def write_outputs(result: CompareResult, fmt: str = "png", command: str | None = None, plots: bool = True) -> dict:
    """Write summary.json, the figures (in `fmt`) and report.html into result.out; return the summary.
    plots=False (partial results while a grid runs) leaves the figures out."""
    fmt = style.check_format(fmt)
    out = Path(result.out)
    data = summary(result)
    data["provenance"] = provenance(command, result)
    figures = {}
    for name, plot in (PLOTS if plots else {}).items():
        fig, caption = plot(result)
        style.save(fig, out / f"{name}.{fmt}", fmt, caption=caption)
        png = style.render(fig, "png", dpi=200)
        figures[name] = (png, caption)
    data["figures"] = {f"{name}.{fmt}": caption for name, (_, caption) in figures.items()}
    atomic_write_json(out / "summary.json", data)
    atomic_write_text(out / "report.html", render_html(data, figures))
    return data


def _fmt(v, f="{:.3g}") -> str:
    return "n/a" if v is None else f.format(v)


def _css(outcome: str) -> str:
    if not outcome:
        return ""
    if "diverged" in outcome or "explosion" in outcome or "failed" in outcome:
        return "bad"
    if "inconclusive" in outcome or "pending" in outcome or "running" in outcome:
        return "wait"
    return "ok"


def verdict_line(r: dict) -> str:
    """One short sentence: the outcome and the one number that decided it."""
    mu = r["mean_loops"]
    val = r["val_by_loops"].get(str(mu) if mu else "0")
    audit = f"; audit {r['audit_verdict']}" if r.get("audit_verdict") else ""
    if r["outcome"] == "converged":
        extra = f", ‖h_4μ‖/‖h_μ‖ {r['state_growth']:.2f}" if r.get("state_growth") is not None else ""
        return f"validation {_fmt(val, '{:.3f}')} {UNIT}{extra}{audit}"
    if r["outcome"] == "residual explosion":
        g = r.get("state_growth")
        return (f"state explodes with loops ({'‖h_4μ‖/‖h_μ‖ ' + _fmt(g) if g is not None else 'non-finite'})"
                f"{audit}")
    if r["outcome"] == "inconclusive":
        return f"too short to judge (validation {_fmt(val, '{:.3f}')} {UNIT}, not yet below the baseline){audit}"
    return (r["outcome_reason"].split(" (")[0] if r["outcome_reason"] else "diverged") + audit


def render_html(data: dict, figures: dict[str, tuple[bytes, str]]) -> str:
    e = html.escape
    runs = data["runs"]
    unfinished = (data.get("status") or {}).get("runs", [])
    lrs = sorted({r["lr"] for r in runs} | {r["lr"] for r in unfinished})
    injections = _injections({r["injection"] for r in runs} | {r["injection"] for r in unfinished})
    params = {r["injection"]: r["params"] for r in runs}
    setup = data["setup"]
    prov = data.get("provenance") or provenance(None)
    m = prov["machine"]
    rows = []
    for inj in injections:
        cells = []
        for lr in lrs:
            outcome = data["matrix"].get(inj, {}).get(f"{lr:g}", "")
            cells.append(f'<td class="{_css(outcome)}">{e(OUTCOME_MARK.get(outcome, outcome))}</td>')
        rows.append(f"<tr><th scope='row'>{e(LABELS.get(inj, inj))}</th><td class='num'>{f'{params[inj]:,}' if inj in params else '…'}</td>"
                    f"{''.join(cells)}</tr>")
    matrix = ("<table class='matrix' id='matrix'><thead><tr><th>parameterisation</th><th>parameters</th>"
              + "".join(f"<th>lr {lr:g}</th>" for lr in lrs) + "</tr></thead><tbody>" + "".join(rows)
              + "</tbody></table>")
    run_rows = []
    for r in runs:
        evidence = r["audit_evidence"] or []
        if isinstance(evidence, str):
            evidence = [evidence]
        vals = "; ".join(f"T = {k}: {_fmt(v, '{:.3f}')}" for k, v in
                         sorted(r["val_by_loops"].items(), key=lambda kv: int(kv[0])))
        facts = [f"<b>why {e(r['outcome'])}</b>: {e(r['outcome_reason'])}"]
        if r["note"]:
            facts.append(f"<b>note</b>: {e(r['note'])}")
        facts.append(f"<b>validation loss by test-time loops</b> ({UNIT}): {e(vals)}")
        facts.append(f"<b>final training loss</b>: {_fmt(r['final_train_loss'], '{:.3f}')} {UNIT}; "
                     f"<b>max ρ(Ā)</b> {_fmt(r['spectral_radius_max'])}; <b>final ‖Ā‖₂</b> "
                     f"{_fmt(r['spectral_norm_final'])}; <b>‖h_4μ‖/‖h_μ‖</b> {_fmt(r['state_growth'])}; "
                     f"<b>alerts</b> {r['alerts']}; {r['steps']} steps, {r['tokens']:,} tokens, {r['seconds']} s")
        if evidence:
            facts.append("<b>audit evidence</b> (the first decided):<ol>"
                         + "".join(f"<li>{e(x)}</li>" for x in evidence) + "</ol>")
        run_rows.append(
            f"<tr><td>{e(r['name'])}</td><td class='{_css(r['outcome'])}'>{e(OUTCOME_MARK.get(r['outcome'], r['outcome']))}"
            f"</td><td><details><summary>{e(verdict_line(r))}</summary><div class='evidence'>"
            + "".join(f"<p>{f}</p>" if not f.startswith("<b>audit") else f for f in facts)
            + "</div></details></td></tr>")
    figs = "".join(
        f"<figure id='fig-{e(name)}'><img src='data:image/png;base64,{base64.b64encode(png).decode()}' "
        f"alt='{e(caption)}'><figcaption><b>Figure {i}.</b> {e(caption)}</figcaption></figure>"
        for i, (name, (png, caption)) in enumerate(figures.items(), 1))
    criteria = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in data["criteria"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loopdyn compare — {e(str(setup.get('preset')))}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
:root {{ --ok: #d9efe6; --bad: #f7dccb; --wait: #ececec; }}
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1000px;
        padding: 0 1em; color: #1a1a1a; }}
h1 {{ font-size: 1.5em; margin: 0 0 .2em; }} h2 {{ font-size: 1.15em; margin: 1.2em 0 .4em; }}
.stamp {{ font-size: 12px; color: #444; border-bottom: 1px solid #ccc; padding-bottom: .5em; }}
.stamp code {{ font-size: 11.5px; background: #f4f4f4; padding: 1px 4px; word-break: break-all; }}
table {{ border-collapse: collapse; margin: .6em 0; font-size: 13px; }}
th, td {{ border: 1px solid #bbb; padding: 3px 8px; text-align: left; vertical-align: top; }}
thead th {{ background: #f2f2f2; }}
.matrix td {{ text-align: center; font-weight: 600; }} td.num {{ text-align: right; font-weight: normal; }}
td.ok {{ background: var(--ok); }} td.bad {{ background: var(--bad); }} td.wait {{ background: var(--wait); }}
.criteria {{ font-size: 12px; color: #333; }}
details summary {{ cursor: pointer; }} .evidence {{ font-size: 12px; color: #333; }}
.evidence p {{ margin: .3em 0; }} .evidence ol {{ margin: .2em 0 .4em 1.2em; padding: 0; }}
figure {{ margin: 1em 0; break-inside: avoid; page-break-inside: avoid; }}
img {{ max-width: 100%; height: auto; display: block; }} figcaption {{ color: #333; font-size: 12.5px; margin-top: .3em; }}
@page {{ size: A4; margin: 14mm 12mm; }}
@media print {{
  body {{ max-width: none; margin: 0; padding: 0; font-size: 11px; }}
  .matrix, .runs tr, figure {{ break-inside: avoid; }}
  td.ok, td.bad, td.wait {{ -webkit-print-color-adjust: exact; print-color-adjust: exact; }}
  #plots {{ break-before: page; }}
  details > summary {{ list-style: none; }}
}}
</style></head><body>
<header>
<h1>loopdyn compare</h1>
<p class="stamp">loopdyn {e(prov['loopdyn'])} · {e(prov['date'])} · <code>{e(prov['command'])}</code><br>
machine: {e(m['cpu'])} ({m['cores']} cores), GPU: {e(m['gpu'])}, {e(m['threads'])}; Python {e(m['python'])},
torch {e(m['torch'])}, {e(m['platform'])}</p>
</header>
<p>Preset <b>{e(str(setup.get('preset')))}</b>, {setup.get('steps')} steps of {setup.get('batch_size')} × {setup.get('seq_len')}
tokens per run; the same seed, data and batch order for every run; data: {e(str(setup.get('data') or 'the Python standard library sources'))}.
Losses in {UNIT}.</p>
{status_html(data)}<h2>Convergence matrix</h2>{matrix}
<ul class="criteria">{criteria}</ul>
<h2>Findings</h2><ul>{''.join(f'<li>{e(f)}</li>' for f in data['findings'])}</ul>
<h2>Runs</h2>
<table class="runs"><thead><tr><th>run</th><th>outcome</th><th>verdict (click for the evidence)</th></tr></thead>
<tbody>{''.join(run_rows)}</tbody></table>
<section id="plots"><h2>Figures</h2>{figs}</section>
</body></html>
"""
