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
- `EarlyWarningDetector`: fuses the precursors of a loss spike (a learning-rate jump seen before
  the step, ρ(Ā) climbing, state / attention-logit / Jacobian growth, gradient-norm spikes
  that something else confirms) into one `spike_warning` with a lead time.
- `LoopInstabilityDetector`: the loop itself will explode at more loops (ρ(Ā) > 1, geometric
  state growth with depth, Jacobian σ_max > 1 with growth): `loop_instability`.
- `Escalation`: after a first report, report again (rate-limited, severity critical) each time
  the evidence has worsened by a factor, so the monitor is never silent while things get worse.
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
    return _median(slopes), tau


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
            alert = Alert(step, self.kind, self.severity, self.signal, float(value), float(self.threshold),
                          f"{self.signal} = {value:.4g} is {score:.1f}{unit} above its recent level "
                          f"{level:.4g} ({self.method}, threshold {self.threshold:g}{unit})", score=float(score))
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
        return Alert(step, "nonfinite", self.severity, self.signal, value, math.nan,
                     f"{self.signal} is {value} (not finite)", score=math.nan)

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
    kind: str = "spike_warning"

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
            return Alert(step, self.kind, self.severity, self.signal, math.exp(self._points[-1][1]), self.min_growth,
                         f"{self.signal} keeps growing: ×{growth:.3g} over the last {len(self._points)} "
                         f"observations (τ = {tau:.2f}, doubling every {doubling:.0f} steps)", score=growth)
        return None

    def state_dict(self) -> dict:
        return {"points": [list(p) for p in self._points], "seen": self._seen, "active": self._active}

    def load_state_dict(self, state: dict) -> None:
        self._points = deque((tuple(p) for p in state["points"]), maxlen=self.window)
        self._seen, self._active = int(state["seen"]), bool(state["active"])


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
    """Report once, then again while the evidence keeps worsening (see the module docstring).

    update(step, active, magnitudes) → None (stay quiet), 0 (first report) or k ≥ 1 (the k-th
    escalation). An escalation needs `every` steps since the last report and some evidence
    (by signal) at ≥ `factor` × its magnitude at that report, or a signal that was not there.
    The episode ends after `rearm` evaluations without the condition.
    """

    factor: float = 1.5
    every: int = 10
    rearm: int = 10

    def __post_init__(self) -> None:
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


def _escalated_message(escalation: int, text: str) -> str:
    return text if escalation == 0 else f"still worsening (report {escalation + 1}): {text}"


