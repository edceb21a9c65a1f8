"""Exit criteria as one family: when should each token stop looping?

Every criterion reads per loop t = 1, 2, … a value v_t per token (from `LoopSignals`) and exits
the token at the first loop t ≥ max(1, min_loops) (checked every `every` loops) at which it
fires; a token at which it never fires runs the whole budget T (`max_loops`). The exit loop is
the number of loops run, 1..T.

Huginn's six criteria (huginn-checkpoint-format.md §3.7; `generate_with_adaptive_compute`), with
their published ("auto") thresholds:

| name             | v_t                                          | fires when  | default |
|------------------|----------------------------------------------|-------------|---------|
| entropy-diff     | |H(p_t) − H(p_{t−1})|  (no p_0: never at t=1) | v_t < thr   | 1e-3    |
| latent-diff      | ‖h_t − h_{t−1}‖ / ‖h_t‖                       | v_t < thr   | 0.03    |
| kl               | KL(p_t ‖ p_{t−1}), p_0 uniform               | v_t < thr   | 1e-3    |
| minp-kl          | the same after min-p 0.1 filtering           | v_t < thr   | 1e-5    |
| argmax-stability | loops the argmax has stayed unchanged        | v_t ≥ thr   | 5       |
| cosine           | 1 − cos(h_t, h_{t−1})                        | v_t < thr   | 1e-3    |

(argmax-stability counts from 0 at t = 1, so with thr = k the earliest exit is loop k + 1.)

**exit-gate** (models with `exit_gate`, Ouro's rule, `loopdyn.dynamics.exit_gate.exit_loops`):
the first t whose cumulative exit probability Σ_{j≤t} p_j reaches thr (Ouro's released default
thr = 1.0), with Ouro's exit distribution over the budget T.

**contraction** (new): the predicted distance to the fixed point. If the loop contracts at rate
q near the token's trajectory, ‖h_t − h*‖ ≤ ‖r_t‖·q/(1 − q) with r_t = h_t − h_{t−1} (the
a-posteriori bound of the contraction mapping theorem). From loop 3 on, with

    q_t = max( max_{t−w < j ≤ t} ‖r_j‖/‖r_{j−1}‖,  |λ_t|,  ‖J_nn‖₂ )
          (the residual ratios over the last w = min(`WINDOW`, t − 1) loops; λ_t the leading DMD
          eigenvalue of the token's residuals r_1..r_t; the Jacobian block norm when measured)
    v_t = ‖r_t‖·q_t/(1 − q_t) / ‖h_t‖   (relative predicted distance to h*)

it fires when the token's phase *from h_0..h_t alone* (`loopdyn.dynamics.phases.classify_token`,
`LoopSignals.online_fixed`) is "fixed point", q_t < 1 and v_t < ε (default 1e-3); v_t = ∞
otherwise. Where the residual contracts at one rate (a linear contraction along one mode, and
asymptotically any contraction with a dominant mode) q_t is that rate and v_t equals the relative
distance ‖h_t − h*‖/‖h_t‖ exactly; with the Jacobian rate (a local Lipschitz constant) it bounds it
for a linear loop. It does not fire on an exact cycle (the online phase is a cycle, or a DMD mode
sits on the unit circle; also the ratios over a period multiply to 1) nor on a drifting token
(a unit DMD mode at angle 0; ratios → 1, v_t → ∞). `LoopSignals.phases` (the long-run phase) then
says, per token, whether a criterion fired on a token that does not converge (`Calibration`'s
`fires_on_nonconvergent`).

**none**: never exits (every token runs T loops).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loopdyn.dynamics.loopmap import DynamicsError

HUGINN = ("entropy-diff", "latent-diff", "kl", "minp-kl", "argmax-stability", "cosine")
CRITERIA = HUGINN + ("exit-gate", "contraction", "none")
DEFAULTS = {"entropy-diff": 1e-3, "latent-diff": 0.03, "kl": 1e-3, "minp-kl": 1e-5, "argmax-stability": 5,
            "cosine": 1e-3, "exit-gate": 1.0, "contraction": 1e-3, "none": math.inf}
# criteria whose firing claims "the token has converged" (the gate and argmax-stability claim less)
CLAIMS_CONVERGENCE = ("entropy-diff", "latent-diff", "kl", "minp-kl", "cosine", "contraction")
WINDOW = 3  # contraction: residual ratios over the last WINDOW loops (fewer before loop WINDOW + 1)
FIRST = 3  # contraction: the first loop at which it may fire (two residual pairs for the DMD)


def threshold_grid(name: str, horizon: int = 32) -> np.ndarray:
    """The calibration grid of thresholds for criterion `name` (includes its default)."""
    if name == "argmax-stability":
        return np.arange(1, max(horizon, 2), dtype=float)
    if name == "exit-gate":
        return np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
    if name == "none":
        return np.array([math.inf])
    lo, hi = {"entropy-diff": (-7, 0), "latent-diff": (-6, 0), "kl": (-8, 0), "minp-kl": (-9, 0),
              "cosine": (-9, -1), "contraction": (-7, 0)}[name]
    grid = np.logspace(lo, hi, 4 * (hi - lo) + 1)
    return np.unique(np.r_[grid, DEFAULTS[name]])


def check_criteria(names, has_gate: bool = True) -> tuple[str, ...]:
    """The names, checked (one-line DynamicsError naming the unknown one); 'all' = every criterion
    the model supports; 'huginn' = Huginn's six."""
    out: list[str] = []
    for name in names:
        name = name.strip().lower().replace("_", "-")
        if name == "all":
            out += [c for c in CRITERIA if c != "none" and (has_gate or c != "exit-gate")]
        elif name == "huginn":
            out += list(HUGINN)
        elif name in CRITERIA:
            if name == "exit-gate" and not has_gate:
                raise DynamicsError("criterion exit-gate: the model has no exit_gate")
            out.append(name)
        else:
            raise DynamicsError(f"unknown exit criterion {name!r} (choose from {', '.join(CRITERIA)}, all, huginn)")
    return tuple(dict.fromkeys(out))


