"""Figures for `loopdyn audit --plots DIR [--format png|pdf|svg]`, in loopdyn's one style.

* eigenvalues — eigenvalues of Ā against the unit circle (and ρ(J_T), the Jacobian's Ritz
  estimate at the last measured loop, as a dashed circle);
* trajectory — ‖h_t‖ and the relative residual against loops, measured (solid, markers) and
  forecast (dashed), with the trained depth μ_rec, the safe limit and the last safe loop;
* jacobian — ‖J_t‖₂ and ρ(J_t) per measured loop, against ‖Ā‖₂, ρ(Ā) and 1;
* lyapunov — the finite-time Lyapunov exponents against zero;
* phases — the dynamical phase per token and the leading eigenvalues (when computed);
* exit_gate — the gate's exit loop against the convergence loop per token (models with an exit gate).

Each `plot_*` returns (figure, caption); the caption says what was drawn and measured. It is
stored in the file's own metadata (PNG Description, PDF Subject, SVG dc:description) and
returned to the caller, which prints it. matplotlib is imported only through loopdyn.plots.style.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loopdyn.plots import style


def _name(report) -> str:
    return f"{report.model.injection}-injection model"


@style.styled
def plot_eigenvalues(report):
    s = report.injection
    fig, ax = style.figure(style.SINGLE, 3.3)
    th = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(th), np.sin(th), color=style.REFERENCE, lw=0.8, ls=":", gid="reference-line",
            label="_nolegend_")
    ax.text(0.93 * np.cos(np.pi / 4), 0.93 * np.sin(np.pi / 4), "|λ| = 1", color=style.REFERENCE, fontsize=6.5,
            ha="right", va="top", gid="reference-label")
    colour = style.COLORS.get(report.model.injection, style.SEQUENCE[0])
    ev = np.asarray(s.eigenvalues)
    parts = [f"{ev.size} eigenvalues of Ā ({s.kind})"]
    if ev.size:
        ax.plot(ev.real, ev.imag, "o", ms=3.5, mfc="none", mec=colour, mew=0.8, label="eigenvalues of Ā")
    j = report.jacobian
    r = None
    if len(j.spectral_radius) and np.isfinite(j.spectral_radius[-1]):
        r = float(j.spectral_radius[-1])
        ax.plot(r * np.cos(th), r * np.sin(th), "--", color=style.OKABE_ITO["black"], lw=0.9,
                label=f"|λ| = ρ(J) at loop {j.loops[-1]}")
        parts.append(f"a dashed circle at ρ(J) ≈ {r:.3g}, the Ritz estimate of the loop Jacobian's spectral "
                     f"radius at loop {j.loops[-1]}")
    finite_abs = np.abs(ev)[np.isfinite(np.abs(ev))] if ev.size else np.array([])
    lim = max(1.15, (finite_abs.max() if finite_abs.size else 0) * 1.1, (r or 0) * 1.1)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.85", lw=0.5, zorder=0, gid="reference-line")
    ax.axvline(0, color="0.85", lw=0.5, zorder=0, gid="reference-line")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title(f"Ā: ρ = {s.spectral_radius:.3g}, ‖Ā‖₂ = {s.spectral_norm:.3g}")
    style.place_legend(ax)
    mod = np.abs(ev) if ev.size else np.array([])
    n_out, n_on = int(np.sum(mod > 1 + 1e-9)), int(np.sum(np.abs(mod - 1) <= 1e-9))
    where = (f"{n_out} of {ev.size} outside the unit circle" + (f", {n_on} on it" if n_on else "")
             if n_out or n_on else f"all {ev.size} inside the unit circle")
    caption = (f"Eigenvalues of the injection's state operator Ā of the {_name(report)} in the complex plane, "
               f"with the unit circle (dotted): {', '.join(parts)}. ρ(Ā) = {s.spectral_radius:.3g} ({where}); "
               f"‖Ā‖₂ = {s.spectral_norm:.3g}.")
    return fig, caption


@style.styled
def plot_trajectory(report):
    f = report.forecast
    fig, (ax1, ax2) = style.figure(style.SINGLE, 4.4, nrows=2, sharex=True)
    T = f.measured_loops
    loops = np.arange(1, f.horizon + 1)
    sn, rr = style.finite(f.state_norm), style.finite(f.rel_residual)
    colour = style.COLORS.get(report.model.injection, style.SEQUENCE[0])
    ax1.plot(loops[:T], sn[:T], "o-", color=colour, ms=3, label="measured")
    forecast = f.horizon > T
    if forecast:
        ax1.plot(loops[T - 1:], sn[T - 1:], "--", color=colour, label="forecast")
    shown = list(sn[np.isfinite(sn)])
    safe = np.isfinite(f.safe_limit)
    if safe:
        shown.append(f.safe_limit)
    if style.auto_scale(ax1, shown) == "linear":
        ax1.set_ylim(bottom=0)
    if safe:
        style.reference_line(ax1, f.safe_limit, f"safe limit ({f.explosion_factor:g}× natural scale)",
                             style="-.", where=0.02)
    mu = getattr(report.model, "mean_loops", None)
    for ax in (ax1, ax2):
        if mu and 1 <= mu <= f.horizon:
            style.reference_line(ax, mu, f"trained depth μ_rec = {mu}", orientation="v", style=":",
                                 where=0.98)
        if f.max_safe_loops < f.horizon:
            style.reference_line(ax, f.max_safe_loops + 0.5, f"safe through t = {f.max_safe_loops}",
                                 orientation="v", style="-", color=style.OKABE_ITO["vermillion"], where=0.55)
        ax.set_xlim(0.5, f.horizon + 0.5)
    ax1.set_ylabel("mean token ‖h_t‖₂")
    ax1.set_title(f"verdict: {report.verdict} (decided by {f.decided_by})")
    ax2.plot(loops[:T], rr[:T], "o-", color=colour, ms=3, label="measured")
    if forecast:
        ax2.plot(loops[T - 1:], rr[T - 1:], "--", color=colour, label="forecast")
    style.auto_scale(ax2, rr[np.isfinite(rr)], log_range=1e3)
    ax2.set_xlabel("loop t")
    ax2.set_ylabel("‖h_t − h_(t−1)‖ / ‖h_t‖")
    style.integer_axis(ax2, "x")
    style.place_legend(ax1)
    growth = f"growth rate {f.growth_rate:.3g}/loop" if np.isfinite(getattr(f, "growth_rate", np.nan)) else ""
    caption = (f"Mean token state norm ‖h_t‖₂ (top) and relative residual ‖h_t − h_(t−1)‖/‖h_t‖ (bottom) of the "
               f"{_name(report)} against the loop t: measured for t = 1..{T} (markers)"
               + (f", forecast to t = {f.horizon} (dashed)" if forecast else "")
               + (f"; the dotted vertical line is the trained depth μ_rec = {mu}" if mu and mu <= f.horizon else "")
               + (f"; dash-dotted: the safe limit {f.safe_limit:.3g} ({f.explosion_factor:g}× the natural scale)"
                  if safe else "")
               + (f"; the state leaves the safe region after loop {f.max_safe_loops} (solid vertical line)"
                  if f.max_safe_loops < f.horizon else f"; safe through all {f.horizon} loops")
               + (f"; {growth}" if growth else "") + f". Verdict {report.verdict}, decided by {f.decided_by}.")
    return fig, caption


@style.styled
def plot_jacobian(report):
    j = report.jacobian
    fig, ax = style.figure(style.SINGLE, 2.6)
    c_norm, c_rad = style.OKABE_ITO["blue"], style.OKABE_ITO["vermillion"]
    sn, sr = style.finite(j.spectral_norm), style.finite(j.spectral_radius)
    ax.plot(j.loops, sn, "o-", color=c_norm, label="‖J_t‖₂ (lower bound)")
    ax.plot(j.loops, sr, "s-", color=c_rad, label="ρ(J_t) (Ritz estimate)")
    shown = [*sn[np.isfinite(sn)], *sr[np.isfinite(sr)], 1.0]
    drawn = []
    if np.isfinite(j.lti_spectral_norm):
        ax.axhline(j.lti_spectral_norm, color=c_norm, ls=":", lw=0.9, label="‖Ā‖₂ (LTI part)")
        shown.append(j.lti_spectral_norm)
        drawn.append(f"‖Ā‖₂ = {j.lti_spectral_norm:.3g} (dotted)")
    if np.isfinite(j.lti_spectral_radius):
        ax.axhline(j.lti_spectral_radius, color=c_rad, ls=":", lw=0.9, label="ρ(Ā) (LTI part)")
        shown.append(j.lti_spectral_radius)
        drawn.append(f"ρ(Ā) = {j.lti_spectral_radius:.3g} (dotted)")
    if style.auto_scale(ax, shown) == "linear":
        ax.set_ylim(bottom=0, top=max(shown) * 1.25)
    style.reference_line(ax, 1.0, "ρ = 1", style="--", where=0.02)
    ax.set_xlabel("loop t (Jacobian at the measured state h_t)")
    ax.set_ylabel("amplification per loop")
    style.integer_axis(ax, "x")
    if len(j.loops):
        ax.set_xlim(min(j.loops) - 0.5, max(j.loops) + 0.5)
    style.place_legend(ax)
    last = (f"; at loop {j.loops[-1]} ‖J‖₂ ≥ {sn[-1]:.3g}, ρ(J) ≈ {sr[-1]:.3g}" if len(j.loops) else "")
    caption = (f"Top singular value (a Lanczos lower bound, circles) and spectral radius (Arnoldi Ritz estimate, "
               f"squares) of the loop Jacobian J_t = ∂h_(t+1)/∂h_t along the measured trajectory of the "
               f"{_name(report)} (matrix-free, {j.matvecs} products with J or Jᵀ)"
               + (", against " + " and ".join(drawn) if drawn else "") + "; dashed: ρ = 1" + last + ".")
    return fig, caption


@style.styled
def plot_lyapunov(report):
    ly = report.lyapunov
    fig, ax = style.figure(style.SINGLE, 2.4)
    ex = style.finite(ly.exponents)
    idx = np.arange(1, len(ex) + 1)
    ok = np.isfinite(ex)
    pos, neg = ok & (ex > 0), ok & (ex <= 0)
    ax.vlines(idx[ok], 0, ex[ok], color="0.6", lw=0.8, label="_nolegend_")
    if pos.any():
        ax.plot(idx[pos], ex[pos], "o", color=style.OKABE_ITO["vermillion"], label="λ_i > 0 (perturbations grow)")
    if neg.any():
        ax.plot(idx[neg], ex[neg], "o", color=style.OKABE_ITO["blue"], label="λ_i ≤ 0 (perturbations decay)")
    style.reference_line(ax, 0.0, "0", style="-", where=0.995, lw=0.7)
    ax.set_xlabel("exponent index i")
    ax.set_ylabel("λ_i (nats per loop)")
    style.integer_axis(ax, "x")
    ax.set_xlim(0.5, max(len(ex), 1) + 0.5)
    if ok.any():
        lo, hi = min(0.0, ex[ok].min()), max(0.0, ex[ok].max())
        pad = 0.15 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad * 2.5)
    style.place_legend(ax)
    values = ", ".join(f"{x:.3g}" for x in ex[ok])
    caption = (f"The {len(ex)} leading finite-time Lyapunov exponents λ_i of the {_name(report)}'s loop over "
               f"{ly.loops} loops (QR re-orthonormalisation of tangent vectors propagated with the loop Jacobian), "
               f"in nats per loop, against zero: {values or 'none finite'}; "
               f"{int(pos.sum())} positive.")
    return fig, caption


def plot_phases(report):
    """Per-token dynamical phase: counts per phase, and each token's leading eigenvalue against
    the unit circle (the crossing, when there is one, circled)."""
    ph = report.phases
    fig, (ax1, ax2) = style.figure(style.DOUBLE, 2.6, ncols=2)
    counts = ph.counts()
    names = list(counts)
    ax1.barh(names, [counts[k] for k in names], color=[style.SEQUENCE[i % len(style.SEQUENCE)] for i in range(len(names))])
    ax1.set_xlabel("tokens")
    ax1.set_ylabel("phase")
    ax1.invert_yaxis()
    style.integer_axis(ax1, "x")
    th = np.linspace(0, 2 * np.pi, 256)
    ax2.plot(np.cos(th), np.sin(th), color=style.REFERENCE, lw=0.8, ls=":", label="unit circle |λ| = 1")
    lam = np.asarray(ph.leading, dtype=complex)
    lam = lam[np.isfinite(lam)]
    if lam.size:
        ax2.plot(lam.real, lam.imag, "o", ms=3, alpha=0.6, color=style.OKABE_ITO["blue"],
                 label="per-token leading eigenvalue")
    if ph.crossing is not None:
        re, im = ph.crossing["eigenvalue"]
        ax2.plot([re], [im], "o", ms=9, mfc="none", mec=style.OKABE_ITO["vermillion"],
                 label=f"crossing: {ph.crossing['type']}")
    ax2.set_aspect("equal", adjustable="datalim")
    ax2.set_xlabel("Re λ")
    ax2.set_ylabel("Im λ")
    style.place_legend(ax2)
    parts = ", ".join(f"{v} {k}" for k, v in counts.items())
    cross = "" if ph.crossing is None else (f"; the leading eigenvalue sits near the unit circle "
                                            f"({ph.crossing['type']} crossing)")
    caption = (f"Dynamical phase of each of the {len(ph.labels)} probe tokens of the {_name(report)}, from "
               f"{ph.loops} measured loops: {parts}. Right: each token's leading eigenvalue (per-token DMD of "
               f"its measured residuals) against the unit circle{cross}.")
    return fig, caption


def plot_exit_gate(report):
    """Exit loop (the gate) against convergence loop (state and next-token distribution) per token."""
    g = report.exit_gate
    T = g.n_loops
    fig, ax = style.figure(style.SINGLE, 3.2)
    e = g.exit_loop.ravel().astype(float)
    c = g.converged_loop.ravel().astype(float)
    c = np.where(c == 0, T + 1, c)  # not converged within T: the top row
    rng = np.random.default_rng(0)
    early, late = g.exits_while_changing.ravel(), g.loops_after_converged.ravel()
    other = ~(early | late)
    for mask, colour, label in ((early, "vermillion", "exits while still changing"),
                                (late, "orange", "loops on after converging"),
                                (other, "blue", "exits at convergence or at T")):
        if mask.any():
            n = int(mask.sum())
            ax.plot(e[mask] + rng.uniform(-0.18, 0.18, n), c[mask] + rng.uniform(-0.18, 0.18, n), "o", ms=3,
                    alpha=0.6, color=style.OKABE_ITO[colour], label=f"{label} ({n})")
    ax.plot([0.5, T + 0.5], [0.5, T + 0.5], color=style.REFERENCE, lw=0.7, ls=":", label="exit = convergence")
    ax.set_xlim(0.5, T + 0.5)
    ax.set_ylim(0.5, T + 1.5)
    ax.set_yticks(list(range(1, T + 2)), [str(t) for t in range(1, T + 1)] + ["never"])
    style.integer_axis(ax, "x")
    ax.set_xlabel(f"exit loop (gate, threshold q = {g.threshold:g})")
    ax.set_ylabel("convergence loop")
    style.place_legend(ax)
    k = g.counts()
    caption = (f"Exit loop of the gate (cumulative exit probability ≥ {g.threshold:g}) against the loop at which the "
               f"state and the next-token distribution stopped changing, for {g.n_tokens} tokens over {T} loops: "
               f"{k['exit_while_changing']} exit while still changing, {k['loop_after_converged']} keep looping "
               f"after they converged.")
    return fig, caption


PLOTS = {"eigenvalues": plot_eigenvalues, "trajectory": plot_trajectory,
         "jacobian": plot_jacobian, "lyapunov": plot_lyapunov}


# drawn only when the audit has the part (a renormalised loop's exit gate, the phases)
from loopdyn.plots.precision import plot_precision  # noqa: E402 - `audit --precision`

OPTIONAL_PLOTS = {"phases": ("phases", plot_phases), "exit_gate": ("exit_gate", plot_exit_gate),
                  "precision": ("precision", plot_precision)}


def write_audit_plots(report, directory, fmt: str = "png") -> list[tuple[Path, str]]:
    """Draw every figure into `directory` (created if needed) as NAME.{fmt}, each written
    atomically with its caption in the file's metadata. Returns [(path, caption), ...]."""
    plots = dict(PLOTS)
    plots.update({name: draw for name, (part, draw) in OPTIONAL_PLOTS.items() if getattr(report, part, None) is not None})
    return style.write_figures(plots, report, directory, fmt)
