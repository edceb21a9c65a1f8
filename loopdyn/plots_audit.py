"""Figures for `loopdyn audit --plots DIR` (PNG, written atomically one by one).

* eigenvalues.png — eigenvalues of Ā against the unit circle (and ρ(J_T), the Jacobian's
  Ritz estimate at the last measured loop, as a dashed circle);
* trajectory.png — ‖h_t‖ and the relative residual against loops, measured (solid) and
  forecast (dashed), with the safe limit;
* jacobian.png — ‖J_t‖₂ and ρ(J_t) per measured loop, against ‖Ā‖₂ and ρ(Ā);
* lyapunov.png — the finite-time Lyapunov exponents.
matplotlib is imported here only, and drawn with the Agg canvas (no pyplot, no global state).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from loopdyn.models.fileio import atomic_write_bytes


def _figure(size=(6.0, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _finite(x):
    x = np.asarray(x, dtype=float)
    return np.where(np.isfinite(x), x, np.nan)


def plot_eigenvalues(report):
    s = report.injection
    fig = _figure((5.2, 5.0))
    ax = fig.add_subplot()
    th = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(th), np.sin(th), color="0.4", lw=1, label="unit circle")
    ev = np.asarray(s.eigenvalues)
    if ev.size:
        ax.plot(ev.real, ev.imag, "o", ms=4, mfc="none", mec="C0", label=f"eigenvalues of Ā ({s.kind})")
    j = report.jacobian
    if len(j.spectral_radius) and np.isfinite(j.spectral_radius[-1]):
        r = float(j.spectral_radius[-1])
        ax.plot(r * np.cos(th), r * np.sin(th), "--", color="C3", lw=1, label=f"ρ(J) ≈ {r:.3g} at loop {j.loops[-1]}")
    lim = max(1.1, float(np.nanmax(np.abs(ev))) * 1.1 if ev.size and np.isfinite(np.abs(ev)).any() else 1.1)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    ax.set_title(f"Ā: ρ = {s.spectral_radius:.3g}, ‖Ā‖₂ = {s.spectral_norm:.3g}", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_trajectory(report):
    f = report.forecast
    fig = _figure((6.4, 6.0))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    T = f.measured_loops
    loops = np.arange(1, f.horizon + 1)
    ax1.plot(loops[:T], _finite(f.state_norm[:T]), "o-", color="C0", ms=3, label="measured ‖h_t‖")
    if f.horizon > T:
        ax1.plot(loops[T - 1:], _finite(f.state_norm[T - 1:]), "--", color="C0", label="forecast")
    if np.isfinite(f.safe_limit):
        ax1.axhline(f.safe_limit, color="C3", lw=1, ls=":", label=f"safe limit ({f.explosion_factor:g}× natural scale)")
    if f.max_safe_loops < f.horizon:
        ax1.axvline(f.max_safe_loops + 0.5, color="C3", lw=1, alpha=0.5)
    ax1.set_yscale("log")
    ax1.set_ylabel("mean token ‖h_t‖₂")
    ax1.set_title(f"verdict: {report.verdict} (decided by {f.decided_by}); safe through {f.max_safe_loops} loops",
                  fontsize=10)
    ax1.legend(fontsize=7)
    ax2.plot(loops[:T], _finite(f.rel_residual[:T]), "o-", color="C1", ms=3, label="measured")
    if f.horizon > T:
        ax2.plot(loops[T - 1:], _finite(f.rel_residual[T - 1:]), "--", color="C1", label="forecast")
    ax2.set_yscale("log")
    ax2.set_xlabel("loop t")
    ax2.set_ylabel("‖h_t − h_(t−1)‖ / ‖h_t‖")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return fig


def plot_jacobian(report):
    j = report.jacobian
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(j.loops, _finite(j.spectral_norm), "o-", label="‖J_t‖₂ (lower bound)")
    ax.plot(j.loops, _finite(j.spectral_radius), "s-", label="ρ(J_t) (Ritz estimate)")
    if np.isfinite(j.lti_spectral_norm):
        ax.axhline(j.lti_spectral_norm, color="C0", ls=":", lw=1, label="‖Ā‖₂ (LTI part)")
    if np.isfinite(j.lti_spectral_radius):
        ax.axhline(j.lti_spectral_radius, color="C1", ls=":", lw=1, label="ρ(Ā)")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xlabel("loop t (Jacobian at the measured state h_t)")
    ax.set_ylabel("amplification per loop")
    ax.set_title("loop Jacobian along the trajectory", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_lyapunov(report):
    ly = report.lyapunov
    fig = _figure((5.6, 3.8))
    ax = fig.add_subplot()
    ex = _finite(ly.exponents)
    ax.bar(np.arange(1, len(ex) + 1), np.nan_to_num(ex), color=["C3" if x > 0 else "C0" for x in np.nan_to_num(ex)])
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xlabel("exponent i")
    ax.set_ylabel("λ_i (nats per loop)")
    ax.set_title(f"finite-time Lyapunov exponents over {ly.loops} loops", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return fig


PLOTS = {"eigenvalues.png": plot_eigenvalues, "trajectory.png": plot_trajectory,
         "jacobian.png": plot_jacobian, "lyapunov.png": plot_lyapunov}


def write_audit_plots(report, directory) -> list[Path]:
    """Draw every figure into `directory` (created if needed); each file is written atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        from loopdyn.models.errors import InputError

        raise InputError(f"--plots {directory}: exists and is not a folder")
    return [_save(draw(report), directory / name) for name, draw in PLOTS.items()]
