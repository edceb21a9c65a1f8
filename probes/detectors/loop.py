"""The loop itself will explode at more loops, whatever the loss does (`LoopInstabilityDetector`):
ρ(Ā) > 1, or geometric state growth with depth, persistently."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from loopdyn.probes.alerts import Alert
from loopdyn.probes.detectors.base import Detector, Escalation, Precursor, escalated_message

SIGNALS = ("injection_radius", "state_growth", "jacobian_norm")


@dataclass
class LoopInstabilityDetector(Detector):
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

    update(step, signal, value) takes injection_radius, state_growth and jacobian_norm;
    compute(step) returns an alert at the first report and at each escalation: after the first
    report it escalates while the evidence worsens (`escalation`: ×1.5, at most every 10 steps),
    so a loop whose ρ climbs from 1.3 to 5 is reported again at 1.95, 2.9, 4.4.
    """

    radius_tol: float = 1e-3
    growth: float = 1.5
    persist: int = 5
    severity: str = "warning"
    escalation: Escalation = field(default_factory=Escalation)

    def __post_init__(self) -> None:
        if not self.growth > 1 or self.persist < 1 or self.radius_tol < 0:
            raise ValueError("LoopInstabilityDetector: growth must be > 1, persist ≥ 1, radius_tol ≥ 0")
        self._latest: dict[str, tuple[int, float]] = {}
        self._growth_run = 0
        self.since: int | None = None  # first step of the current episode
        self.first_step: int | None = None  # first report of the run

    def update(self, step: int, signal: str, value: float) -> None:
        if signal in SIGNALS and math.isfinite(value):
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

    def compute(self, step: int) -> Alert | None:
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
        message = escalated_message(escalation, "; ".join(p.text for p in found)
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
