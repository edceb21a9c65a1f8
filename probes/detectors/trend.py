"""A positive signal that keeps growing (`TrendDetector`): the Theil–Sen slope of log x over the
last `window` observations and Kendall's τ (monotonicity); an alert when the fitted growth over
the window reaches `min_growth` and τ ≥ `min_tau`."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from loopdyn.probes.alerts import Alert
from loopdyn.probes.detectors.base import Detector, check_positive, theil_sen


@dataclass
class TrendDetector(Detector):
    """A positive `signal` that keeps growing (see the module docstring).

    window: observations fitted (not steps: a signal measured every N steps spans N·window).
    min_growth: fitted growth factor exp(slope·span) over the window that counts as a trend.
    min_tau: Kendall's τ of the window (1 = strictly increasing).
    warmup: observations seen before the first alert.
    An episode ends when the growth falls below √min_growth or τ below min_tau / 2.
    """

    signal: str
    window: int = 30
    min_growth: float = 2.0
    min_tau: float = 0.5
    warmup: int = 30
    severity: str = "warning"
    kind: str = "spike_warning"

    def __post_init__(self) -> None:
        check_positive("TrendDetector", window=self.window, min_growth=self.min_growth)
        self._points: deque = deque(maxlen=self.window)
        self._seen = 0
        self._active = False
        self._alert: Alert | None = None

    def fit(self) -> tuple[float, float, float] | None:
        """(slope of log x per step, τ, growth over the window span) or None."""
        if len(self._points) < max(5, self.window // 2):
            return None
        pts = np.array(self._points, dtype=np.float64)
        slope, tau = theil_sen(pts[:, 0], pts[:, 1])
        span = pts[-1, 0] - pts[0, 0]
        return slope, tau, math.exp(min(slope * span, 700.0))

    def update(self, step: int, signal: str, value: float) -> None:
        if signal != self.signal:
            return
        self._alert = None
        if not (math.isfinite(value) and value > 0):
            return
        self._points.append((float(step), math.log(value)))
        self._seen += 1
        fit = self.fit()
        if fit is None or self._seen < self.warmup:
            return
        slope, tau, growth = fit
        if self._active:
            if growth < math.sqrt(self.min_growth) or tau < self.min_tau / 2:
                self._active = False
            return
        if growth >= self.min_growth and tau >= self.min_tau:
            self._active = True
            doubling = math.log(2) / slope if slope > 0 else math.inf
            self._alert = Alert(step, self.kind, self.severity, self.signal, math.exp(self._points[-1][1]),
                                self.min_growth, f"{self.signal} keeps growing: ×{growth:.3g} over the last "
                                f"{len(self._points)} observations (τ = {tau:.2f}, doubling every {doubling:.0f} "
                                "steps)", score=growth)

    def compute(self, step: int) -> Alert | None:
        a = self._alert
        return a if a is not None and a.step == step else None

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self._points], "seen": self._seen, "active": self._active}

    def load_state_dict(self, state: dict) -> None:
        self._points = deque((tuple(p) for p in state["points"]), maxlen=self.window)
        self._seen, self._active = int(state["seen"]), bool(state["active"])
