"""Calibrating exit criteria against an oracle: how many loops does each criterion save, at what loss?

The oracle. Per token n, the **oracle loop** o_n is the first loop after which the next-token
distribution stays within KL ε (`oracle_kl`, nats) of the long-run one:

    o_n = min { t ≥ 1 : KL(p_H ‖ p_s) ≤ ε for every s = t..H }          (H = the long run)

A token is **settled** when o_n ≤ H − H/4 (it has stayed within ε for the last quarter of the long
run at least); a cycling or drifting token is not (its o_n is H or close to it).

For a criterion c at threshold θ and the loop budget T (every token runs at most T loops), per
token the exit loop e_n (`criteria.exit_loops`); over the N tokens (the loss over the tokens
with a target):

    mean_loops     = mean_n e_n                         loops_saved = T − mean_loops
    loss           = mean_n −log p_{e_n}(target_n)      loss_change = loss / loss_ref − 1
                     with loss_ref = the same at e_n = T for every token (no early exit)
    top1_agreement = mean_n [argmax p_{e_n} = argmax p_H]
    kl_to_long_run = mean_n KL(p_H ‖ p_{e_n})
    early_exits    = tokens that exit before the oracle loop (e_n < min(o_n, T))
    fires_on_nonconvergent = tokens whose long-run phase is a cycle, quasi-periodic, drifting or
                     divergent and at which the criterion fired (e_n < T, or fired at T)

The Pareto front of a criterion is its set of thresholds not dominated in (mean_loops,
loss_change). For a loss budget β (relative, e.g. 0.005 for 0.5 %), the calibrated threshold of a
criterion is, among its thresholds with loss_change ≤ β, the one with the fewest mean loops (ties:
the smaller loss change); None when no threshold meets the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loopdyn.dynamics.exits import criteria as C
from loopdyn.dynamics.loopmap import DynamicsError

ORACLE_KL = 1e-3  # nats: "the prediction no longer changes"
DEFAULT_BUDGET = 0.005  # 0.5 % relative loss increase


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def oracle_loops(signals, eps: float = ORACLE_KL) -> np.ndarray:
    """(N,) the oracle loop o_n (module docstring)."""
    if not eps > 0:
        raise DynamicsError(f"the oracle's KL tolerance must be > 0, got {eps}")
    big = ~(signals.kl_final <= eps)  # (H, N)
    H = big.shape[0]
    last_big = np.where(big, np.arange(1, H + 1)[:, None], 0).max(0)  # the last loop still away from p_H
    return np.minimum(last_big + 1, H).astype(int)


def settled(signals, oracle: np.ndarray) -> np.ndarray:
    H = signals.horizon
    return oracle <= H - H // 4


@dataclass(frozen=True)
class OperatingPoint:
    """One criterion at one threshold, over the probe's tokens (module docstring)."""

    criterion: str
    threshold: float
    mean_loops: float
    loops_saved: float
    loss: float
    loss_change: float
    top1_agreement: float
    kl_to_long_run: float
    early_exits: int
    fires_on_nonconvergent: int
    is_default: bool

    def to_json(self) -> dict:
        return {"criterion": self.criterion, "threshold": _num(self.threshold), "mean_loops": self.mean_loops,
                "loops_saved": self.loops_saved, "loss": _num(self.loss), "loss_change": _num(self.loss_change),
                "top1_agreement": self.top1_agreement, "kl_to_long_run": _num(self.kl_to_long_run),
                "early_exits": self.early_exits, "fires_on_nonconvergent": self.fires_on_nonconvergent,
                "is_default": self.is_default}


