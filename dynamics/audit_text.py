"""The audit's terminal report: `format_report(AuditReport)` (what `loopdyn audit` prints)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from loopdyn.dynamics.numbers import fmt

if TYPE_CHECKING:
    from loopdyn.dynamics.audit_report import AuditReport


def format_report(r: AuditReport) -> str:
    m, s = r.model, r.injection
    lines = []
    src = m.path or "in-memory model"
    lines.append(f"loopdyn audit: {src}")
    lines.append(f"  model: {m.format} format, {m.injection} injection, {m.params:,} parameters, "
                 f"d_state {m.d_state}, μ_rec {m.mean_loops}")
    if r.probe:
        lines.append(f"  probe: {r.probe}")
    lines.append("")
    if s.absent:
        lines.append(f"injection Ā: none — {s.notes[0]}")
    else:
        lines.extend(_injection_lines(s))
    lines.append("")
    lines.extend(_trajectory_lines(r))
    if r.normalised is not None:
        lines += ["", r.normalised.to_text()]
        if r.verdict != r.forecast.verdict:
            lines.append(f"VERDICT: {r.verdict.upper()} — decided by the normalised loop (the state norm is flat "
                         f"by construction; the forecast of ‖h‖ alone said {r.forecast.verdict})")
    if r.exit_gate is not None:
        lines += ["", r.exit_gate.to_text()]
    if getattr(r, "precision", None) is not None:
        lines += ["", r.precision.to_text()]
    return "\n".join(lines)


def _injection_lines(s) -> list[str]:
    lines = [f"injection Ā ({s.kind}, {s.method}):"]
    settle = ("n/a (non-finite Ā)" if s.method == "non-finite" else "never (ρ ≥ 1)") if s.settle_loops is None \
        else f"{s.settle_loops} loops"
    lines.append(f"  ‖Ā‖₂ {fmt(s.spectral_norm)}   ρ(Ā) {fmt(s.spectral_radius)}   "
                 f"max_k≤{s.horizon} ‖Āᵏ‖₂ {fmt(s.transient_max)} (k={s.transient_peak})   "
                 f"Kreiss K {fmt(s.kreiss_constant)}, bound {fmt(s.kreiss_bound)}")
    gain = "" if s.fixed_point_gain is None else f"   h* = (I−Ā)⁻¹B̄e, ‖(I−Ā)⁻¹B̄‖₂ {fmt(s.fixed_point_gain)}"
    stab = "n/a" if not np.isfinite(s.spectral_radius) else \
        f"{'stable' if s.stable else 'not stable'} (ρ {'<' if s.stable else '≥'} 1)"
    lines.append(f"  LTI surrogate settles to tol {s.tol:g} in {settle}; {stab}{gain}")
    return lines


def _trajectory_lines(r: AuditReport) -> list[str]:
    s, tr, j, ly, f = r.injection, r.trajectory, r.jacobian, r.lyapunov, r.forecast
    lines = []
    lines.append(f"measured trajectory ({tr.n_loops} loops)   and the Jacobian J_t = ∂h_(t+1)/∂h_t at h_t:")
    lines.append(f"  {'loop':>4} {'‖h_t‖':>10} {'rel.resid':>10} {'‖J_t‖₂≥':>10} {'ρ(J_t)≈':>10}")
    jmap = {t: (a, b) for t, a, b in zip(j.loops, j.spectral_norm, j.spectral_radius)}
    for t in range(1, tr.n_loops + 1):
        a, b = jmap.get(t, (None, None))
        lines.append(f"  {t:>4} {fmt(tr.state_norm[t]):>10} {fmt(tr.rel_residual[t]):>10} "
                     f"{'' if a is None else fmt(a):>10} {'' if b is None else fmt(b):>10}")
    lines.append(f"  Jacobian: {j.method}; {j.matvecs} products")
    if ly.loops:
        lines.append(f"Lyapunov exponents over {ly.loops} loops (nats/loop): "
                     + ", ".join(fmt(x) for x in ly.exponents))
    if r.gain is not None:
        G = r.gain
        subl = [(u, v, d["gain"]) for u, v, d in G.edges(data=True) if d.get("kind") == "local_lipschitz"]
        lines.append(f"gain graph: ‖Ā‖₂ {fmt(s.spectral_norm)}, ‖B̄‖₂ {fmt(G.graph['input_gain'])}, "
                     f"‖C‖₂ {fmt(G.graph['readout_gain'])}; sublayer local gains "
                     + ", ".join(f"{v} {fmt(g)}" for _, v, g in subl))
        lines.append(f"  cycle gain (small-gain bound) {fmt(G.graph['cycle_gain'])} vs measured ρ(J) "
                     f"{fmt(j.spectral_radius[-1] if len(j.spectral_radius) else math.nan)} and ρ(Ā) "
                     f"{fmt(s.spectral_radius)}")
    lines.append("")
    idx = [t for t in (f.measured_loops, min(2 * f.measured_loops, f.horizon), f.horizon) if t >= 1]
    pred = ", ".join(f"‖h_{t}‖ {fmt(f.state_norm[t - 1])}" for t in dict.fromkeys(idx))
    rate = "n/a" if not np.isfinite(f.growth_rate) and not f.growth_rate > 0 else f"{fmt(f.growth_rate)}/loop"
    lines.append(f"forecast to {f.horizon} loops (measured {f.measured_loops}): growth rate {rate}; {pred}")
    lines.append(f"  safe through {f.max_safe_loops} loops (safe: finite and ‖h‖ ≤ {f.explosion_factor:g}·‖h_"
                 f"{f.trained_depth}‖, the state at the trained depth, = {fmt(f.safe_limit)})")
    if r.phases is not None:
        lines.extend(r.phases.to_text())
    if r.verdict == f.verdict:
        lines.append(f"VERDICT: {r.verdict.upper()} — decided by {f.decided_by}")
    else:  # a renormalised loop: the audit's verdict comes from the normalised-loop analysis (below)
        lines.append(f"forecast of ‖h‖: {f.verdict} — decided by {f.decided_by} (not the verdict: the state is "
                     f"renormalised inside the step)")
    lines.append(f"  {f.evidence[0]}" if f.evidence else "")
    for e in f.evidence[1:]:
        lines.append(f"  - {e}")
    for n in r.notes:
        lines.append(f"note: {n}")
    for n in r.skipped:
        lines.append(f"skipped: {n}")
    return lines
