"""The outputs of `loopdyn compare`: summary.json, figures, findings and a self-contained report.html.

Figures are drawn in loopdyn's one style (loopdyn.plots.style): PNG at 300 dpi, or PDF/SVG with
`--format`; each comes with a caption written from what was drawn and measured. The report
page stamps the loopdyn version, the exact command, the date and the machine; it gives one
short verdict per run with the deciding evidence in a <details> element, and prints to PDF
(A4, the convergence matrix on the first page). Everything is written atomically.
"""
from __future__ import annotations

import base64
import functools
import math
import os
import platform
import shlex
from datetime import datetime, timezone
from pathlib import Path

import markupsafe
import numpy as np

from loopdyn.compare import UNIT, CompareResult, RunRecord, injections_in_order
from loopdyn.io import atomic_write_json, atomic_write_text, json_safe
from loopdyn.plots import style
from loopdyn.plots.compare import PLOTS
from loopdyn.dynamics import verdict
from loopdyn.dynamics.numbers import fmt, num
from loopdyn.gridstatus import status_html

LABELS = style.LABELS
OUTCOME_MARK = {"converged": "✓ converged", "inconclusive": "… inconclusive", "diverged": "✗ diverged",
                "residual explosion": "✗ residual explosion", "pending": "· pending", "running": "▸ running",
                "failed": "✗ failed"}


def run_summary(r: RunRecord) -> dict:
    mu = r.mean_loops
    norms = r.final_state_norms
    growth = None
    if mu and len(norms) > mu and norms[mu]:
        growth = num(norms[-1] / norms[mu])
    rho = [v for v in r.spectral_radius if v is not None and math.isfinite(v)]
    return {
        "name": _name(r), "injection": r.spec["injection"], "lr": r.spec["lr"], "seed": r.spec["seed"],
        "params": r.params, "mean_loops": mu, "steps": r.steps, "tokens": r.tokens, "seconds": round(r.seconds, 1),
        "outcome": r.outcome, "outcome_reason": r.outcome_reason, "note": r.note,
        "final_train_loss": num(np.mean(r.losses[-max(5, len(r.losses) // 10):])) if r.losses else None,
        "val_by_loops": {k: num(v) for k, v in r.val_by_loops.items()},
        "spectral_radius_final": num(r.spectral_radius[-1]) if r.spectral_radius else None,
        "spectral_radius_max": max(rho) if rho else None,
        "spectral_norm_final": num(r.spectral_norm[-1]) if r.spectral_norm else None,
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
    for inj in injections_in_order(by_inj):
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
            counts = {v.value: verdicts.count(v) for v in verdict.Verdict if v in verdicts}
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


CRITERIA = verdict.criteria()  # the outcome criteria, from the one rule table


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


def format_matrix(data: dict) -> str:
    """The convergence matrix of a summary as a plain-text table, columns as wide as their contents;
    runs of a grid not finished yet (summary "status") show as pending, running or failed."""
    runs = data["runs"]
    unfinished = (data.get("status") or {}).get("runs", [])
    lrs = sorted({r["lr"] for r in runs} | {r["lr"] for r in unfinished})
    injections = injections_in_order({r["injection"] for r in runs} | {r["injection"] for r in unfinished})
    params = {r["injection"]: r["params"] for r in runs}
    header = ["", "params"] + [f"lr {lr:g}" for lr in lrs]
    rows = [[inj, f"{params[inj]:,}" if inj in params else "…"] + [data["matrix"].get(inj, {}).get(f"{lr:g}", "") for lr in lrs]
            for inj in injections]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header] + rows)


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


def _css(outcome: str) -> str:
    if outcome in ("pending", "running"):  # runs of a grid not finished yet (loopdyn.coordinator)
        return "wait"
    if outcome == "failed":
        return "bad"
    return verdict.css_class(outcome) if outcome else ""


def verdict_line(r: dict) -> str:
    """One short sentence: the outcome and the one number that decided it."""
    mu = r["mean_loops"]
    val = r["val_by_loops"].get(str(mu) if mu else "0")
    audit = f"; audit {r['audit_verdict']}" if r.get("audit_verdict") else ""
    if r["outcome"] == "converged":
        extra = f", ‖h_4μ‖/‖h_μ‖ {r['state_growth']:.2f}" if r.get("state_growth") is not None else ""
        return f"validation {fmt(val, '.3f')} {UNIT}{extra}{audit}"
    if r["outcome"] == "residual explosion":
        g = r.get("state_growth")
        return (f"state explodes with loops ({'‖h_4μ‖/‖h_μ‖ ' + fmt(g) if g is not None else 'non-finite'})"
                f"{audit}")
    if r["outcome"] == "inconclusive":
        return f"too short to judge (validation {fmt(val, '.3f')} {UNIT}, not yet below the baseline){audit}"
    return (r["outcome_reason"].split(" (")[0] if r["outcome_reason"] else "diverged") + audit


def render_html(data: dict, figures: dict[str, tuple[bytes, str]]) -> str:
    """report.html from the summary and the figures (name → (PNG bytes, caption)): the template
    `loopdyn/templates/report.html` (jinja2, every value autoescaped), filled with text only."""
    runs = data["runs"]
    unfinished = (data.get("status") or {}).get("runs", [])  # pending / running / failed runs
    lrs = sorted({r["lr"] for r in runs} | {r["lr"] for r in unfinished})
    injections = injections_in_order({r["injection"] for r in runs} | {r["injection"] for r in unfinished})
    params = {r["injection"]: r["params"] for r in runs}
    prov = data.get("provenance") or provenance(None)
    matrix = []
    for inj in injections:
        outcomes = [data["matrix"].get(inj, {}).get(f"{lr:g}", "") for lr in lrs]
        matrix.append({"label": LABELS.get(inj, inj), "params": f"{params[inj]:,}" if inj in params else "…",
                       "cells": [{"css": _css(o), "text": OUTCOME_MARK.get(o, o)} for o in outcomes]})
    rows = []
    for r in runs:
        evidence = r["audit_evidence"] or []
        rows.append({
            "name": r["name"], "css": _css(r["outcome"]), "mark": OUTCOME_MARK.get(r["outcome"], r["outcome"]),
            "verdict": verdict_line(r), "outcome": r["outcome"], "reason": r["outcome_reason"], "note": r["note"],
            "val_by_loops": "; ".join(f"T = {k}: {fmt(v, '.3f')}" for k, v in
                                      sorted(r["val_by_loops"].items(), key=lambda kv: int(kv[0]))),
            "final_train_loss": fmt(r["final_train_loss"], ".3f"), "rho_max": fmt(r["spectral_radius_max"]),
            "norm_final": fmt(r["spectral_norm_final"]), "growth": fmt(r["state_growth"]), "alerts": r["alerts"],
            "steps": r["steps"], "tokens": f"{r['tokens']:,}", "seconds": r["seconds"],
            "evidence": [evidence] if isinstance(evidence, str) else list(evidence)})
    return _template().render(
        setup=data["setup"], prov=prov, status=markupsafe.Markup(status_html(data)), machine=prov["machine"], unit=UNIT, colours=verdict.COLOURS,
        lrs=[f"{lr:g}" for lr in lrs], matrix=matrix, criteria=data["criteria"], findings=data["findings"], runs=rows,
        figures=[{"name": name, "png": base64.b64encode(png).decode(), "caption": caption}
                 for name, (png, caption) in figures.items()])


@functools.lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("loopdyn", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html")