def contraction_rate(signals, window: int = WINDOW) -> np.ndarray:
    """(H, N) q_t of the contraction criterion (module docstring); ∞ before loop `FIRST`, or where
    a residual is zero before a non-zero one."""
    r = signals.residual
    H = r.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(r[:-1] > 0, r[1:] / r[:-1], np.where(r[1:] > 0, np.inf, 0.0))  # ratio into loop t, t=2..H
    ratio = np.vstack([np.full((1, r.shape[1]), np.inf), ratio])  # no ratio into loop 1
    q = np.full_like(r, np.inf)
    for t in range(FIRST - 1, H):  # index t = loop t + 1
        w = min(window, t)
        q[t] = ratio[t - w + 1: t + 1].max(0)
    if signals.dmd_rate is not None:
        q = np.maximum(q, signals.dmd_rate)
    if signals.jacobian_rate is not None:
        q = np.maximum(q, signals.jacobian_rate[None, :])
    return q


def predicted_distance(signals, window: int = WINDOW) -> np.ndarray:
    """(H, N) the contraction criterion's value v_t (module docstring): ‖r_t‖·q/(1 − q)/‖h_t‖, ∞
    where q ≥ 1, is not known yet, or the online phase is not a fixed point; 0 where the state
    has stopped (r_t = 0)."""
    q = contraction_rate(signals, window)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = signals.residual * q / (1 - q) / signals.state_norm
    ok = q < 1
    if signals.online_fixed is not None:
        ok &= signals.online_fixed
    v = np.where(ok, v, np.inf)
    return np.where(np.isnan(v), np.inf, v)


