"""What every forecast model shares: the measured loops in float64, exact per-token norms of a
reduced prediction, the hindcast window, and the propagation of a reduced linear model."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loopdyn.dynamics.forecasting.result import LONG_RUN, RATE_FLOOR

def curve_rate(residual: np.ndarray) -> float:
    """Per-loop log growth of a residual curve over its last quarter (at least one loop)."""
    J = len(residual) - 1
    if J < 1:
        return math.nan
    w = max(1, J // 4)
    a, b = residual[J - w], residual[J]
    if not np.isfinite(b):
        return math.inf
    if not np.isfinite(a):
        return RATE_FLOOR
    if b <= 0 or a <= 0:
        return RATE_FLOOR
    return max((math.log(b) - math.log(a)) / w, RATE_FLOOR)


def rows(x: torch.Tensor) -> torch.Tensor:
    """(tokens, ds) float64 view of a state."""
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


class TokenNorms:
    """Norms of h + Σ_i y_i V_i (V orthonormal, k × tokens × ds) from per-token Gram data, so a
    prediction in k coordinates gives exact per-token norms at O(tokens · k²) per loop."""

    def __init__(self, V: torch.Tensor, h: torch.Tensor):
        self.h2 = (h * h).sum(-1)  # (tokens,)
        self.c = torch.einsum("ksd,sd->sk", V, h)  # (tokens, k)
        self.G = torch.einsum("ksd,lsd->skl", V, V)  # (tokens, k, k)
        self.c_total = self.c.sum(0).numpy()
        self.N0 = float(self.h2.sum().sqrt())

    def __call__(self, y: np.ndarray) -> tuple[float, float]:
        """(whole-batch norm, mean token norm)."""
        ny = float(np.linalg.norm(y))
        if not math.isfinite(ny) or ny > 1e150:
            return math.inf, math.inf
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
        tok2 = self.h2 + 2 * (self.c @ yt) + torch.einsum("skl,k,l->s", self.G, yt, yt)
        tok2 = tok2.clamp_min(0)
        return float(tok2.sum().sqrt()), float(tok2.sqrt().mean())

    def total(self, y: np.ndarray) -> float:
        ny = float(np.linalg.norm(y))
        if not math.isfinite(ny) or ny > 1e150:
            return math.inf
        return math.sqrt(max(self.N0 ** 2 + 2 * float(self.c_total @ y) + ny * ny, 0.0))


@dataclass
class Measured:
    """The measured loops in float64: token rows of h_t and r_t, and the round-off scale."""

    T: int
    h: list  # (tokens, ds) float64, t = 0..T
    eps: float  # machine epsilon of the state's dtype

    def r(self, t: int) -> torch.Tensor:
        return self.h[t] - self.h[t - 1]

    def floor(self, t: int) -> float:
        """A residual at or below this (whole-batch) is round-off of the state at loop t."""
        return 100.0 * self.eps * float(self.h[t].norm())

    def hindcast_window(self) -> int:
        return hindcast_window(self.T)


def hindcast_window(T: int) -> int:
    """w: every model is built from what was known at loop T − w and scored on loops T − w + 1..T."""
    return min(3, (T - 1) // 2)


def forecast_loops(T: int) -> list[int]:
    """The measured loops at which `forecast_from` linearises the step: T, and T − w for the
    Jacobian model's hindcast. An audit that already linearised them passes them in."""
    w = hindcast_window(T)
    return [T] + ([T - w] if w >= 1 and T - w >= 1 else [])


def rel_error(pred: torch.Tensor, true: torch.Tensor, floor: float) -> float:
    return float((pred - true).norm()) / max(float(true.norm()), floor, 1e-300)


def propagate(z0: np.ndarray, step, norms: TokenNorms, J: int):
    """Run z_{j+1} = step(z_j, ‖ĥ_{T+j}‖) for J loops; returns whole-batch norms, mean token norms and
    residual norms (index 0 = loop T) and the coordinates y_j = Σ z of ĥ − h_T."""
    total, tok, res = np.empty(J + 1), np.empty(J + 1), np.empty(J + 1)
    y = np.zeros_like(z0)
    total[0], tok[0] = norms(y)
    res[0] = float(np.linalg.norm(z0))
    z = z0
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(1, J + 1):
            z = step(z, total[j - 1])
            y = y + z
            res[j] = float(np.linalg.norm(z))
            total[j], tok[j] = norms(y)
            if not (math.isfinite(total[j]) and math.isfinite(res[j])):
                total[j:], tok[j:], res[j:] = math.inf, math.inf, math.inf
                break
    return total, tok, res, y


def long_rate(z0: np.ndarray, step, norms: TokenNorms, loops: int = LONG_RUN) -> tuple[float, float | None]:
    """Asymptotic rate of a reduced propagation (tail of the residual over `loops` loops) and the
    limit of the whole-batch norm when it converges."""
    z, y = z0, np.zeros_like(z0)
    res = np.empty(loops + 1)
    res[0] = float(np.linalg.norm(z0))
    N = norms.total(y)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for j in range(1, loops + 1):
            z = step(z, N)
            y = y + z
            res[j] = float(np.linalg.norm(z))
            N = norms.total(y)
            if not math.isfinite(res[j]) or res[j] > 1e200:
                return math.inf, None
            if res[j] < 1e-250:
                return RATE_FLOOR, N
    rate = curve_rate(res)
    return rate, (N if rate < 0 and math.isfinite(N) else None)
