"""The outputs of `loopdyn compare`: summary.json, plots, findings and a self-contained report.html.

Plots use matplotlib's object-oriented API (Figure + Agg canvas, no pyplot state), are
rendered to memory and written atomically.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from loopdyn.models.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, json_safe
from loopdyn.compare import (DIVERGE_MARGIN, EXPLOSION_LOOPS, EXPLOSION_RATIO, INJECTIONS, CompareResult,
                             RunRecord, smoothed)

COLORS = {"diagonal": "#1f77b4", "linear": "#d62728", "additive": "#2ca02c", "autonomous": "#9467bd",
          "fixed": "#7f7f7f"}
LABELS = {"diagonal": "diagonal (Parcae)", "linear": "linear (Huginn/RDM)", "additive": "additive",
          "autonomous": "autonomous (Ouro-style, no injection)",
          "fixed": "fixed-depth twin"}
OUTCOME_MARK = {"converged": "✓", "diverged": "✗", "residual explosion": "✗ explosion"}


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
    for inj in [i for i in INJECTIONS if i in by_inj]:
        s = by_inj[inj]
        sentence = f"The {LABELS[inj]}{'' if inj == 'fixed' else ' injection'} {_outcomes_by_lr(s)}"
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
                sentence += f"; best validation loss {min(vals):.3f} nats/byte"
        out.append(sentence + ".")
    best = _best_run(result)
    if best is not None:
        out.append(f"Best validation loss at the trained depth: {best[1]:.3f} nats/byte ({best[0]}).")
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


def summary(result: CompareResult) -> dict:
    runs = [run_summary(r) for r in result.records]
    first = result.records[0].spec if result.records else {}
    return json_safe({
        "setup": {k: first.get(k) for k in ("preset", "steps", "batch_size", "seq_len", "data")},
        "criteria": {
            "diverged": f"non-finite loss; or final smoothed loss > best smoothed loss + {DIVERGE_MARGIN} nats; "
                        f"or final validation loss not below the unigram baseline",
            "residual explosion": f"not diverged, and a state norm is non-finite for T ≤ {EXPLOSION_LOOPS}·μ_rec "
                                  f"or ‖h_{{{EXPLOSION_LOOPS}μ}}‖/‖h_μ‖ > {EXPLOSION_RATIO:g}",
            "converged": "otherwise",
        },
        "matrix": result.matrix(),
        "findings": findings(result),
        "runs": runs,
    })


# ---- plots -----------------------------------------------------------------------------------

def _figure(n_panels: int, height: float = 3.2):
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.2 * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _by_lr(records: list[RunRecord]) -> dict[float, list[RunRecord]]:
    out: dict[float, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.spec["lr"], []).append(r)
    return dict(sorted(out.items()))


def _line(ax, r: RunRecord, x, y, **kw) -> None:
    """One run's curve; seeds share their injection's colour and a single legend entry."""
    inj = r.spec["injection"]
    first = LABELS[inj] not in ax.get_legend_handles_labels()[1]
    ax.plot(x, y, color=COLORS[inj], label=LABELS[inj] if first else "_nolegend_", alpha=0.9 if first else 0.5, **kw)


def _panels_by_lr(result: CompareResult, draw) -> bytes:
    """One panel per learning rate; draw(ax, runs) plots them and labels the y axis."""
    groups = _by_lr(result.records)
    fig, axes = _figure(len(groups))
    for ax, (lr, runs) in zip(axes, groups.items()):
        draw(ax, runs)
        ax.set_title(f"lr {lr:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    return _png(fig)


def _loss_panel(ax, runs: list[RunRecord]) -> None:
    for r in runs:
        y = smoothed(r.losses, max(5, len(r.losses) // 20))
        _line(ax, r, np.arange(1, len(y) + 1), y)
    unigram = runs[0].unigram_loss
    ax.axhline(unigram, color="black", lw=0.8, ls=":", label="unigram baseline")
    ax.set(xlabel="step", ylabel="training loss (nats/byte, smoothed)")
    ax.set_ylim(top=min(6.0, unigram + 1.5))


def _radius_panel(ax, runs: list[RunRecord]) -> None:
    for r in runs:
        if r.spectral_radius:
            _line(ax, r, r.probe_steps[: len(r.spectral_radius)], r.spectral_radius, marker=".")
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="ρ = 1 (stability limit)")
    ax.set(xlabel="step", ylabel="spectral radius ρ(Ā)", yscale="log")


def _state_panel(ax, runs: list[RunRecord]) -> None:
    for r in runs:
        if not r.state_norms:
            continue
        steps = r.probe_steps[: len(r.state_norms)]
        _line(ax, r, steps, [n[r.mean_loops] for n in r.state_norms], marker=".")
        ax.plot(steps, [n[-1] for n in r.state_norms], color=COLORS[r.spec["injection"]], ls=":", alpha=0.7)
    ax.set(xlabel="step", ylabel="‖h_T‖ (solid T = μ, dotted T = 4μ)", yscale="log")


def _val_panel(ax, runs: list[RunRecord]) -> None:
    for r in runs:
        if r.spec["injection"] == "fixed":
            v = r.val_by_loops.get("0")
            if v is not None and math.isfinite(v):
                first = LABELS["fixed"] not in ax.get_legend_handles_labels()[1]
                ax.axhline(v, color=COLORS["fixed"], ls="--", label=LABELS["fixed"] if first else "_nolegend_")
            continue
        loops = sorted(int(k) for k in r.val_by_loops)
        _line(ax, r, loops, [r.val_by_loops[str(t)] for t in loops], marker="o")
    ax.set(xlabel="test-time loops T", ylabel="validation loss (nats/byte)", xscale="log")
    finite = [v for r in runs for v in r.val_by_loops.values() if v is not None and math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, min(max(finite) + 0.1, runs[0].unigram_loss + 1.5))


def plot_loss_curves(result: CompareResult) -> bytes:
    return _panels_by_lr(result, _loss_panel)


def plot_spectral_radius(result: CompareResult) -> bytes:
    return _panels_by_lr(result, _radius_panel)


def plot_state_norm(result: CompareResult) -> bytes:
    return _panels_by_lr(result, _state_panel)


def plot_val_vs_loops(result: CompareResult) -> bytes:
    return _panels_by_lr(result, _val_panel)


PLOTS = {"loss_curves.png": plot_loss_curves, "spectral_radius.png": plot_spectral_radius,
         "state_norm.png": plot_state_norm, "val_vs_loops.png": plot_val_vs_loops}


# ---- writing everything ----------------------------------------------------------------------

def write_outputs(result: CompareResult) -> dict:
    """Write summary.json, the plots and report.html into result.out; return the summary."""
    out = Path(result.out)
    data = summary(result)
    atomic_write_json(out / "summary.json", data)
    images = {}
    for name, plot in PLOTS.items():
        images[name] = plot(result)
        atomic_write_bytes(out / name, images[name])
    atomic_write_text(out / "report.html", render_html(data, images))
    return data


def render_html(data: dict, images: dict[str, bytes]) -> str:
    e = html.escape
    runs = data["runs"]
    lrs = sorted({r["lr"] for r in runs})
    injections = [i for i in INJECTIONS if any(r["injection"] == i for r in runs)]
    params = {r["injection"]: r["params"] for r in runs}
    setup = data["setup"]
    rows = []
    for inj in injections:
        cells = []
        for lr in lrs:
            outcome = data["matrix"].get(inj, {}).get(f"{lr:g}", "")
            css = "ok" if outcome == "converged" else ("bad" if outcome else "")
            cells.append(f'<td class="{css}">{e(OUTCOME_MARK.get(outcome, outcome))}</td>')
        rows.append(f"<tr><th>{e(LABELS[inj])}</th><td>{params[inj]:,}</td>{''.join(cells)}</tr>")
    matrix = ("<table class='matrix'><tr><th>parameterization</th><th>parameters</th>"
              + "".join(f"<th>lr {lr:g}</th>" for lr in lrs) + "</tr>" + "".join(rows) + "</table>")
    run_rows = []
    for r in runs:
        val = r["val_by_loops"]
        vals = ", ".join(f"T={k}: {v:.3f}" if v is not None else f"T={k}: n/a" for k, v in
                         sorted(val.items(), key=lambda kv: int(kv[0])))
        fmt = lambda v, f="{:.3g}": "n/a" if v is None else f.format(v)  # noqa: E731
        verdict = r["audit_verdict"] or "n/a"
        evidence = r["audit_evidence"] or []
        if isinstance(evidence, str):
            evidence = [evidence]
        # the first item is the evidence that decided; the rest is in the run's audit.json
        evidence = evidence[0] + (f" (+{len(evidence) - 1} more in audit.json)" if len(evidence) > 1 else "") \
            if evidence else ""
        run_rows.append(
            f"<tr><td>{e(r['name'])}</td><td>{e(r['outcome'])}</td><td>{fmt(r['final_train_loss'], '{:.3f}')}</td>"
            f"<td>{e(vals)}</td><td>{fmt(r['spectral_radius_max'])}</td><td>{fmt(r['spectral_norm_final'])}</td>"
            f"<td>{fmt(r['state_growth'])}</td><td>{e(verdict)}<br><small>{e(evidence)}</small></td>"
            f"<td>{r['alerts']}</td><td><small>{e(r['outcome_reason'])}{'; ' + e(r['note']) if r['note'] else ''}</small></td></tr>")
    figures = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(png).decode()}' alt='{e(name)}'>"
        f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>" for name, png in images.items())
    criteria = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in data["criteria"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loopdyn compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
.matrix td {{ text-align: center; font-weight: bold; }}
td.ok {{ background: #e3f4e3; }} td.bad {{ background: #fbe1e1; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>loopdyn compare</h1>
<p>Preset <b>{e(str(setup.get('preset')))}</b>, {setup.get('steps')} steps of {setup.get('batch_size')} × {setup.get('seq_len')}
tokens per run, the same seed, data and batch order for every run; data: {e(str(setup.get('data') or 'the Python standard library sources'))}.</p>
<h2>Convergence matrix</h2>{matrix}
<ul>{criteria}</ul>
<h2>Findings</h2><ul>{''.join(f'<li>{e(f)}</li>' for f in data['findings'])}</ul>
<h2>Plots</h2>{figures}
<h2>Runs</h2>
<table><tr><th>run</th><th>outcome</th><th>final train loss</th><th>validation loss by test-time loops</th>
<th>max ρ(Ā)</th><th>final ‖Ā‖₂</th><th>‖h_4μ‖/‖h_μ‖</th><th>audit verdict</th><th>alerts</th><th>why</th></tr>
{''.join(run_rows)}</table>
</body></html>
"""


CAPTIONS = {
    "loss_curves.png": "Training loss (smoothed) per learning rate; dotted: the unigram baseline.",
    "spectral_radius.png": "Spectral radius of the injection's state operator Ā during training; above the dashed line the LTI part of the loop is unstable.",
    "state_norm.png": "State norm ‖h_T‖ on a fixed probe batch during training, at the trained depth μ (solid) and at 4μ (dotted).",
    "val_vs_loops.png": "Validation loss of the trained models against the number of loops run at test time; dashed: the fixed-depth twin.",
}
