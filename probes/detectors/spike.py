"""One value far above its recent level (`SpikeDetector`), or not finite (`NonFiniteDetector`).

`SpikeDetector` has three statistics:
    mad   robust z = (x − median) / (1.4826·MAD) over a rolling window (OLMo-core uses
          mean + 6σ over 128 steps; the median/MAD version ignores earlier spikes);
    ema   z = (x − μ) / σ with exponential moving mean and variance (ZClip: α = 0.97);
    ratio x / max(recent accepted values) (Megatron's "spiky loss": 10×).
Values inside a spike episode are not absorbed into the baseline (ema absorbs the clipped
value, like ZClip), so a spike does not hide the next one; an episode that lasts longer
than `max_episode` is taken as a new level and the statistics restart.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from loopdyn.probes.alerts import Alert
from loopdyn.probes.detectors.base import MAD_TO_SIGMA, Detector, check_positive, median

METHODS = ("mad", "ema", "ratio")


@dataclass
class SpikeDetector(Detector):
    """Alert when `signal` rises far above its recent level (see the module docstring).

    signal: the signal watched (others are ignored by `update`).
    method: mad | ema | ratio.
    threshold: in robust σ (mad), σ (ema) or a plain ratio (ratio); None: 6 (mad), 6 (ema),
        10 (ratio).
    window: values kept for the median (mad) or the running max (ratio).
    warmup: accepted values needed before any alert.
    alpha: the ema's decay per value.
    min_rel: the value must also exceed the baseline by this fraction of |baseline| (guards a
        nearly constant signal).
    release: the episode ends when the score falls below release·threshold.
    max_episode: an episode longer than this is a new level (None: window // 4, at least 10).
    """

    signal: str
    method: str = "mad"
    threshold: float | None = None
    window: int = 128
    warmup: int = 20
    alpha: float = 0.97
    min_rel: float = 0.0
    severity: str = "warning"
    release: float = 0.5
    max_episode: int | None = None
    kind: str = "spike"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"spike method must be one of {list(METHODS)}, got {self.method!r}")
        if self.threshold is None:
            self.threshold = 10.0 if self.method == "ratio" else 6.0
        check_positive("SpikeDetector", threshold=self.threshold, window=self.window)
        if self.max_episode is None:
            self.max_episode = max(10, self.window // 4)
        self._values: deque = deque(maxlen=self.window)
        self._mean = 0.0
        self._var = 0.0
        self._count = 0
        self._episode = 0  # steps spent in the current spike episode (0: none)
        self._alert: Alert | None = None
        self.anomalous = False  # the last value was above the threshold (also inside an episode)

    # the statistic
    def baseline(self) -> tuple[float, float] | None:
        """(level, scale) the next value is compared with; None during warm-up."""
        if self._count < self.warmup:
            return None
        if self.method == "ema":
            return self._mean, math.sqrt(max(self._var, 0.0))
        if self.method == "ratio":
            return max(self._values), 0.0
        values = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        med = median(values)
        return med, MAD_TO_SIGMA * median(np.abs(values - med))

    def score(self, value: float, base: tuple[float, float] | None = None) -> float | None:
        base = self.baseline() if base is None else base
        if base is None:
            return None
        level, scale = base
        if self.method == "ratio":
            return value / level if level > 0 else (math.inf if value > 0 else 0.0)
        scale = max(scale, 1e-3 * abs(level), 1e-12)  # a flat signal: any tiny change is not 1e9 σ
        return (value - level) / scale

    def update(self, step: int, signal: str, value: float) -> None:
        """`anomalous` tells, for every value, whether it is above the threshold (a run of bad
        steps is bad at each one); an alert is made at the first value of an episode only."""
        if signal != self.signal:
            return
        self.anomalous = False
        self._alert = None
        if not math.isfinite(value):
            return  # NonFiniteDetector's business; keep it out of the statistics
        base = self.baseline()
        score = None if base is None else self.score(value, base)
        fired = (score is not None and score > self.threshold
                 and value > base[0] + self.min_rel * abs(base[0]))
        self.anomalous = bool(fired)
        if self._episode:
            if score is None or score < self.release * self.threshold:
                self._episode = 0
            else:
                self._episode += 1
                if self._episode > self.max_episode:  # a new level, not a spike: start again
                    self._reset_stats()
                    self._episode = 0
                self._absorb(value, clipped=True)
                return
        if fired:
            self._episode = 1
            level, scale = base
            unit = "×" if self.method == "ratio" else "σ"
            self._alert = Alert(step, self.kind, self.severity, self.signal, float(value), float(self.threshold),
                                f"{self.signal} = {value:.4g} is {score:.1f}{unit} above its recent level "
                                f"{level:.4g} ({self.method}, threshold {self.threshold:g}{unit})",
                                score=float(score))
            self._absorb(value, clipped=True)
            return
        self._absorb(value, clipped=False)

    def compute(self, step: int) -> Alert | None:
        """The alert made by the value at `step`, if it opened a spike episode."""
        a = self._alert
        return a if a is not None and a.step == step else None

    def _absorb(self, value: float, clipped: bool) -> None:
        if clipped:
            if self.method != "ema" or self._count < self.warmup:
                return
            value = self._mean + self.threshold * math.sqrt(max(self._var, 0.0))  # ZClip: absorb the clipped value
        self._values.append(value)
        self._count += 1
        if self._count <= self.warmup:  # plain running mean and variance during warm-up
            delta = value - self._mean
            self._mean += delta / self._count
            self._var += (delta * (value - self._mean) - self._var) / self._count
        else:
            delta = value - self._mean
            self._mean += (1 - self.alpha) * delta
            self._var = self.alpha * (self._var + (1 - self.alpha) * delta * delta)

    def _reset_stats(self) -> None:
        self._values.clear()
        self._mean = self._var = 0.0
        self._count = 0

    def state_dict(self) -> dict:
        return {"values": list(self._values), "mean": self._mean, "var": self._var, "count": self._count,
                "episode": self._episode}

    def load_state_dict(self, state: dict) -> None:
        self._values = deque(state["values"], maxlen=self.window)
        self._mean, self._var = float(state["mean"]), float(state["var"])
        self._count, self._episode = int(state["count"]), int(state["episode"])


@dataclass
class NonFiniteDetector(Detector):
    """NaN or ±Inf in `signal`: a critical alert, once per run of non-finite values."""

    signal: str
    severity: str = "critical"

    def __post_init__(self) -> None:
        self._bad = False
        self._alert: Alert | None = None
        self.anomalous = False  # the last value was not finite

    def update(self, step: int, signal: str, value: float) -> None:
        if signal != self.signal:
            return
        self._alert = None
        self.anomalous = not math.isfinite(value)
        if not self.anomalous:
            self._bad = False
        elif not self._bad:
            self._bad = True
            self._alert = Alert(step, "nonfinite", self.severity, self.signal, value, math.nan,
                                f"{self.signal} is {value} (not finite)", score=math.nan)

    def compute(self, step: int) -> Alert | None:
        a = self._alert
        return a if a is not None and a.step == step else None

    def state_dict(self) -> dict:
        return {"bad": self._bad}

    def load_state_dict(self, state: dict) -> None:
        self._bad = bool(state["bad"])