def operating_point(signals, name: str, threshold: float, budget_loops: int, oracle: np.ndarray,
                    loss_ref: float, values: np.ndarray | None = None) -> tuple[OperatingPoint, np.ndarray]:
    """The OperatingPoint of `name` at `threshold` and the per-token exit loops."""
    e = C.exit_loops(signals, name, threshold, budget_loops, values=values)
    n = np.arange(signals.n_tokens)
    rows = e - 1
    scored = signals.has_targets
    loss = float(signals.loss[rows[scored], n[scored]].mean()) if scored.any() else math.nan
    change = loss / loss_ref - 1 if math.isfinite(loss_ref) and loss_ref > 0 else math.nan
    T = budget_loops
    if name == "none":
        fired = np.zeros_like(e, dtype=bool)
    elif name == "exit-gate":
        fired = e < T
    else:
        vals = (C.criterion_values(signals, name) if values is None else values)[:T]
        f = vals >= threshold if name == "argmax-stability" else vals < threshold
        fired = f.any(0)
    point = OperatingPoint(name, float(threshold), float(e.mean()), float(T - e.mean()), loss, change,
                           float(signals.top1_final[rows, n].mean()), float(signals.kl_final[rows, n].mean()),
                           int((e < np.minimum(oracle, T)).sum()), int((fired & signals.nonconvergent).sum()),
                           bool(threshold == C.DEFAULTS[name]))
    return point, e


def pareto_front(points) -> list:
    """The points not dominated in (mean_loops, loss_change), by increasing mean loops."""
    pts = sorted(points, key=lambda p: (p.mean_loops, p.loss_change if math.isfinite(p.loss_change) else math.inf))
    front, best = [], math.inf
    for p in pts:
        lc = p.loss_change if math.isfinite(p.loss_change) else math.inf
        if lc < best:
            front.append(p)
            best = lc
    return front


def pick_for_budget(points, budget: float):
    """Among `points` with loss_change ≤ budget, the fewest mean loops, then the smallest loss
    change, then the threshold nearest the criterion's default (on a log scale)."""
    ok = [p for p in points if math.isfinite(p.loss_change) and p.loss_change <= budget]

    def distance(p):
        d = C.DEFAULTS[p.criterion]
        return abs(math.log(p.threshold / d)) if p.threshold > 0 and 0 < d < math.inf else 0.0
    return min(ok, key=lambda p: (p.mean_loops, p.loss_change, distance(p))) if ok else None


