"""Detectors: turn a stream of (step, value) into alerts. Host-side, cheap, state-dict-able.

- `SpikeDetector`: one value far above the recent level. Three statistics:
    mad   robust z = (x − median) / (1.4826·MAD) over a rolling window (OLMo-core uses
          mean + 6σ over 128 steps; the median/MAD version ignores earlier spikes);
    ema   z = (x − μ) / σ with exponential moving mean and variance (ZClip: α = 0.97);
    ratio x / max(recent accepted values) (Megatron's "spiky loss": 10×).
  Values inside a spike episode are not absorbed into the baseline (ema absorbs the clipped
  value, like ZClip), so a spike does not hide the next one; an episode that lasts longer
  than `max_episode` is taken as a new level and the statistics restart.
- `NonFiniteDetector`: NaN or ±Inf in any signal, at once, critical.
- `TrendDetector`: a positive signal that keeps growing: Theil–Sen slope of log x over the
  last `window` observations and Kendall's τ (monotonicity); alert when the fitted growth
  over the window reaches `min_growth` and τ ≥ `min_tau`.
- `EarlyWarningDetector`: fuses the precursors of loop instability into one score (see its
  docstring) and estimates the lead time.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loopdyn.probes.alerts import Alert

MAD_TO_SIGMA = 1.4826  # σ = 1.4826·MAD for a normal distribution
DEFAULT_THRESHOLDS = {"mad": 6.0, "ema": 6.0, "ratio": 10.0}


def _median(x: np.ndarray) -> float:
    """np.median without its overhead (partition in place; x is a scratch copy)."""
    n = len(x)
    h = n // 2
    x.partition(h if n % 2 else (h - 1, h))
    return float(x[h]) if n % 2 else 0.5 * float(x[h - 1] + x[h])


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Median pairwise slope of y against x, and Kendall's τ of (x, y) (no tie correction)."""
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = x[j] - x[i], y[j] - y[i]
    keep = dx != 0
    if not keep.any():
        return 0.0, 0.0
    slopes = dy[keep] / dx[keep]
    tau = float(np.sign(dx[keep] * dy[keep]).mean())
    return float(np.median(slopes)), tau


