"""The best depth per token, with its dynamical reason, and the whole probe's best depth.

Per token n with a target, L_n(t) = −log p_t(target_n) for t = 1..H (the long run). With the
tolerance δ_n = max(tol·|min L_n|, 1e-4 nats):

    best_n = the smallest t with L_n(t) ≤ min_s L_n(s) + δ_n

and the reason, from the token's long-run phase (`loopdyn.dynamics.phases`) and its loss curve,
in this order:

| reason       | when                                                     | best depth                       |
|--------------|----------------------------------------------------------|----------------------------------|
| cycling      | phase "cycle k": more loops do not help                  | best_n (period k recorded)       |
| drifting     | phase "drifting" or "quasi-periodic"                     | best_n                           |
| divergent    | phase "divergent"                                        | best_n                           |
| overthinking | fixed point, and the loss rises after best_n:            | best_n                           |
|              | L_n(H) > L_n(best_n) + δ_n                               |                                  |
| settled      | fixed point, no rise                                     | the first t with |L_n(s) − L_n(H)| ≤ δ_n for all s ≥ t |

The whole probe's best depth is the same rule on the mean loss over tokens, L̄(t); its interval
is a percentile bootstrap over tokens (scipy.stats.bootstrap, resampling tokens with
replacement, 1000 resamples, 95 %).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REASONS = ("settled", "overthinking", "cycling", "drifting", "divergent")
TOL = 5e-3  # relative loss tolerance, as the audit's overthinking rule (dynamics.overthinking.OVERTHINK_TOL)
ABS_TOL = 1e-4  # nats


def _tol(minimum: np.ndarray, tol: float) -> np.ndarray:
    return np.maximum(tol * np.abs(minimum), ABS_TOL)


def best_loops(L: np.ndarray, tol: float = TOL) -> np.ndarray:
    """Per column of L (H, …) the smallest loop t (1-based) within the tolerance of the minimum."""
    m = L.min(0)
    return (L <= m + _tol(m, tol)).argmax(0) + 1


@dataclass(frozen=True)
class BestDepth:
    """Best depth per token (tokens with a target), its reason, and the whole probe's (module docstring)."""

    horizon: int
    mean_loops: int
    tokens: np.ndarray  # (M,) token index n (batch-major) of each scored token
    best: np.ndarray  # (M,) best loop 1..H
    reason: tuple  # (M,) one of REASONS
    period: np.ndarray  # (M,) cycle period, 0 for the others
    rise: np.ndarray  # (M,) L(H) − L(best), nats (overthinking tokens; 0 otherwise)
    probe_best: int  # best depth of the mean loss curve
    interval: tuple  # (low, high) 95 % bootstrap over tokens
    mean_loss: np.ndarray  # (H,) the mean loss curve
    tol: float = TOL

    def counts(self) -> dict:
        return {r: int(sum(1 for x in self.reason if x == r)) for r in REASONS}

    def histogram(self) -> list:
        """Tokens whose best depth is t, for t = 1..H."""
        return np.bincount(self.best, minlength=self.horizon + 1)[1:].tolist()

    def summary(self) -> str:
        """One line: the probe's best depth with its interval, and the reasons over tokens."""
        c = {k: v for k, v in self.counts().items() if v}
        over = self.best[np.array([r == "overthinking" for r in self.reason], bool)] if len(self.reason) else []
        extra = f" (median best depth of overthinking tokens {int(np.median(over))})" if len(over) else ""
        lo, hi = self.interval
        return (f"best depth of the probe T = {self.probe_best} (95% bootstrap over {len(self.best)} tokens: "
                f"{lo}–{hi}); per token: median {int(np.median(self.best)) if len(self.best) else 0}, "
                f"{', '.join(f'{v} {k}' for k, v in c.items())}{extra}")

    def to_text(self) -> str:
        hist = self.histogram()
        top = sorted(((n, t + 1) for t, n in enumerate(hist) if n), reverse=True)[:6]
        return (self.summary() + "\n  most common best depths: "
                + ", ".join(f"T = {t} ({n} tokens)" for n, t in sorted(top, key=lambda x: x[1])))

    def to_json(self) -> dict:
        return {"probe_best": self.probe_best, "interval": list(self.interval), "counts": self.counts(),
                "histogram": self.histogram(), "tol": self.tol,
                "mean_loss": [None if not math.isfinite(x) else float(x) for x in self.mean_loss],
                "per_token": {"token": self.tokens.tolist(), "best": self.best.tolist(), "reason": list(self.reason),
                              "period": self.period.tolist(), "rise": [float(x) for x in self.rise]}}


