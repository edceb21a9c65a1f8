"""Finite-time Lyapunov exponents of the loop along the real trajectory.

Tangent vectors evolve by the loop Jacobians, v_{t+1} = J_t v_t with J_t = ∂F/∂h at h_t.
Propagating k orthonormal vectors Q_0 (N × k, N = B·S·ds) and re-orthonormalising every loop,
J_t Q_t = Q_{t+1} R_t (thin QR, float64), gives the k leading finite-time exponents

    λ_i(T) = (1/T) Σ_{t<T} log |R_t[i, i]|        (nats per loop),

sorted in decreasing order. As T → ∞ they converge to the Lyapunov exponents of the
trajectory; for a constant linear map J they converge to log|μ_i|, the log-moduli of J's
eigenvalues, with an error of order log(cond(eigenvectors))/T. λ_1 > 0 means perturbations of
the state grow along the trajectory; λ_1 < 0 means they shrink.

The whole probe batch is one system (sequences do not interact), so its spectrum is the
union of the per-sequence spectra and with I ⊗ Ā-like structure exponents repeat across
tokens. The k products per loop are batched (vmapped backward passes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from loopdyn.dynamics.loopmap import Cost, Linearisation, analysis, require_loop
from loopdyn.dynamics.trajectory import run_loop
from loopdyn.models import checks
from loopdyn.models.weights import all_finite


@dataclass
class LyapunovResult:
    """The k leading finite-time Lyapunov exponents (nats per loop) over `loops` loops."""

    exponents: np.ndarray  # (k,), decreasing
    loops: int  # loops averaged over (fewer than asked if a state became non-finite)
    log_growth: np.ndarray = field(repr=False, default=None)  # (loops, k) per-loop log|R_ii|
    nonfinite: bool = False

    def to_json(self) -> dict:
        """The docs/design.md §7 `lyapunov` record."""
        return {"exponents": [float(x) for x in self.exponents], "loops": int(self.loops)}


class LyapunovAccumulator:
    """Carries k orthonormal tangent vectors through successive linearisations."""

    def __init__(self, state_shape, k: int, seed: int = 0):
        n = int(np.prod(state_shape))
        self.k = max(1, min(int(k), n))
        self.shape = tuple(state_shape)
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(n, self.k, generator=g, dtype=torch.float64))
        self.Q = Q
        self.logs: list[np.ndarray] = []
        self.nonfinite = False

    def update(self, lin: Linearisation) -> None:
        """Q ← qr(J Q) with J the given linearisation; records log|diag R|."""
        if self.nonfinite:
            return
        self.Q = self.Q.to(lin.h.device)
        V = self.Q.T.reshape(self.k, *self.shape)
        W = lin.jvp_batch(V).to(torch.float64).reshape(self.k, -1).T
        if not all_finite(W):
            self.nonfinite = True
            return
        Q, R = torch.linalg.qr(W)
        d = torch.diagonal(R).abs()
        with np.errstate(divide="ignore"):
            self.logs.append(np.log(d.cpu().numpy()))
        # a vector mapped to exactly zero (a nilpotent direction) restarts from a fresh one
        if bool((d == 0).any()):
            Q = torch.linalg.qr(Q + 1e-12 * torch.randn_like(Q))[0]
        self.Q = Q

    def result(self) -> LyapunovResult:
        T = len(self.logs)
        if T == 0:
            return LyapunovResult(np.full(self.k, math.nan), 0, np.zeros((0, self.k)), self.nonfinite)
        logs = np.array(self.logs)
        exps = np.sort(logs.mean(axis=0))[::-1]
        return LyapunovResult(exps, T, logs, self.nonfinite)


def lyapunov(model, idx: torch.Tensor, n_loops: int, k: int = 4, seed: int = 0,
             cost: Cost | None = None) -> LyapunovResult:
    """The k leading finite-time Lyapunov exponents along the trajectory of idx over n_loops loops,
    starting from the model's initial state (see the module docstring)."""
    require_loop(model)
    checks.check_tokens(idx, "idx")
    checks.check_int(n_loops, "n_loops", 1)
    checks.check_int(k, "k", 0)
    checks.check_seed(seed, "seed")
    cost = cost if cost is not None else Cost()
    with analysis(model):
        ctx = model.encode(idx)
    h = run_loop(model, ctx, 0)[0]
    acc = LyapunovAccumulator(h.shape, k, seed)
    for _ in range(int(n_loops)):
        if not all_finite(h):
            acc.nonfinite = True
            break
        lin = Linearisation(model, ctx, h, cost)
        acc.update(lin)
        h = lin.output
        del lin
    return acc.result()
