"""How many loops, and when should each token stop? Exit criteria calibrated from the dynamics.

    from loopdyn.dynamics.exits import exits
    report = exits(model, idx)                 # any LoopedModel with decode; idx (B, S) token ids
    print(report.to_text()); report.to_json()

One call runs the loop on the probe to the long run H (default 4 × the trained depth μ) and
returns a frozen `ExitsReport` with

* `calibration` — every exit criterion (`criteria`: Huginn's six, the model's exit gate, the
  contraction criterion) on a grid of thresholds against the oracle loop per token: loops used
  and saved, loss change, top-1 agreement with the long-run output, the Pareto front, the
  threshold meeting a loss budget with the fewest loops, and the published defaults (`calibrate`);
* `lens` — per loop and per token: loss, entropy, top-1 agreement and KL with the long-run
  output, residual, phase (`lens`);
* `depth` — the best depth per token with its dynamical reason and the probe's best depth with a
  bootstrap interval (`depth`).

Modules: `signals` (the measured loop), `criteria`, `calibrate`, `lens`, `depth`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loopdyn.dynamics.exits.calibrate import (DEFAULT_BUDGET, ORACLE_KL, Calibration, OperatingPoint, calibrate,
                                              oracle_loops, pareto_front)
from loopdyn.dynamics.exits.criteria import (CRITERIA, DEFAULTS, HUGINN, Criterion, check_criteria,
                                             criterion_values, exit_loops, predicted_distance, threshold_grid)
from loopdyn.dynamics.exits.depth import REASONS, BestDepth, best_depth
from loopdyn.dynamics.exits.lens import LoopLens, loop_lens
from loopdyn.dynamics.exits.signals import LoopSignals, loop_signals
from loopdyn.dynamics.loopmap import Cost, DynamicsError
from loopdyn.models.protocol import model_name, require_looped


@dataclass(frozen=True)
class ExitsReport:
    """The result of `exits` (module docstring); `to_json()` is the `exits` record."""

    model: str
    mean_loops: int
    horizon: int
    tokens: int
    calibration: Calibration
    lens: LoopLens
    depth: BestDepth
    signals: LoopSignals
    seconds: float = 0.0
    probe: str = ""

    def nonconvergent_firing(self) -> dict:
        """Criterion → tokens at which its default fired although the token does not converge."""
        return {name: p.fires_on_nonconvergent for name, p in self.calibration.defaults.items()
                if p.fires_on_nonconvergent}

    def to_text(self) -> str:
        c = self.calibration
        lines = [f"exits: {self.model}, {self.tokens} tokens, trained depth μ = {self.mean_loops}, loop budget "
                 f"T = {c.budget_loops}, long run H = {self.horizon} ({self.seconds:.1f} s)"]
        if self.probe:
            lines.append(f"  probe: {self.probe}")
        lines.append(c.table())
        bad = self.nonconvergent_firing()
        n_nc = int(self.signals.nonconvergent.sum())
        if n_nc:
            lines.append(f"  {n_nc} tokens do not converge (cycle, drift, divergence); at their defaults "
                         + (", ".join(f"{k} fires on {v}" for k, v in bad.items()) if bad else "no criterion fires on them"))
        lines.append(self.depth.to_text())
        lines.append(self.lens.to_text())
        return "\n".join(lines)

    def to_json(self, per_token: bool = True) -> dict:
        return {"model": self.model, "mean_loops": self.mean_loops, "horizon": self.horizon, "tokens": self.tokens,
                "probe": self.probe, "seconds": round(self.seconds, 3),
                "criteria_defaults": {k: (None if v == float("inf") else v) for k, v in DEFAULTS.items()},
                "calibration": self.calibration.to_json(), "best_depth": self.depth.to_json(),
                "lens": self.lens.to_json(per_token), "nonconvergent_tokens": int(self.signals.nonconvergent.sum()),
                "cost": self.signals.cost.to_json()}


def exits(model, idx: torch.Tensor, *, criteria=("all",), max_loops: int | None = None, horizon: int | None = None,
          budget: float = DEFAULT_BUDGET, oracle_kl: float = ORACLE_KL, targets: torch.Tensor | None = None,
          h0: torch.Tensor | None = None, jacobian_rate: bool = False, seed: int = 0, probe: str = "",
          progress=None) -> ExitsReport:
    """Measure the loop on the probe `idx` (B, S) to `horizon` loops (default 4 × max(μ, max_loops))
    and calibrate `criteria` within the loop budget `max_loops` (default μ) for the relative loss
    `budget` (0.005 = 0.5 %). See the module docstring and `calibrate` for the definitions."""
    start = time.perf_counter()
    require_looped(model)
    mu = int(model.mean_loops)
    T = mu if max_loops is None else max_loops
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise DynamicsError(f"max_loops must be a positive integer, got {max_loops!r}")
    H = 4 * max(T, mu) if horizon is None else horizon
    if isinstance(H, int) and not isinstance(H, bool) and H < T:
        raise DynamicsError(f"the long run ({H} loops) must be at least the loop budget ({T} loops)")
    signals = loop_signals(model, idx, H, targets=targets, h0=h0, seed=seed, jacobian_rate=jacobian_rate,
                           progress=progress, cost=Cost())
    cal = calibrate(signals, criteria, budget_loops=T, budget=budget, oracle_kl=oracle_kl)
    return ExitsReport(model_name(model), signals.mean_loops, signals.horizon, signals.n_tokens, cal,
                       loop_lens(signals), best_depth(signals), signals, time.perf_counter() - start, probe)


__all__ = ["ExitsReport", "exits", "LoopSignals", "loop_signals", "Calibration", "OperatingPoint", "calibrate",
           "oracle_loops", "pareto_front", "Criterion", "CRITERIA", "HUGINN", "DEFAULTS", "check_criteria",
           "criterion_values", "exit_loops", "predicted_distance", "threshold_grid", "LoopLens", "loop_lens",
           "BestDepth", "best_depth", "REASONS", "ORACLE_KL", "DEFAULT_BUDGET"]