def best_depth(signals, tol: float = TOL, n_resamples: int = 1000, seed: int = 0) -> BestDepth:
    """Best depth per token and for the probe (module docstring) from measured `LoopSignals`."""
    return best_depth_of(signals.loss, signals.phases, signals.mean_loops, tol, n_resamples, seed)


def best_depth_of(loss, phases, mean_loops: int, tol: float = TOL, n_resamples: int = 1000,
                  seed: int = 0) -> BestDepth:
    """Best depth from a per-token loss matrix `loss` (H, N) (loops 1..H; a column with a NaN has no
    target and is skipped) and the tokens' phase labels (N strings, or None: every token is taken
    as a fixed point) — e.g. the audit's probe losses and phases."""
    from scipy.stats import bootstrap

    loss = np.asarray(loss, float)
    H, N = loss.shape
    labels = list(phases) if phases is not None else ["fixed point"] * N
    if len(labels) != N:
        raise ValueError(f"{len(labels)} phase labels for {N} tokens")
    scored = np.nonzero(np.isfinite(loss).all(0))[0]
    L = loss[:, scored]  # (H, M)
    best = best_loops(L, tol) if scored.size else np.zeros(0, int)
    mins = L.min(0) if scored.size else np.zeros(0)
    d = _tol(mins, tol)
    periods = np.array([int(labels[n].split()[1]) if labels[n].startswith("cycle ") else 0 for n in scored], int)
    reasons, rise, out_best = [], np.zeros(scored.size), best.copy()
    for j, n in enumerate(scored):
        label = labels[n]
        if label.startswith("cycle"):
            reasons.append("cycling")
        elif label in ("drifting", "quasi-periodic"):
            reasons.append("drifting")
        elif label == "divergent":
            reasons.append("divergent")
        elif L[-1, j] > L[best[j] - 1, j] + d[j]:
            reasons.append("overthinking")
            rise[j] = L[-1, j] - L[best[j] - 1, j]
        else:
            reasons.append("settled")
            away = np.abs(L[:, j] - L[-1, j]) > d[j]
            out_best[j] = int(np.nonzero(away)[0].max()) + 2 if away.any() else 1
    mean = L.mean(1) if scored.size else np.full(H, np.nan)
    probe = int(best_loops(mean[:, None], tol)[0]) if scored.size else 0
    interval = (probe, probe)
    if scored.size >= 2:
        def stat(idx, axis=-1):
            curves = L[:, idx.astype(int)].mean(-1)  # (H, batch)
            return best_loops(curves, tol).astype(float)

        kw = dict(vectorized=True, n_resamples=n_resamples, method="percentile",
                  batch=max(1, 2_000_000 // max(L.size, 1)))
        try:
            res = bootstrap((np.arange(scored.size),), stat, rng=np.random.default_rng(seed), **kw)
        except TypeError:  # SciPy < 1.15 names the generator random_state
            res = bootstrap((np.arange(scored.size),), stat, random_state=np.random.default_rng(seed), **kw)
        interval = (int(res.confidence_interval.low), int(res.confidence_interval.high))
    return BestDepth(H, int(mean_loops), scored, out_best, tuple(reasons), periods, rise, probe, interval, mean, tol)


__all__ = ["BestDepth", "best_depth", "best_depth_of", "best_loops", "REASONS"]
