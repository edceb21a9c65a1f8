"""Dynamical phase of the loop per token: fixed point, cycle of period k, quasi-periodic, drifting or
divergent — and, where the leading eigenvalue is near the unit circle, which way it crosses.

Per token s the measured states x_t = h_t[s] (t = 0..T) are classified from the trajectory:

1. non-finite, or ‖x_t‖ growing geometrically → **divergent**;
2. ‖x_T − x_{T−1}‖ at round-off → **fixed point**;
3. x_T ≈ x_{T−k} and x_{T−1} ≈ x_{T−1−k} within `CYCLE_TOL` of the orbit's size, for the smallest
   k = 2..`max_period` (k ≤ T/2) → **cycle k**;
4. otherwise the leading excited eigenvalue λ of a DMD of the token's residuals r_t = x_t − x_{t−1}
   (the linear map that carries r_t to r_{t+1}: the Jacobian along the trajectory, restricted to
   the directions the token explores): |λ| < 1 − band → **fixed point** (converging); |λ| > 1 +
   band → **divergent**; on the circle (within the band): every excited unit-modulus mode at angle
   0 → **drifting**; angles that are multiples of 2π/k for a small k → **cycle k**; else
   **quasi-periodic** (an invariant circle or torus).

Crossing. From the leading eigenvalues of the loop Jacobian (the forecast's converged Ritz values
at h_T, or its deciding model's eigenvalues), the one of largest modulus λ*: when
| |λ*| − 1 | ≤ `NEAR` the report names the bifurcation it is at or heading for — λ* ≈ +1: a
**fold** (saddle-node); λ* ≈ −1: a **flip** (period doubling); a complex pair: a
**Neimark–Sacker** bifurcation (an invariant circle is born) — and the side ("inside": still
contracting, "outside": crossed).

`Phases.to_json()` is the audit's `phases` record: {counts: {label: n}, labels: [per token],
crossing: {...} | null}. `loopdyn audit --plots` draws them (loopdyn.plots.audit.plot_phases).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loopdyn.models import checks

NEAR = 0.05  # | |λ| − 1 | within this: near the unit circle
BAND = 0.01  # per-token unit band for the DMD modulus (few loops per token: coarse)
CYCLE_TOL = 1e-2  # relative closure of a cycle
ANGLE_TOL = 5e-3  # radians: an angle this close to 2πj/k counts as rational with period k
LABELS = ("fixed point", "cycle", "quasi-periodic", "drifting", "divergent")


@dataclass
class Phases:
    """Per-token phases of the loop (module docstring)."""

    labels: list  # per token (batch-major): "fixed point" | "cycle k" | "quasi-periodic" | "drifting" | "divergent"
    leading: np.ndarray  # per token: the leading excited DMD eigenvalue (complex; NaN when not computed)
    crossing: dict | None  # see `crossing_of`
    loops: int  # measured loops the labels come from

    def counts(self) -> dict:
        out: dict = {}
        for lab in self.labels:
            out[lab] = out.get(lab, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_json(self) -> dict:
        return {"counts": self.counts(), "labels": list(self.labels), "crossing": self.crossing}

    def to_text(self) -> list[str]:
        n = len(self.labels)
        parts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        lines = [f"dynamical phase per token (from {self.loops} loops, {n} tokens): {parts}"]
        c = self.crossing
        if c is None:
            lines.append("  no eigenvalue near the unit circle (no bifurcation nearby)")
        else:
            lam = complex(*c["eigenvalue"])
            lines.append(f"  leading eigenvalue {lam.real:.4g}{lam.imag:+.4g}i (|λ| {c['modulus']:.4g}, {c['source']}) "
                         f"{c['side']} the unit circle: {c['name']}")
        return lines


def crossing_of(eigenvalues, source: str = "", near: float = NEAR) -> dict | None:
    """The bifurcation type of the eigenvalue of largest modulus when it is near the unit circle."""
    lam = np.asarray(eigenvalues, dtype=complex).ravel()
    lam = lam[np.isfinite(lam)]
    if not lam.size:
        return None
    top = complex(lam[np.argmax(np.abs(lam))])
    mod = abs(top)
    if abs(mod - 1.0) > near:
        return None
    ang = abs(math.atan2(top.imag, top.real))
    if ang <= 0.1:
        kind, name = "fold", "fold (+1, saddle-node)"
    elif ang >= math.pi - 0.1:
        kind, name = "flip", "flip (−1, period doubling)"
    else:
        kind, name = "neimark-sacker", f"Neimark–Sacker (complex pair at angle {ang:.3g} rad: an invariant circle)"
    side = "on" if abs(mod - 1.0) <= 1e-3 else ("inside" if mod < 1 else "outside")
    return {"type": kind, "name": name, "eigenvalue": [top.real, top.imag], "modulus": mod, "side": side,
            "source": source}


def _period_of_angles(angles: np.ndarray, max_period: int) -> int | None:
    """The smallest k ≤ max_period with every angle a multiple of 2π/k (within ANGLE_TOL)."""
    for k in range(2, max_period + 1):
        if all(abs(((a * k / (2 * math.pi)) + 0.5) % 1.0 - 0.5) * 2 * math.pi / k <= ANGLE_TOL for a in angles):
            return k
    return None


def classify_token(X: np.ndarray, eps: float = 1.2e-7, max_period: int = 8, band: float = BAND) -> tuple[str, complex]:
    """(label, leading eigenvalue) of one token's states X (T+1, d), float64 (module docstring)."""
    T = X.shape[0] - 1
    if not np.all(np.isfinite(X)):
        return "divergent", complex("nan")
    norms = np.linalg.norm(X, axis=1)
    R = np.diff(X, axis=0)  # r_1..r_T
    rn = np.linalg.norm(R, axis=1)
    scale = max(norms[T], 1e-300)
    if T < 2 or rn[-1] <= 100 * eps * scale:
        return "fixed point", complex(0.0)
    # exact cycles
    for k in range(2, min(max_period, T // 2) + 1):
        size = max(np.linalg.norm(X[T] - X[T - j]) for j in range(1, k))
        if size <= 100 * eps * scale:
            break
        if np.linalg.norm(X[T] - X[T - k]) <= CYCLE_TOL * size and \
                np.linalg.norm(X[T - 1] - X[T - 1 - k]) <= CYCLE_TOL * size:
            return f"cycle {k}", complex(math.cos(2 * math.pi / k), math.sin(2 * math.pi / k))
    # DMD of the residuals
    lo = max(0, T - 12)
    Xs, Ys = R[lo:-1].T, R[lo + 1:].T  # d × m
    U, S, Vh = np.linalg.svd(Xs, full_matrices=False)
    keep = S > max(20 * eps * scale, 1e-10 * (S[0] if S.size else 0))
    if not keep.any():
        return "fixed point", complex(0.0)
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    A = U.T @ Ys @ Vh.T / S[None, :]
    lam, W = np.linalg.eig(A)
    b = np.linalg.lstsq(W, U.T @ R[-1], rcond=None)[0]
    amp = np.abs(b) * np.linalg.norm(W, axis=0)
    exc = amp >= 1e-2 * amp.max()
    lam_e = lam[exc]
    top = complex(lam_e[np.argmax(np.abs(lam_e))])
    mod = abs(top)
    growing = norms[T] > 2 * norms[max(T // 2, 1)] and rn[-1] > rn[max(T // 2, 1) - 1]
    if mod > 1 + band and growing:
        return "divergent", top
    if mod < 1 - band:
        return "fixed point", top
    if mod > 1 + band:  # a growing mode that has not made the state grow yet
        return "divergent", top
    circle = lam_e[np.abs(np.abs(lam_e) - 1) <= band]
    angles = np.abs(np.angle(circle))
    if np.all(angles <= ANGLE_TOL):
        return "drifting", top
    k = _period_of_angles(angles[angles > ANGLE_TOL], max_period)
    if k is not None and not np.any(angles <= ANGLE_TOL):
        return f"cycle {k}", top
    return ("drifting" if np.any(angles <= ANGLE_TOL) else "quasi-periodic"), top


def token_phases(states: list, eigenvalues=None, source: str = "Jacobian", max_tokens: int = 4096,
                 max_period: int = 8) -> Phases:
    """Phases of every token (batch-major, at most max_tokens evenly spaced) from the measured states
    h_0..h_T (tensors (B, S, ds) or arrays), and the crossing from `eigenvalues` (module docstring)."""
    if isinstance(states, (list, tuple)) and states and not isinstance(states[0], torch.Tensor):
        states = [torch.as_tensor(s) for s in states]  # arrays
    checks.check_states(states, "states")
    T = len(states) - 1
    H = torch.stack([torch.as_tensor(s).detach().cpu() for s in states]).to(torch.float64)  # (T+1, B, S, ds)
    eps = float(torch.finfo(torch.as_tensor(states[-1]).dtype).eps) if torch.as_tensor(states[-1]).is_floating_point() \
        else 1.2e-7
    H = H.reshape(T + 1, -1, H.shape[-1]).numpy()
    n = H.shape[1]
    pick = np.unique(np.linspace(0, n - 1, min(n, max_tokens)).round().astype(int))
    labels, lead = [], []
    for s in pick:
        lab, lam = classify_token(H[:, s, :], eps, max_period)
        labels.append(lab)
        lead.append(lam)
    return Phases(labels, np.array(lead, dtype=complex),
                  crossing_of(eigenvalues, source) if eigenvalues is not None else None, T)


__all__ = ["Phases", "token_phases", "classify_token", "crossing_of", "NEAR", "LABELS"]