def criterion_values(signals, name: str, window: int = WINDOW) -> np.ndarray:
    """(H, N) v_t of criterion `name` (module docstring's table)."""
    if name == "entropy-diff":
        e = signals.entropy
        return np.vstack([np.full((1, e.shape[1]), np.inf), np.abs(np.diff(e, axis=0))])
    if name == "latent-diff":
        return signals.rel_residual
    if name == "kl":
        return signals.kl_prev
    if name == "minp-kl":
        return signals.minp_kl_prev
    if name == "cosine":
        return signals.cosine
    if name == "argmax-stability":
        a = signals.argmax
        same = np.vstack([np.zeros((1, a.shape[1]), bool), a[1:] == a[:-1]])
        count = np.zeros(a.shape, float)
        for t in range(1, a.shape[0]):
            count[t] = np.where(same[t], count[t - 1] + 1, 0)
        return count
    if name == "contraction":
        return predicted_distance(signals, window)
    if name == "exit-gate":
        return signals.gate
    if name == "none":
        return np.full(signals.residual.shape, np.inf)
    raise DynamicsError(f"unknown exit criterion {name!r}")


def exit_loops(signals, name: str, threshold: float | None = None, max_loops: int | None = None, *,
               min_loops: int = 0, every: int = 1, window: int = WINDOW, values: np.ndarray | None = None) -> np.ndarray:
    """(N,) per token the exit loop 1..T of criterion `name` at `threshold` (default: its published
    default), within the budget T = max_loops (default the trained depth μ, at most the long run).
    min_loops: no exit before this loop; every: check only at loops that are multiples of it
    (Huginn's check_criterion_every_n_steps). `values` may pass precomputed `criterion_values`."""
    T = signals.mean_loops if max_loops is None else int(max_loops)
    if not 1 <= T <= signals.horizon:
        raise DynamicsError(f"the loop budget must be in [1, {signals.horizon}] (the measured long run), got {T}")
    if every < 1 or min_loops < 0:
        raise DynamicsError("every must be ≥ 1 and min_loops ≥ 0")
    thr = DEFAULTS[name] if threshold is None else float(threshold)
    N = signals.n_tokens
    if name == "none":
        return np.full(N, T, dtype=int)
    if name == "exit-gate":
        if not signals.has_gate:
            raise DynamicsError("criterion exit-gate: the model has no exit_gate")
        if not 0 < thr <= 1:
            raise DynamicsError(f"exit-gate threshold must be in (0, 1], got {thr}")
        from loopdyn.dynamics.exit_gate import exit_loops as gate_exit_loops

        e = gate_exit_loops(signals.gate[:T], thr)
    else:
        v = (criterion_values(signals, name, window) if values is None else values)[:T]
        fires = v >= thr if name == "argmax-stability" else v < thr
        hit = fires.any(0)
        e = np.where(hit, fires.argmax(0) + 1, T)
    if min_loops > 1 or every > 1:  # re-scan with the allowed loops only
        if name == "exit-gate":
            cum = np.cumsum(_gate_probs(signals.gate[:T]), axis=0)
            fires = cum >= thr
        loops = np.arange(1, T + 1)[:, None]
        fires = fires & (loops >= max(min_loops, 1)) & (loops % every == 0)
        e = np.where(fires.any(0), fires.argmax(0) + 1, T)
    return e.astype(int)


def _gate_probs(gate: np.ndarray) -> np.ndarray:
    from loopdyn.dynamics.exit_gate import exit_distribution

    return exit_distribution(gate)


@dataclass(frozen=True)
class Criterion:
    """One criterion at one threshold (a point of the family)."""

    name: str
    threshold: float

    @property
    def is_default(self) -> bool:
        return self.threshold == DEFAULTS[self.name]

    @property
    def claims_convergence(self) -> bool:
        return self.name in CLAIMS_CONVERGENCE

    def exit_loops(self, signals, max_loops: int | None = None, **kwargs) -> np.ndarray:
        return exit_loops(signals, self.name, self.threshold, max_loops, **kwargs)

    def to_json(self) -> dict:
        return {"name": self.name, "threshold": None if math.isinf(self.threshold) else self.threshold}


__all__ = ["Criterion", "CRITERIA", "HUGINN", "DEFAULTS", "CLAIMS_CONVERGENCE", "WINDOW", "FIRST", "exit_loops",
           "criterion_values", "contraction_rate", "predicted_distance", "threshold_grid", "check_criteria"]