@dataclass
class OptimizerWatch:
    """Learning-rate and optimiser-setting changes, read in the optimiser's step pre-hook, i.e.
    BEFORE the update they will drive (host values of param_groups: no device sync).

    jump    lr ≥ `jump` × the previous step's lr in any group (after 3 steps; a linear warm-up
            rises by (k+1)/k ≤ 2 per step): strong on its own.
    climb   after the lr has not risen for `settle` steps (warm-up over), it rises to
            ≥ 1.5× (moderate) / ≥ 3× (strong) that plateau: a ramp.
    setting any other hyper-parameter of a group changes (betas, eps, weight decay, …), or the
            optimiser state is reset (fewer parameters with state): moderate.
    A precursor counts for the step it was seen on and `hold` steps after.
    """

    jump: float = 3.0
    settle: int = 10
    hold: int = 5

    def __post_init__(self) -> None:
        self._groups: list[dict] = []
        self._n_state = 0
        self._found: list[tuple[int, Precursor]] = []

    def observe(self, step: int, groups: list[dict], n_state: int) -> list[Precursor]:
        """groups: per param group a dict with "lr" and the other scalar settings."""
        new: list[Precursor] = []
        if len(groups) != len(self._groups):
            self._groups = [{"prev": None, "peak": 0.0, "since": 0, "base": None, "seen": 0, "settings": None}
                            for _ in groups]
        for gi, (g, st) in enumerate(zip(groups, self._groups)):
            lr = g.get("lr")
            if isinstance(lr, (int, float)) and math.isfinite(lr):
                prev = st["prev"]
                if prev and st["seen"] >= 2 and lr >= self.jump * prev:
                    new.append(Precursor("lr", 1.0, f"learning rate of group {gi} jumped ×{lr / prev:.3g} "
                                         f"({prev:.3g} → {lr:.3g}) at this step", lead=0.0, value=lr,
                                         magnitude=lr / prev, absolute=True))
                if lr > st["peak"] * (1 + 1e-9):
                    if st["base"] is None and st["since"] >= self.settle:
                        st["base"] = st["peak"]
                    st["peak"], st["since"] = lr, 0
                else:
                    st["since"] += 1
                    if st["since"] >= self.settle:
                        st["base"] = None
                if st["base"]:
                    ratio = lr / st["base"]
                    if ratio >= 1.5:
                        new.append(Precursor("lr", 1.0 if ratio >= 3 else 0.5,
                                             f"learning rate of group {gi} climbing: ×{ratio:.3g} its plateau "
                                             f"{st['base']:.3g}", value=lr, magnitude=ratio, absolute=True))
                st["prev"], st["seen"] = lr, st["seen"] + 1
            settings = {k: v for k, v in g.items() if k != "lr"}
            if st["settings"] is not None:
                changed = [k for k, v in settings.items() if st["settings"].get(k) != v]
                if changed:
                    what = ", ".join(f"{k} {st['settings'].get(k)!r} → {settings[k]!r}" for k in changed)
                    new.append(Precursor("optimizer", 0.5, f"optimiser setting changed in group {gi}: {what}",
                                         value=math.nan, magnitude=1.0, absolute=True))
            st["settings"] = settings
        if n_state < self._n_state:
            new.append(Precursor("optimizer", 0.5, f"optimiser state reset ({self._n_state} → {n_state} "
                                 "parameters with state)", value=float(n_state), magnitude=1.0,
                                 absolute=True))
        self._n_state = n_state
        self._found = [(s, p) for s, p in self._found if step - s <= self.hold] + [(step, p) for p in new]
        return new

    def precursors(self, step: int) -> list[Precursor]:
        """Those seen within the last `hold` steps; the strongest per signal."""
        best: dict[str, Precursor] = {}
        for s, p in self._found:
            if step - s <= self.hold and (p.signal not in best or p.score > best[p.signal].score):
                best[p.signal] = p
        return list(best.values())

    def state_dict(self) -> dict:
        return {"groups": [dict(g) for g in self._groups], "n_state": self._n_state}

    def load_state_dict(self, state: dict) -> None:
        self._groups = [dict(g) for g in state["groups"]]
        self._n_state = int(state["n_state"])


