"""The precision figure of `loopdyn audit --precision --plots DIR`: what rounding in the compute
dtype does to the loop (loopdyn.dynamics.precision).

Left: the relative state divergence ‖h_low − h_ref‖/‖h_ref‖ per token against loops — the
median, the 10–90 % band and the maximum over tokens — with the growth e^{λ₁ t} the leading
Lyapunov exponent predicts (expanding loops) or the plateau u·κ (contracting loops) and the
unit roundoff u. Right: the share of tokens whose next-token argmax changed and the mean KL
between the two output distributions.
"""
from __future__ import annotations

import math

import numpy as np

from loopdyn.plots import style


@style.styled
def plot_precision(report):
    p = report.precision
    fig, (ax, bx) = style.figure(style.DOUBLE, 2.6, ncols=2)
    t = np.asarray(p.loops, dtype=float)
    d = np.asarray(p.divergence_tokens, dtype=float)
    colour = style.SEQUENCE[0]
    with np.errstate(invalid="ignore"):
        lo, hi = (np.nanquantile(d, q, axis=1) if d.size else np.full(len(t), math.nan) for q in (0.1, 0.9))
    pos = lambda x: np.where(np.asarray(x) > 0, x, np.nan)  # noqa: E731 - log axis: zeros are not drawn
    ax.fill_between(t, pos(lo), pos(hi), color=colour, alpha=0.2, lw=0, label="10–90 % of tokens")
    ax.plot(t, pos(p.divergence_median), "-o", ms=2.5, color=colour, label="median token")
    ax.plot(t, pos(p.divergence_max), ":", color=colour, lw=0.9, label="max token")
    parts = [f"the relative state divergence ‖h_low − h_ref‖/‖h_ref‖ of {p.dtype} against {p.reference} over "
             f"{len(t)} loops (median {_g(p.divergence_median[-1])} at the last loop)"]
    if p.regime == "expanding" and p.fit_loops:
        a, b = p.fit_loops
        i = a - 1
        ref = p.divergence_median[i]
        if np.isfinite(ref) and ref > 0:
            tt = np.linspace(a, t[-1], 50)
            ax.plot(tt, ref * np.exp(p.lyapunov * (tt - a)), "--", color=style.OKABE_ITO["vermillion"], lw=0.9,
                    label=f"e^(λ₁ t), λ₁ = {_g(p.lyapunov)}")
        parts.append(f"an expanding loop: measured divergence rate {_g(p.divergence_rate)}/loop over loops "
                     f"{a}..{b} against the leading Lyapunov exponent λ₁ = {_g(p.lyapunov)}/loop (dashed)")
    elif p.regime == "contracting" and np.isfinite(p.predicted_plateau):
        style.reference_line(ax, p.predicted_plateau, f"u·κ = {_g(p.predicted_plateau)}")
        parts.append(f"a contracting loop (λ₁ = {_g(p.lyapunov)}/loop): plateau {_g(p.measured_plateau)} against "
                     f"u·κ = {_g(p.predicted_plateau)} (dotted)")
    style.reference_line(ax, p.unit_roundoff, f"u = {_g(p.unit_roundoff)}", style="-.")
    ax.set_yscale("log")
    ax.set_xlabel("loop t")
    ax.set_ylabel("relative state divergence")
    style.integer_axis(ax, "x")
    style.place_legend(ax)
    ax.set_title(f"{p.dtype} vs {p.reference}")

    bx.plot(t, 100 * np.asarray(p.argmax_changed, dtype=float), "-o", ms=2.5, color=style.OKABE_ITO["vermillion"],
            label="argmax changed (%)")
    bx.set_xlabel("loop t")
    bx.set_ylabel("tokens with a changed argmax (%)")
    style.integer_axis(bx, "x")
    kx = bx.twinx()
    kl = pos(p.kl)
    kx.plot(t, kl, "--", color=style.OKABE_ITO["blue"], lw=0.9, label="KL(p_ref ‖ p_low)")
    if np.isfinite(kl).any():
        kx.set_yscale("log")
    kx.set_ylabel("mean KL (nats per token)")
    kx.grid(False)
    h1, l1 = bx.get_legend_handles_labels()
    h2, l2 = kx.get_legend_handles_labels()
    style.place_legend(bx, h1 + h2, l1 + l2)
    parts.append(f"the share of tokens whose next-token argmax changed (up to "
                 f"{100 * np.nanmax(np.append(np.asarray(p.argmax_changed, float), 0)):.2f} %) and the mean KL "
                 f"between the two output distributions")
    if p.exit_changed is not None:
        parts.append(f"the exit loop changes for {100 * p.exit_changed:.2f} % of tokens")
    if p.n_entries:
        parts.append(f"ρ(Ā) {_g(p.rho_stored)} as stored and {_g(p.rho_computed)} as computed in {p.dtype}, "
                     f"{len(p.flagged)} of {p.n_entries} entries of Ā rounding to modulus ≥ 1")
    if p.verdict is not None:
        parts.append(f"verdict in {p.dtype}: {p.verdict} (float32: {p.verdict_reference})")
    return fig, "Precision audit: " + "; ".join(parts) + "."


def _g(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"