@dataclass
class SpikeDetector:
    """Alert when a value rises far above its recent level (see the module docstring).

    threshold: in robust σ (mad), σ (ema) or a plain ratio (ratio); default 6, 6, 10.
    window: values kept for the median (mad) or the running max (ratio).
    warmup: accepted values needed before any alert.  min_rel: the value must also exceed
    the baseline by this fraction of |baseline| (guards a nearly constant signal).
    """

    signal: str
    method: str = "mad"
    threshold: float | None = None
    window: int = 128
    warmup: int = 20
    alpha: float = 0.97
    min_rel: float = 0.0
    severity: str = "warning"
    release: float = 0.5  # the episode ends when the score falls below release·threshold
    max_episode: int | None = None  # None: window // 4, at least 10
    kind: str = "spike"

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_THRESHOLDS:
            raise ValueError(f"spike method must be one of {sorted(DEFAULT_THRESHOLDS)}, got {self.method!r}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.method]
        if self.max_episode is None:
            self.max_episode = max(10, self.window // 4)
        self._values: deque = deque(maxlen=self.window)
        self._mean = 0.0
        self._var = 0.0
        self._count = 0
        self._episode = 0  # steps spent in the current spike episode (0: none)
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
        med = _median(values)
        return med, MAD_TO_SIGMA * _median(np.abs(values - med))

    def score(self, value: float, base: tuple[float, float] | None = None) -> float | None:
        base = self.baseline() if base is None else base
        if base is None:
            return None
        level, scale = base
        if self.method == "ratio":
            return value / level if level > 0 else (math.inf if value > 0 else 0.0)
        scale = max(scale, 1e-3 * abs(level), 1e-12)  # a flat signal: any tiny change is not 1e9 σ
        return (value - level) / scale

    def update(self, step: int, value: float) -> Alert | None:
        """Returns an alert at the first value of a spike episode only; `anomalous` tells, for
        every value, whether it is above the threshold (a run of bad steps is bad at each one)."""
        self.anomalous = False
        if not math.isfinite(value):
            return None  # NonFiniteDetector's business; keep it out of the statistics
        base = self.baseline()
        score = None if base is None else self.score(value, base)
        alert = None
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
                return None
        if fired:
            self._episode = 1
            level, scale = base
            unit = "×" if self.method == "ratio" else "σ"
            alert = Alert(step, self.kind, self.severity, self.signal, float(score), float(self.threshold),
                          f"{self.signal} = {value:.4g} is {score:.1f}{unit} above its recent level "
                          f"{level:.4g} ({self.method}, threshold {self.threshold:g}{unit})")
            self._absorb(value, clipped=True)
            return alert
        self._absorb(value, clipped=False)
        return None

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
class NonFiniteDetector:
    """NaN or ±Inf in a signal: a critical alert, once per run of non-finite values."""

    signal: str
    severity: str = "critical"

    def __post_init__(self) -> None:
        self._bad = False
        self.anomalous = False  # the last value was not finite

    def update(self, step: int, value: float) -> Alert | None:
        self.anomalous = not math.isfinite(value)
        if math.isfinite(value):
            self._bad = False
            return None
        if self._bad:
            return None
        self._bad = True
        return Alert(step, "nonfinite", self.severity, self.signal, value, 0.0,
                     f"{self.signal} is {value} (not finite)")

    def state_dict(self) -> dict:
        return {"bad": self._bad}

    def load_state_dict(self, state: dict) -> None:
        self._bad = bool(state["bad"])


@dataclass
class TrendDetector:
    """A positive signal that keeps growing (see the module docstring).

    window: observations fitted (not steps: a signal measured every N steps spans N·window).
    min_growth: fitted growth factor exp(slope·span) over the window that counts as a trend.
    min_tau: Kendall's τ of the window (1 = strictly increasing).
    """

    signal: str
    window: int = 30
    min_growth: float = 2.0
    min_tau: float = 0.5
    warmup: int = 30  # observations seen before the first alert
    severity: str = "warning"

    def __post_init__(self) -> None:
        self._points: deque = deque(maxlen=self.window)
        self._seen = 0
        self._active = False

    def fit(self) -> tuple[float, float, float] | None:
        """(slope of log x per step, τ, growth over the window span) or None."""
        if len(self._points) < max(5, self.window // 2):
            return None
        pts = np.array(self._points, dtype=np.float64)
        slope, tau = theil_sen(pts[:, 0], pts[:, 1])
        span = pts[-1, 0] - pts[0, 0]
        return slope, tau, math.exp(min(slope * span, 700.0))

    def update(self, step: int, value: float) -> Alert | None:
        if not (math.isfinite(value) and value > 0):
            return None
        self._points.append((float(step), math.log(value)))
        self._seen += 1
        fit = self.fit()
        if fit is None or self._seen < self.warmup:
            return None
        slope, tau, growth = fit
        if self._active:
            if growth < math.sqrt(self.min_growth) or tau < self.min_tau / 2:
                self._active = False
            return None
        if growth >= self.min_growth and tau >= self.min_tau:
            self._active = True
            doubling = math.log(2) / slope if slope > 0 else math.inf
            return Alert(step, "trend", self.severity, self.signal, growth, self.min_growth,
                         f"{self.signal} keeps growing: ×{growth:.3g} over the last {len(self._points)} "
                         f"observations (τ = {tau:.2f}, doubling every {doubling:.0f} steps)")
        return None

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self._points], "seen": self._seen, "active": self._active}

    def load_state_dict(self, state: dict) -> None:
        self._points = deque((tuple(p) for p in state["points"]), maxlen=self.window)
        self._seen, self._active = int(state["seen"]), bool(state["active"])


@dataclass
class Precursor:
    """One piece of evidence the early-warning detector found at a step."""

    signal: str
    score: float  # 0.5 = moderate, 1.0 = strong on its own
    text: str
    lead: float | None = None  # steps until this precursor reaches its critical level


@dataclass
class EarlyWarningDetector:
    """Fuses the precursors of a loss spike in a looped model into one alert with a lead time.

    Each precursor scores 0 (quiet), 0.5 (moderate) or up to 1 (strong); the alert fires when
    the sum reaches `threshold` (1 by default: one strong precursor or two moderate ones).
    Levels are relative to each signal's own reference: the median of the `reference`
    observations before the latest `recent` ones, so a model's normal scale never alarms.

    precursor                 moderate (0.5)                   strong (1.0)
    ρ(Ā) (injection_radius)   ρ ≥ 0.9, climbing steadily over  ρ > 1 + 1e-3
                              the last 5 values (Kendall τ ≥
                              0.8) and projected (Theil–Sen
                              slope) to reach 1 within
                              `horizon` (30) steps
    state norm ‖h_T‖          recent/reference ≥ 2.5           ≥ 5
    loop Jacobian σ_max       > 1 and ≥ 1.5× reference         > 1 and ≥ 3× reference
    relative residual         ≥ 0.5 and ≥ 2× reference         —
    grad norm, update ratio   a fresh spike (robust z ≥ 6)     —
                              within the last `spike_hold` steps
    attention max logit       ≥ 1.5× reference                 ≥ 3× reference
    output log Z              ≥ reference + 5 nats             —

    A diagonal (Parcae) injection has ρ(Ā) < 1 by construction and an additive one has
    ρ = 1 exactly; the ρ precursor only watches injections that can cross 1 (`watch_radius`).

    Lead time: for precursors with a measurable trend, the steps until they reach their
    critical level (ρ = 1; ‖h_T‖ = `critical_growth` × reference at the current log-growth
    rate); 0 when a strong precursor is already past it; the alert reports the smallest.
    """

    threshold: float = 1.0
    warmup: int = 30  # steps before the first evaluation that may fire
    reference: int = 20
    recent: int = 3
    horizon: float = 30.0
    radius_watch: float = 0.9  # ρ below this is not projected
    critical_growth: float = 10.0
    watch_radius: bool = True
    rearm: int = 10  # quiet evaluations (score < threshold/2) before it may fire again
    spike_hold: int = 5  # steps a fresh gradient/update spike counts as a precursor
    state_growth: tuple = (2.5, 5.0)  # moderate, strong ‖h_T‖ ratio to its reference
    severity: str = "warning"
    _series: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._armed = True
        self._quiet = 0
        self._first_step: int | None = None
        self.last_score = 0.0
        self.last_precursors: list[Precursor] = []

    def observe(self, step: int, signal: str, value: float) -> None:
        if self._first_step is None:
            self._first_step = step
        buf = self._series.get(signal)
        if buf is None:
            buf = self._series[signal] = deque(maxlen=self.reference + self.recent + 10)
        if math.isfinite(value):
            buf.append((step, value))

    # helpers over one signal's buffer
    def _split(self, signal: str, recent: int | None = None):
        buf = self._series.get(signal)
        recent = self.recent if recent is None else recent
        if buf is None or len(buf) < recent + 5:
            return None
        pts = list(buf)
        ref = np.array([v for _, v in pts[-(recent + self.reference):-recent]])
        rec = np.array([v for _, v in pts[-recent:]])
        return float(np.median(ref)), float(np.median(rec)), pts

    def _growth_precursor(self, signal: str, moderate: float, strong: float | None, label: str,
                          recent: int | None = None) -> Precursor | None:
        split = self._split(signal, recent)
        if split is None:
            return None
        ref, rec, pts = split
        if ref <= 0:
            return None
        ratio = rec / ref
        if strong is not None and ratio >= strong:
            return Precursor(signal, 1.0, f"{label} ×{ratio:.2g} its reference", lead=0.0)
        if ratio >= moderate:
            return Precursor(signal, 0.5, f"{label} ×{ratio:.2g} its reference", lead=self._growth_lead(pts, ref))
        return None

    def _growth_lead(self, pts, ref: float) -> float | None:
        """Steps until the signal reaches critical_growth × ref at its recent log-growth rate."""
        tail = [(s, v) for s, v in pts[-6:] if v > 0]
        if len(tail) < 3:
            return None
        x = np.array([s for s, _ in tail], dtype=np.float64)
        y = np.log(np.array([v for _, v in tail]))
        slope, _ = theil_sen(x, y)
        if slope <= 0:
            return None
        return max(0.0, (math.log(self.critical_growth * ref) - y[-1]) / slope)

    def _radius_precursor(self) -> Precursor | None:
        buf = self._series.get("injection_radius")
        if not self.watch_radius or not buf:
            return None
        step, rho = buf[-1]
        if rho > 1 + 1e-3:
            return Precursor("injection_radius", 1.0, f"ρ(Ā) = {rho:.3f} > 1 (the loop's linear part is unstable)",
                             lead=0.0)
        pts = list(buf)[-5:]
        if len(pts) < 5 or rho < self.radius_watch:
            return None
        slope, tau = theil_sen(np.array([s for s, _ in pts], float), np.array([v for _, v in pts], float))
        if slope <= 0 or tau < 0.8:  # ρ of a dense Ā wanders as eigenvalues trade places: only a
            return None              # steady climb is projected
        t_cross = (1.0 - rho) / slope
        if t_cross > self.horizon:
            return None
        return Precursor("injection_radius", 0.5, f"ρ(Ā) = {rho:.3f} rising {slope:.2g}/step, reaches 1 in "
                         f"~{t_cross:.0f} steps", lead=t_cross)

    def _jacobian_precursor(self) -> Precursor | None:
        buf = self._series.get("jacobian_norm")
        if not buf or len(buf) < 3:
            return None
        last = buf[-1][1]
        ref = float(np.median([v for _, v in list(buf)[:-1][-self.reference:]]))
        if last <= 1 or ref <= 0:
            return None
        ratio = last / ref
        if ratio >= 3:
            return Precursor("jacobian_norm", 1.0, f"loop Jacobian σ_max = {last:.3g} (×{ratio:.2g})", lead=0.0)
        if ratio >= 1.5:
            return Precursor("jacobian_norm", 0.5, f"loop Jacobian σ_max = {last:.3g} (×{ratio:.2g})")
        return None

    def _spike_z(self, pts, i: int) -> float:
        """Robust z of pts[i] against the `reference` values before it."""
        ref = np.array([v for _, v in pts[max(0, i - self.reference):i]])
        med = float(np.median(ref))
        scale = max(MAD_TO_SIGMA * float(np.median(np.abs(ref - med))), 1e-3 * abs(med), 1e-12)
        return (pts[i][1] - med) / scale

    def _spike_precursor(self, signal: str, label: str) -> Precursor | None:
        """A fresh spike (robust z ≥ 6 after a value that was not one) counts for `spike_hold`
        steps; a lasting level shift (a learning-rate change) is not a spike."""
        buf = self._series.get(signal)
        if buf is None or len(buf) < self.reference // 2 + 2:
            return None
        pts = list(buf)
        last_step = pts[-1][0]
        for i in range(len(pts) - 1, max(self.reference // 2, len(pts) - 1 - 20), -1):
            if last_step - pts[i][0] >= self.spike_hold:
                break
            z = self._spike_z(pts, i)
            if z >= 6 and self._spike_z(pts, i - 1) < 6:
                return Precursor(signal, 0.5, f"{label} spike ({z:.0f}σ at step {pts[i][0]})")
        return None

    def _residual_precursor(self) -> Precursor | None:
        """The relative residual is noisy batch to batch; it counts only when the loop moves the
        state by more than half its norm per loop (far from settling) and doubled."""
        split = self._split("rel_residual")
        if split is None:
            return None
        ref, rec, _ = split
        if rec >= 0.5 and ref > 0 and rec / ref >= 2:
            return Precursor("rel_residual", 0.5, f"relative residual {rec:.2f} (×{rec / ref:.2g} its reference)")
        return None

    def _logz_precursor(self) -> Precursor | None:
        split = self._split("logz")
        if split is None:
            return None
        ref, rec, _ = split
        if rec - ref >= 5:
            return Precursor("logz", 0.5, f"output log Z drifted +{rec - ref:.1f} nats")
        return None

    def precursors(self) -> list[Precursor]:
        found = [
            self._radius_precursor(),
            self._growth_precursor("state_norm", *self.state_growth, "state norm ‖h_T‖"),
            self._jacobian_precursor(),
            self._residual_precursor(),
            self._spike_precursor("grad_norm", "gradient norm"),
            self._spike_precursor("update_ratio", "update/parameter ratio"),
            self._growth_precursor("attn_logit_max", 1.5, 3.0, "max attention logit", recent=1),
            self._logz_precursor(),
        ]
        return [p for p in found if p is not None]

    def evaluate(self, step: int) -> Alert | None:
        found = self.precursors()
        score = sum(p.score for p in found)
        self.last_score, self.last_precursors = score, found
        if not self._armed:
            self._quiet = self._quiet + 1 if score < self.threshold / 2 else 0
            if self._quiet >= self.rearm:
                self._armed, self._quiet = True, 0
            return None
        # Relative precursors need a reference, hence the warm-up; ρ(Ā) > 1 is absolute and may
        # fire at once (an injection can go unstable in the first steps at a high learning rate).
        absolute = any(p.signal == "injection_radius" and p.score >= 1 for p in found)
        warming = self._first_step is None or step - self._first_step < self.warmup
        if score < self.threshold or (warming and not absolute):
            return None
        self._armed, self._quiet = False, 0
        leads = [p.lead for p in found if p.lead is not None]
        lead = min(leads) if leads else None
        top = max(found, key=lambda p: p.score)
        when = ("imminent" if lead == 0 else f"in ~{lead:.0f} steps") if lead is not None else "lead time unknown"
        message = f"instability ahead ({when}): " + "; ".join(p.text for p in found)
        return Alert(step, "early_warning", self.severity, top.signal, score, self.threshold, message, lead_time=lead)

    def state_dict(self) -> dict:
        return {"series": {k: [list(p) for p in v] for k, v in self._series.items()}, "armed": self._armed,
                "quiet": self._quiet, "first_step": self._first_step}

    def load_state_dict(self, state: dict) -> None:
        n = self.reference + self.recent + 10
        self._series = {k: deque((tuple(p) for p in v), maxlen=n) for k, v in state["series"].items()}
        self._armed, self._quiet, self._first_step = bool(state["armed"]), int(state["quiet"]), state["first_step"]
