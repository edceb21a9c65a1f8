"""The one detector interface, and the pieces every detector shares.

Every detector follows torchmetrics' `Metric`: `update(step, signal, value)` feeds one
observation (a detector ignores the signals it does not watch), `compute(step)` returns what it
concludes at `step` (an `Alert` or None; `OptimizerWatch`, a precursor source, returns its
precursors), `forward(step, signal, value)` does both. Thresholds are documented constructor
arguments with their defaults (Lightning's callbacks); a detector's statistics resume with
`state_dict()` / `load_state_dict()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from loopdyn.probes.alerts import Alert

MAD_TO_SIGMA = 1.4826  # σ = 1.4826·MAD for a normal distribution


class Detector:
    """Base of every detector: `update` feeds, `compute` concludes, `forward` does both."""

    def update(self, step: int, signal: str, value) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self, step: int):  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, step: int, signal: str, value):
        """update, then compute at the same step (torchmetrics' forward)."""
        self.update(step, signal, value)
        return self.compute(step)

    def state_dict(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def median(x: np.ndarray) -> float:
    """np.median without its overhead (partition in place; x is a scratch copy)."""
    n = len(x)
    h = n // 2
    x.partition(h if n % 2 else (h - 1, h))
    return float(x[h]) if n % 2 else 0.5 * float(x[h - 1] + x[h])


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Theil–Sen slope of y against x (`scipy.stats.theilslopes`: the median pairwise slope) and
    Kendall's τ of (x, y) (`scipy.stats.kendalltau`); (0, 0) when x is constant."""
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0, 0.0
    slope = float(stats.theilslopes(y, x).slope)
    tau = float(stats.kendalltau(x, y).statistic)
    return slope, (0.0 if math.isnan(tau) else tau)


def check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")


@dataclass
class Precursor:
    """One piece of evidence a warning detector found at a step."""

    signal: str
    score: float  # 0.5 = moderate, 1.0 = strong on its own
    text: str
    lead: float | None = None  # steps until this precursor reaches its critical level
    value: float = math.nan  # the signal's own value (ρ, the learning rate, the state norm, …)
    magnitude: float = 1.0  # positive, grows as the evidence worsens (for escalation)
    absolute: bool = False  # judged against a fixed level, not the signal's own history: counts from step 1
    transient: bool = False  # a one-step event (a gradient or update spike): confirms, never warns alone


@dataclass
class Escalation:
    """Report once, then again while the evidence keeps worsening.

    update(step, active, magnitudes) → None (stay quiet), 0 (first report) or k ≥ 1 (the k-th
    escalation). An escalation needs `every` steps since the last report and some evidence
    (by signal) at ≥ `factor` × its magnitude at that report, or a signal that was not there.
    The episode ends after `rearm` evaluations without the condition.
    """

    factor: float = 1.5
    every: int = 10
    rearm: int = 10

    def __post_init__(self) -> None:
        if not self.factor > 1:
            raise ValueError(f"Escalation: factor must be > 1, got {self.factor!r}")
        if self.every < 1 or self.rearm < 1:
            raise ValueError("Escalation: every and rearm must be ≥ 1")
        self.active = False
        self.count = 0
        self.quiet = 0
        self.last_step: int | None = None
        self.last: dict[str, float] = {}

    def update(self, step: int, condition: bool, magnitudes: dict[str, float]) -> int | None:
        if not condition:
            if self.active:
                self.quiet += 1
                if self.quiet >= self.rearm:
                    self.active, self.count, self.last = False, 0, {}
            return None
        self.quiet = 0
        if not self.active:
            self.active, self.count, self.last_step, self.last = True, 0, step, dict(magnitudes)
            return 0
        if step - self.last_step < self.every:
            return None
        worse = any(m >= self.factor * self.last[k] if k in self.last else True for k, m in magnitudes.items())
        if not worse:
            return None
        self.count += 1
        self.last_step = step
        self.last = {k: max(m, self.last.get(k, 0.0)) for k, m in magnitudes.items()}
        return self.count

    def state_dict(self) -> dict:
        return {"active": self.active, "count": self.count, "quiet": self.quiet, "last_step": self.last_step,
                "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.active, self.count, self.quiet = bool(state["active"]), int(state["count"]), int(state["quiet"])
        self.last_step, self.last = state["last_step"], dict(state["last"])


def escalated_message(escalation: int, text: str) -> str:
    return text if escalation == 0 else f"still worsening (report {escalation + 1}): {text}"


__all__ = ["Detector", "Precursor", "Escalation", "Alert", "MAD_TO_SIGMA", "median", "theil_sen",
           "escalated_message", "check_positive"]
