"""The early warning of a loss spike (`EarlyWarningDetector`): a learning-rate jump seen before
the step, ρ(Ā) climbing, state / attention-logit / Jacobian growth, gradient-norm spikes that
something else confirms — fused into one `spike_warning` with a lead time."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loopdyn.probes.alerts import Alert
from loopdyn.probes.detectors.base import (MAD_TO_SIGMA, Detector, Escalation, Precursor, escalated_message, median,
                                           theil_sen)
from loopdyn.probes.detectors.optimizer import SIGNAL as PARAM_GROUPS
from loopdyn.probes.detectors.optimizer import OptimizerWatch


@dataclass
class EarlyWarningDetector(Detector):
    """Fuses the precursors of a loss spike into one `spike_warning` with a lead time.

    update(step, signal, value) takes every signal (and "param_groups", handed to `optimizer`);
    compute(step, pre_step=False) scores the precursors at `step` (pre_step: in the optimiser's
    pre-hook, before the update of `step`) and returns an alert at the first report and at each
    escalation.

    Each precursor scores 0 (quiet), 0.5 (moderate) or 1 (strong); the warning fires when the
    sum reaches `threshold` (1: one strong precursor or two moderate ones), so a single
    gradient-norm spike on a hard batch never warns alone — another precursor (or the loss
    itself, as a `spike`) must confirm it. Levels are relative to each signal's own reference:
    the median of the `reference` observations before the latest `recent` ones.

    precursor                 moderate (0.5)                   strong (1.0)
    learning rate (pre-step)  climbs ≥ 1.5× a settled plateau  jumps ≥ 3× in one step, or ≥ 3×
                                                               the plateau (`optimizer`)
    optimiser settings        a setting changes / state reset  —
    ρ(Ā) (injection_radius)   > 1, or ≥ `radius_watch` and     —  (ρ > 1 alone is the
                              climbing steadily (Kendall τ ≥       loop_instability family)
                              `radius_tau`), projected to reach
                              1 within `horizon` steps
    state norm ‖h_T‖          recent/reference ≥ state_growth[0]  ≥ state_growth[1], or growing
                                                               ≥ ×`state_rate` per step over each
                                                               of the last `state_rate_steps`
                                                               observations (absolute)
    loop Jacobian σ_max       > 1 and ≥ jacobian_growth[0]×    > 1 and ≥ jacobian_growth[1]×
                              reference                        reference
    relative residual         ≥ residual_levels[0] and ≥       —
                              residual_levels[1]× reference
    grad norm, update ratio   a fresh spike (robust z ≥        —
                              `spike_z`) within the last
                              `spike_hold` steps: one event
                              however many spike; it does not
                              confirm ρ(Ā)'s drift
    update ratio ‖Δθ‖/‖θ‖     ≥ update_levels[0] (absolute)    ≥ update_levels[1] (absolute)
    attention max logit       ≥ attention_growth[0]× reference ≥ attention_growth[1]× reference
    output log Z              ≥ reference + `logz_rise` nats   —
    loss                      recent median ≥ reference        —
                              + `loss_rise` nats (None: off)

    Relative precursors wait `warmup` steps; the absolute ones (learning rate, optimiser
    settings, ρ(Ā), the update ratio's level, the state norm's per-step growth rate) count from
    the first step — a run with too short a warm-up breaks before any reference exists. The
    update ratio's levels: one step that moves the weights by 5 % of their norm (10 %) is far
    above what a healthy run does after warm-up (≈ 1 % on the tiny preset at lr 1e-2; ~1e-3 is
    the usual rule of thumb for large models); Adam's first steps without warm-up move every
    weight by ≈ lr, i.e. by lr / rms(θ) of its scale.
    After the first report the detector escalates (`escalation`) instead of going silent.

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
    radius_tau: float = 0.8
    critical_growth: float = 10.0
    watch_radius: bool = True
    spike_z: float = 6.0
    spike_hold: int = 5
    state_growth: tuple = (2.5, 5.0)
    state_rate: float = 1.5
    state_rate_steps: int = 3
    update_levels: tuple = (0.05, 0.1)
    jacobian_growth: tuple = (1.5, 3.0)
    attention_growth: tuple = (1.5, 3.0)
    residual_levels: tuple = (0.5, 2.0)
    logz_rise: float = 5.0
    loss_rise: float | None = None
    severity: str = "warning"
    escalation: Escalation = field(default_factory=Escalation)
    optimizer: OptimizerWatch = field(default_factory=OptimizerWatch)

    SPIKY = ("grad_norm", "update_ratio")  # signals whose fresh spikes are precursors

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"EarlyWarningDetector: threshold must be > 0, got {self.threshold!r}")
        if self.warmup < 0 or self.reference < 1 or self.recent < 1:
            raise ValueError("EarlyWarningDetector: warmup must be ≥ 0, reference and recent ≥ 1")
        self._series: dict[str, deque] = {}
        self._first_step: int | None = None
        self.last_score = 0.0
        self.last_precursors: list[Precursor] = []
        self._last_z: dict[str, float] = {}
        self._fresh: dict[str, tuple] = {}  # signal → (step, z, value) of its latest fresh spike

    def update(self, step: int, signal: str, value) -> None:
        if signal == PARAM_GROUPS:
            self.optimizer.update(step, signal, value)
            return
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
                if z >= self.spike_z and prev_z < self.spike_z:  # a fresh spike, not a lasting level shift
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
        return median(ref), median(rec), pts

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
        if slope <= 0 or tau < self.radius_tau:  # ρ of a dense Ā wanders as eigenvalues trade places:
            return None                          # only a steady climb is projected
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
        ref = median(np.array([v for _, v in list(buf)[:-1][-self.reference:]]))
        if last <= 1 or ref <= 0:
            return None
        ratio = last / ref
        moderate, strong = self.jacobian_growth
        if ratio >= moderate:
            return Precursor("jacobian_norm", 1.0 if ratio >= strong else 0.5,
                             f"loop Jacobian σ_max = {last:.3g} (×{ratio:.2g})",
                             lead=0.0 if ratio >= strong else None, value=last, magnitude=ratio)
        return None

    def _spike_z(self, pts, i: int) -> float:
        """Robust z of pts[i] against the `reference` values before it."""
        ref = np.array([v for _, v in pts[max(0, i - self.reference):i]])
        med = median(ref)  # partitions ref in place: its values, hence the MAD below, are unchanged
        scale = max(MAD_TO_SIGMA * median(np.abs(ref - med)), 1e-3 * abs(med), 1e-12)
        return (pts[i][1] - med) / scale

    def _spike_precursor(self, signal: str, label: str) -> Precursor | None:
        """A fresh spike (robust z ≥ `spike_z` after a value that was not one) counts for
        `spike_hold` steps; a lasting level shift (a learning-rate change) is not a spike."""
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
        state by more than residual_levels[0] of its norm per loop (far from settling) and grew
        residual_levels[1]×."""
        split = self._split("rel_residual")
        if split is None:
            return None
        ref, rec, pts = split
        level, growth = self.residual_levels
        if rec >= level and ref > 0 and rec / ref >= growth:
            return Precursor("rel_residual", 0.5, f"relative residual {rec:.2f} (×{rec / ref:.2g} its reference)",
                             value=pts[-1][1], magnitude=rec / ref)
        return None

    def _logz_precursor(self) -> Precursor | None:
        split = self._split("logz")
        if split is None:
            return None
        ref, rec, pts = split
        if rec - ref >= self.logz_rise:
            return Precursor("logz", 0.5, f"output log Z drifted +{rec - ref:.1f} nats", value=pts[-1][1],
                             magnitude=math.exp((rec - ref) / self.logz_rise))
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
            self._growth_precursor("attn_logit_max", *self.attention_growth, "max attention logit", recent=1),
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
            found += self.optimizer.compute(step)
        return found

    def compute(self, step: int, pre_step: bool = False) -> Alert | None:
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
        message = escalated_message(escalation, f"loss spike ahead ({when}){before}: "
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