@dataclass(frozen=True)
class Calibration:
    """Every criterion on its threshold grid against the oracle (module docstring)."""

    budget_loops: int  # T
    horizon: int  # H
    oracle_kl: float
    budget: float  # β, relative loss change
    loss_ref: float  # mean loss at T loops for every token
    oracle: np.ndarray  # (N,)
    settled: np.ndarray  # (N,) bool
    points: tuple  # OperatingPoint, every criterion × threshold
    chosen: dict  # criterion → OperatingPoint meeting the budget with the fewest loops (or None)
    defaults: dict  # criterion → OperatingPoint at its published default
    default_exits: dict  # criterion → (N,) exit loops at the default threshold

    @property
    def criteria(self) -> tuple:
        return tuple(dict.fromkeys(p.criterion for p in self.points))

    def of(self, name: str) -> list:
        return [p for p in self.points if p.criterion == name]

    def front(self, name: str) -> list:
        return pareto_front(self.of(name))

    def oracle_mean(self) -> float:
        return float(np.minimum(self.oracle, self.budget_loops).mean())

    def table(self) -> str:
        """Per criterion: the published default and the calibrated threshold side by side."""
        head = (f"{'criterion':<28} {'threshold':>10} {'loops':>6} {'saved':>6} {'Δloss':>8} {'top-1':>6} "
                f"{'early':>5} {'non-conv':>8}")
        lines = [f"exit criteria against the oracle (budget T = {self.budget_loops} loops, long run H = "
                 f"{self.horizon}, oracle KL ε = {self.oracle_kl:g} nats; loss at T = {self.loss_ref:.4g})",
                 f"  oracle loop: mean {float(self.oracle.mean()):.3g} over the long run, {self.oracle_mean():.3g} "
                 f"within T; {int((self.oracle <= self.budget_loops).sum())} of {self.oracle.size} tokens settle within "
                 f"T, {int(self.settled.sum())} within the long run", "  " + head]

        def row(tag, p):
            thr = "—" if p is None else ("∞" if math.isinf(p.threshold) else f"{p.threshold:.3g}")
            if p is None:
                return f"  {tag:<28} {'none meets the budget':>10}"
            lc = f"{100 * p.loss_change:+.2f}%" if math.isfinite(p.loss_change) else "n/a"
            return (f"  {tag:<28} {thr:>10} {p.mean_loops:>6.2f} {p.loops_saved:>6.2f} {lc:>8} "
                    f"{100 * p.top1_agreement:>5.1f}% {p.early_exits:>5} {p.fires_on_nonconvergent:>8}")
        for name in self.criteria:
            if name in self.defaults:
                lines.append(row(f"{name} (default)", self.defaults[name]))
            if name != "none":
                lines.append(row(f"{name} (≤{100 * self.budget:g}%)", self.chosen.get(name)))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"budget_loops": self.budget_loops, "horizon": self.horizon, "oracle_kl": self.oracle_kl,
                "budget": self.budget, "loss_ref": _num(self.loss_ref),
                "oracle": {"mean_loops": self.oracle_mean(), "settled": int(self.settled.sum()),
                           "tokens": int(self.oracle.size), "loops": self.oracle.tolist()},
                "points": [p.to_json() for p in self.points],
                "pareto": {name: [p.to_json() for p in self.front(name)] for name in self.criteria},
                "defaults": {k: v.to_json() for k, v in self.defaults.items()},
                "calibrated": {k: (None if v is None else v.to_json()) for k, v in self.chosen.items()},
                "default_exit_loops": {k: v.tolist() for k, v in self.default_exits.items()}}


def calibrate(signals, names=("all",), *, budget_loops: int | None = None, budget: float = DEFAULT_BUDGET,
              oracle_kl: float = ORACLE_KL, grids: dict | None = None) -> Calibration:
    """Evaluate each criterion of `names` (see `criteria.check_criteria`) on its threshold grid
    (`criteria.threshold_grid`, or grids[name]) within the loop budget T (default the trained
    depth μ) against the oracle, and pick the threshold meeting the loss budget (module docstring)."""
    names = C.check_criteria(names, signals.has_gate)
    T = signals.mean_loops if budget_loops is None else int(budget_loops)
    if not 1 <= T <= signals.horizon:
        raise DynamicsError(f"the loop budget must be in [1, {signals.horizon}] (the measured long run), got {T}")
    if not budget >= 0:
        raise DynamicsError(f"the loss budget must be ≥ 0, got {budget}")
    oracle = oracle_loops(signals, oracle_kl)
    scored = signals.has_targets
    loss_ref = float(signals.loss[T - 1, scored].mean()) if scored.any() else math.nan
    points, chosen, defaults, default_exits = [], {}, {}, {}
    for name in names:
        grid = np.asarray((grids or {}).get(name, C.threshold_grid(name, T)), float)
        grid = np.unique(np.r_[grid, C.DEFAULTS[name]])
        values = None if name in ("exit-gate", "none") else C.criterion_values(signals, name)
        mine = []
        for thr in grid:
            p, e = operating_point(signals, name, thr, T, oracle, loss_ref, values)
            mine.append(p)
            if p.is_default:
                defaults[name] = p
                default_exits[name] = e
        points += mine
        if name != "none":
            chosen[name] = pick_for_budget(mine, budget)
    return Calibration(T, signals.horizon, float(oracle_kl), float(budget), loss_ref, oracle,
                       settled(signals, oracle), tuple(points), chosen, defaults, default_exits)


__all__ = ["Calibration", "OperatingPoint", "calibrate", "oracle_loops", "pareto_front", "pick_for_budget",
           "ORACLE_KL", "DEFAULT_BUDGET"]