@dataclass
class EarlyWarningDetector:
    """Fuses the precursors of a loss spike into one `spike_warning` with a lead time.

    Each precursor scores 0 (quiet), 0.5 (moderate) or 1 (strong); the warning fires when the
    sum reaches `threshold` (1: one strong precursor or two moderate ones), so a single
    gradient-norm spike on a hard batch never warns alone — another precursor (or the loss
    itself, as a `spike`) must confirm it. Levels are relative to each signal's own reference:
    the median of the `reference` observations before the latest `recent` ones.

    precursor                 moderate (0.5)                   strong (1.0)
    learning rate (pre-step)  climbs ≥ 1.5× a settled plateau  jumps ≥ 3× in one step, or ≥ 3×
                                                               the plateau (OptimizerWatch)
    optimiser settings        a setting changes / state reset  —
    ρ(Ā) (injection_radius)   > 1, or ≥ 0.9 and climbing       —  (ρ > 1 alone is the
                              steadily (Kendall τ ≥ 0.8),          loop_instability family)
                              projected to reach 1 within
                              `horizon` steps
    state norm ‖h_T‖          recent/reference ≥ 2.5           ≥ 5, or growing ≥ ×1.5 per
                                                               step over each of the last
                                                               3 observations (absolute)
    loop Jacobian σ_max       > 1 and ≥ 1.5× reference         > 1 and ≥ 3× reference
    relative residual         ≥ 0.5 and ≥ 2× reference         —
    grad norm, update ratio   a fresh spike (robust z ≥ 6)     —
                              within the last `spike_hold` steps:
                              one event however many spike; it
                              does not confirm ρ(Ā)'s drift
    update ratio ‖Δθ‖/‖θ‖     ≥ 0.05 (absolute)                ≥ 0.1 (absolute)
    attention max logit       ≥ 1.5× reference                 ≥ 3× reference
    output log Z              ≥ reference + 5 nats             —
    loss                      recent median ≥ reference        —
                              + `loss_rise` nats

    Relative precursors wait `warmup` steps; the absolute ones (learning rate, optimiser
    settings, ρ(Ā), the update ratio's level, the state norm's per-step growth rate) count from
    the first step — a run with too short a warm-up breaks before any reference exists. The
    update ratio's levels: one step that moves the weights by 5 % of their norm (10 %) is far
    above what a healthy run does after warm-up (≈ 1 % on the tiny preset at lr 1e-2; ~1e-3 is
    the usual rule of thumb for large models); Adam's first steps without warm-up move every
    weight by ≈ lr, i.e. by lr / rms(θ) of its scale.
    After the first report the detector escalates (`Escalation`) instead of going silent.

    Lead time: for precursors with a measurable trend, the steps until they reach their
    critical level (ρ = 1; ‖h_T‖ = `critical_growth` × reference at the current log-growth
    rate); 0 when a strong precursor is already past it; the alert reports the smallest.
    """

    threshold: float = 1.0
    warmup: int = 30
    reference: int = 20
    recent: int = 3
    horizon: float = 30.0
    radius_watch: float = 0.9
    critical_growth: float = 10.0
    watch_radius: bool = True
    spike_hold: int = 5
    state_growth: tuple = (2.5, 5.0)
    state_rate: float = 1.5  # per-step growth of ‖h_T‖ that, kept over `state_rate_steps` observations, is strong
    state_rate_steps: int = 3
    update_levels: tuple = (0.05, 0.1)  # update ratio: moderate, strong (absolute)
    loss_rise: float | None = None
    severity: str = "warning"
    escalation: Escalation = field(default_factory=Escalation)
    optimizer: OptimizerWatch = field(default_factory=OptimizerWatch)
    _series: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._first_step: int | None = None
        self.last_score = 0.0
        self.last_precursors: list[Precursor] = []
        self._last_z: dict[str, float] = {}
        self._fresh: dict[str, tuple] = {}  # signal → (step, z, value) of its latest fresh spike

    SPIKY = ("grad_norm", "update_ratio")  # signals whose fresh spikes are precursors

    def observe(self, step: int, signal: str, value: float) -> None:
        if self._first_step is None:
            self._first_step = step
        buf = self._series.get(signal)
        if buf is None:
            buf = self._series[signal] = deque(maxlen=self.reference + self.recent + 10)
        if math.isfinite(value):
            buf.append((step, value))
            if signal in self.SPIKY and len(buf) >= self.reference // 2 + 2:
                # z of the new value against the ones before it, computed once per value
                z = self._spike_z(list(buf), len(buf) - 1)
                prev_z = self._last_z.get(signal, 0.0)
                self._last_z[signal] = z
                if z >= 6 and prev_z < 6:  # a fresh spike, not a lasting level shift
                    self._fresh[signal] = (step, z, value)

    # helpers over one signal's buffer
    def _split(self, signal: str, recent: int | None = None):
        buf = self._series.get(signal)
        recent = self.recent if recent is None else recent
        if buf is None or len(buf) < recent + 5:
            return None
        pts = list(buf)
        ref = np.array([v for _, v in pts[-(recent + self.reference):-recent]])
        rec = np.array([v for _, v in pts[-recent:]])
        return _median(ref), _median(rec), pts

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
            return Precursor(signal, 1.0, f"{label} ×{ratio:.2g} its reference", lead=0.0, value=pts[-1][1],
                             magnitude=ratio)
        if ratio >= moderate:
            return Precursor(signal, 0.5, f"{label} ×{ratio:.2g} its reference", lead=self._growth_lead(pts, ref),
                             value=pts[-1][1], magnitude=ratio)
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

    def _state_rate_precursor(self) -> Precursor | None:
        """‖h_T‖ growing by ≥ `state_rate` per step (geometric, over gaps between observations)
        across each of the last `state_rate_steps` observations: an explosion under way, whatever
        the reference (a healthy run's state grows ≤ ×1.2 per step even at its start)."""
        buf = self._series.get("state_norm")
        k = self.state_rate_steps
        if not buf or len(buf) < k + 1:
            return None
        pts = list(buf)[-(k + 1):]
        rates = []
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if v0 <= 0 or s1 <= s0:
                return None
            rates.append((v1 / v0) ** (1.0 / (s1 - s0)))
        if min(rates) < self.state_rate:
            return None
        rate = math.exp(sum(math.log(r) for r in rates) / k)
        return Precursor("state_norm", 1.0, f"state norm ‖h_T‖ = {pts[-1][1]:.3g} growing ×{rate:.2g} per step "
                         f"for {k} observations", lead=0.0, value=pts[-1][1], magnitude=pts[-1][1] / pts[0][1],
                         absolute=True)

    def _update_level_precursor(self, step: int | None = None) -> Precursor | None:
        """The update ratio's own level: ≥ update_levels[0] moderate, ≥ update_levels[1] strong;
        a value counts for `spike_hold` steps (the ratio is measured every `update_every` steps)."""
        buf = self._series.get("update_ratio")
        if not buf or (step is not None and step - buf[-1][0] >= self.spike_hold):
            return None
        value = buf[-1][1]
        moderate, strong = self.update_levels
        if value < moderate:
            return None
        return Precursor("update_ratio", 1.0 if value >= strong else 0.5,
                         f"one update moves the weights by {100 * value:.3g} % of their norm", value=value,
                         magnitude=value / moderate, absolute=True)

    def _radius_precursor(self) -> Precursor | None:
        buf = self._series.get("injection_radius")
        if not self.watch_radius or not buf:
            return None
        step, rho = buf[-1]
        if rho > 1 + 1e-3:
            return Precursor("injection_radius", 0.5, f"ρ(Ā) = {rho:.3f} > 1 (the loop's linear part is unstable)",
                             lead=0.0, value=rho, magnitude=rho, absolute=True)
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
                         f"~{t_cross:.0f} steps", lead=t_cross, value=rho, magnitude=rho,
                         absolute=True)

    def _jacobian_precursor(self) -> Precursor | None:
        buf = self._series.get("jacobian_norm")
        if not buf or len(buf) < 3:
            return None
        last = buf[-1][1]
        ref = _median(np.array([v for _, v in list(buf)[:-1][-self.reference:]]))
        if last <= 1 or ref <= 0:
            return None
        ratio = last / ref
        if ratio >= 1.5:
            return Precursor("jacobian_norm", 1.0 if ratio >= 3 else 0.5,
                             f"loop Jacobian σ_max = {last:.3g} (×{ratio:.2g})", lead=0.0 if ratio >= 3 else None,
                             value=last, magnitude=ratio)
        return None

    def _spike_z(self, pts, i: int) -> float:
        """Robust z of pts[i] against the `reference` values before it."""
        ref = np.array([v for _, v in pts[max(0, i - self.reference):i]])
        med = _median(ref)  # partitions ref in place: its values, hence the MAD below, are unchanged
        scale = max(MAD_TO_SIGMA * _median(np.abs(ref - med)), 1e-3 * abs(med), 1e-12)
        return (pts[i][1] - med) / scale

    def _spike_precursor(self, signal: str, label: str) -> Precursor | None:
        """A fresh spike (robust z ≥ 6 after a value that was not one) counts for `spike_hold`
        steps; a lasting level shift (a learning-rate change) is not a spike."""
        fresh, buf = self._fresh.get(signal), self._series.get(signal)
        if fresh is None or not buf:
            return None
        step, z, value = fresh
        if buf[-1][0] - step >= self.spike_hold:
            return None
        return Precursor(signal, 0.5, f"{label} spike ({z:.0f}σ at step {step})", value=value, magnitude=z,
                         transient=True)

    def _residual_precursor(self) -> Precursor | None:
        """The relative residual is noisy batch to batch; it counts only when the loop moves the
        state by more than half its norm per loop (far from settling) and doubled."""
        split = self._split("rel_residual")
        if split is None:
            return None
        ref, rec, pts = split
        if rec >= 0.5 and ref > 0 and rec / ref >= 2:
            return Precursor("rel_residual", 0.5, f"relative residual {rec:.2f} (×{rec / ref:.2g} its reference)",
                             value=pts[-1][1], magnitude=rec / ref)
        return None

    def _logz_precursor(self) -> Precursor | None:
        split = self._split("logz")
        if split is None:
            return None
        ref, rec, pts = split
        if rec - ref >= 5:
            return Precursor("logz", 0.5, f"output log Z drifted +{rec - ref:.1f} nats", value=pts[-1][1],
                             magnitude=math.exp((rec - ref) / 5))
        return None

    def _loss_precursor(self) -> Precursor | None:
        if self.loss_rise is None:
            return None
        split = self._split("loss")
        if split is None:
            return None
        ref, rec, pts = split
        if rec - ref >= self.loss_rise:
            return Precursor("loss", 0.5, f"loss rising: recent median {rec:.3f} is +{rec - ref:.2f} nats above "
                             f"its reference {ref:.3f}", value=pts[-1][1], magnitude=math.exp(rec - ref))
        return None

    def precursors(self, step: int | None = None) -> list[Precursor]:
        found = [
            self._radius_precursor(),
            self._growth_precursor("state_norm", *self.state_growth, "state norm ‖h_T‖"),
            self._jacobian_precursor(),
            self._residual_precursor(),
            self._spike_precursor("grad_norm", "gradient norm"),
            self._spike_precursor("update_ratio", "update/parameter ratio"),
            self._update_level_precursor(step),
            self._state_rate_precursor(),
            self._growth_precursor("attn_logit_max", 1.5, 3.0, "max attention logit", recent=1),
            self._logz_precursor(),
            self._loss_precursor(),
        ]
        best: dict[str, Precursor] = {}  # one piece of evidence per signal: the strongest
        for p in found:
            if p is not None and (p.signal not in best or (p.score, not p.transient)
                                  > (best[p.signal].score, not best[p.signal].transient)):
                best[p.signal] = p
        found = list(best.values())
        # A hard batch spikes the gradient norm and, through it, the update: one event, one
        # piece of evidence. It confirms evidence about the step (state, Jacobian, attention,
        # log Z, loss), not ρ(Ā)'s slow drift towards 1, which a hard batch says nothing about
        # (that drift is the loop_instability family's finding).
        transient = [p for p in found if p.transient]
        if transient:
            steady = [p for p in found if not p.transient]
            keep = [] if steady and all(p.signal == "injection_radius" for p in steady) else [
                max(transient, key=lambda p: p.magnitude)]
            found = steady + keep
        if step is not None:
            found += self.optimizer.precursors(step)
        return found

    def evaluate(self, step: int, pre_step: bool = False) -> Alert | None:
        """The fused score at `step` (pre_step: evaluated in the optimiser's pre-hook, before the
        update of `step`); an alert at the first report and at each escalation."""
        found = self.precursors(step)
        # Relative precursors need a reference, hence the warm-up; the learning-rate ones and
        # ρ(Ā) are absolute and may fire at once.
        warming = self._first_step is None or step - self._first_step < self.warmup
        if warming:
            found = [p for p in found if p.absolute]
        score = sum(p.score for p in found)
        self.last_score, self.last_precursors = score, found
        fire = score >= self.threshold
        escalation = self.escalation.update(step, fire, {p.signal: p.magnitude for p in found})
        if escalation is None:
            return None
        leads = [p.lead for p in found if p.lead is not None]
        lead = min(leads) if leads else None
        top = max(found, key=lambda p: (p.score, p.signal == "lr"))
        when = ("imminent" if lead == 0 else f"in ~{lead:.0f} steps") if lead is not None else "lead time unknown"
        before = " (seen before the update)" if pre_step else ""
        message = _escalated_message(escalation, f"loss spike ahead ({when}){before}: "
                                     + "; ".join(p.text for p in found))
        return Alert(step, "spike_warning", "critical" if escalation else self.severity, top.signal, top.value,
                     self.threshold, message, score=score, lead_time=lead, escalation=escalation)

    def state_dict(self) -> dict:
        return {"series": {k: [list(p) for p in v] for k, v in self._series.items()}, "first_step": self._first_step,
                "escalation": self.escalation.state_dict(), "optimizer": self.optimizer.state_dict(),
                "last_z": dict(self._last_z), "fresh": {k: list(v) for k, v in self._fresh.items()}}

    def load_state_dict(self, state: dict) -> None:
        n = self.reference + self.recent + 10
        self._series = {k: deque((tuple(p) for p in v), maxlen=n) for k, v in state["series"].items()}
        self._first_step = state["first_step"]
        self._last_z = dict(state.get("last_z", {}))
        self._fresh = {k: tuple(v) for k, v in state.get("fresh", {}).items()}
        self.escalation.load_state_dict(state["escalation"])
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class LoopInstabilityDetector:
    """The loop will explode at more loops, whatever the loss does: `loop_instability`.

    evidence (any one)                                          value / score / threshold
    ρ(Ā) > 1 + `radius_tol` (the LTI part is unstable)          ρ / ρ / 1
    the state grows with depth: ‖h_T‖/‖h_{T−1}‖ ≥ `growth`      ratio / ratio / growth
      in `persist` (5) consecutive observations (a loop converging
      from a small h_0 still grows ×1.1–1.2 per loop at the
      trained depth of the tiny preset; ×1.5 is explosive); the
      loop Jacobian's σ_max is quoted when it exceeds 1 (σ_max > 1
      alone is common in stable loops: the bench's stable linear
      runs have it with no explosion, so it is not evidence alone)

    After the first report it escalates while the evidence worsens (×1.5, at most every 10
    steps), so a loop whose ρ climbs from 1.3 to 5 is reported again at 1.95, 2.9, 4.4.
    """

    radius_tol: float = 1e-3
    growth: float = 1.5
    persist: int = 5
    severity: str = "warning"
    escalation: Escalation = field(default_factory=Escalation)

    def __post_init__(self) -> None:
        self._latest: dict[str, tuple[int, float]] = {}
        self._growth_run = 0
        self.since: int | None = None  # first step of the current episode
        self.first_step: int | None = None  # first report of the run

    def observe(self, step: int, signal: str, value: float) -> None:
        if signal in ("injection_radius", "state_growth", "jacobian_norm") and math.isfinite(value):
            self._latest[signal] = (step, value)
            if signal == "state_growth":
                self._growth_run = self._growth_run + 1 if value >= self.growth else 0

    def evidence(self) -> list[Precursor]:
        out = []
        rho = self._latest.get("injection_radius")
        if rho and rho[1] > 1 + self.radius_tol:
            out.append(Precursor("injection_radius", 1.0, f"ρ(Ā) = {rho[1]:.3f} > 1: the loop's linear part "
                                 "amplifies the state every loop", value=rho[1], magnitude=rho[1]))
        g = self._latest.get("state_growth")
        if g and self._growth_run >= self.persist:
            j = self._latest.get("jacobian_norm")
            jac = f"; loop Jacobian σ_max = {j[1]:.3g} > 1" if j and j[1] > 1 else ""
            out.append(Precursor("state_growth", 1.0, f"the state grows ×{g[1]:.3g} per loop at the trained depth "
                                 f"({self._growth_run} observations in a row){jac}", value=g[1], magnitude=g[1]))
        return out

    def evaluate(self, step: int) -> Alert | None:
        found = self.evidence()
        escalation = self.escalation.update(step, bool(found), {p.signal: p.magnitude for p in found})
        if not found and not self.escalation.active:
            self.since = None
        if escalation is None:
            return None
        if escalation == 0:
            self.since = step
            self.first_step = self.first_step or step
        top = found[0]
        message = _escalated_message(escalation, "; ".join(p.text for p in found)
                                     + " — the loop will explode at more loops, even if the loss looks fine")
        threshold = self.growth if top.signal == "state_growth" else 1.0
        return Alert(step, "loop_instability", "critical" if escalation else self.severity, top.signal, top.value,
                     threshold, message, score=top.value, escalation=escalation)

    def state_dict(self) -> dict:
        return {"latest": {k: list(v) for k, v in self._latest.items()}, "growth_run": self._growth_run,
                "since": self.since, "first_step": self.first_step, "escalation": self.escalation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._latest = {k: tuple(v) for k, v in state["latest"].items()}
        self._growth_run, self.since, self.first_step = int(state["growth_run"]), state["since"], state["first_step"]
        self.escalation.load_state_dict(state["escalation"])
