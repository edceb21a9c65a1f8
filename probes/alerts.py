"""Alerts: what the monitor found, in two families, and the actions it took.

An `Alert` is one finding of a detector, or one action the monitor took. Kinds:

    family             kind               meaning
    loop instability   loop_instability   the loop will explode at more loops (ρ(Ā) > 1, the state
                                          growing geometrically with depth, Jacobian σ_max > 1 with
                                          growth) — even while the loss is fine
    spike              spike_warning      a loss spike is coming (fused precursors: a learning-rate
                                          jump seen before the step, ρ(Ā) climbing, state or
                                          attention-logit growth, confirmed gradient spikes, …)
                       spike              it is here: the loss is far above its recent level
                       nonfinite          it is here: NaN or ±Inf in a signal
    —                  action             what the monitor did (skip, rollback, cut the LR, stop)
    —                  probe_error        a probe failed and was disabled (training continues)

Fields: `value` is the signal's own value (ρ(Ā) = 1.31, the loss, the learning-rate ratio),
`score` the detector's statistic (a robust z, a fused precursor score, a growth factor) and
`threshold` the level `score` crossed. The JSON Lines record holds ALERT_FIELDS in that order,
then `lead_time`, `detected_step`, `data_position` and `escalation` when known.

Sinks (console, JSON Lines, TensorBoard, Python logging, framework loggers) are in
loopdyn.probes.sinks; they are re-exported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loopdyn.dynamics.numbers import num as _num

# Ordered: a larger index is more severe (the distributed reduction takes the MAX).
SEVERITIES = ("info", "warning", "critical")
KINDS = ("loop_instability", "spike_warning", "spike", "nonfinite", "action", "probe_error")
FAMILIES = {"loop_instability": "loop_instability", "spike_warning": "spike", "spike": "spike",
            "nonfinite": "spike"}
ALERT_FIELDS = ("step", "kind", "severity", "signal", "value", "threshold", "score", "message")
_OPTIONAL = ("lead_time", "detected_step", "data_position", "escalation")


class InstabilityError(RuntimeError):
    """Raised by the monitor when an alert's action is "raise" (the run stops with a traceback)."""

    def __init__(self, alert: "Alert"):
        super().__init__(alert.line())
        self.alert = alert


@dataclass
class Alert:
    """One detector finding (see the module docstring for kinds and field meanings).

    step: the optimiser step the evidence belongs to (1-based, as in `loopdyn train --log`);
    for a warning taken before the update (a learning-rate jump), the step about to be taken.
    lead_time: warnings only, the estimated steps until the instability breaks out (0 =
    imminent; None = no estimate). detected_step: the step at which the monitor saw the
    evidence (≥ step on CUDA, where the host reads device values every few steps).
    data_position: where the step's batch came from (`record_batch()`, else the count of
    training forward passes before it), so the batch can be replayed. escalation: 0 for a
    first report, k for the k-th "still worsening" report of the same episode.
    """

    step: int
    kind: str
    severity: str
    signal: str
    value: float
    threshold: float
    message: str
    score: float | None = None
    lead_time: float | None = None
    detected_step: int | None = None
    data_position: Any = None
    escalation: int = 0

    @property
    def level(self) -> int:
        return SEVERITIES.index(self.severity)

    @property
    def family(self) -> str | None:
        """"loop_instability", "spike" or None (actions, probe errors)."""
        return FAMILIES.get(self.kind)

    def record(self) -> dict[str, Any]:
        """The contract fields, JSON-ready (non-finite numbers become null), then the optional
        ones that are known."""
        rec = {name: getattr(self, name) for name in ALERT_FIELDS}
        for key in ("value", "threshold", "score"):
            rec[key] = _num(rec[key])
        rec["step"] = int(rec["step"])
        for key in _OPTIONAL:
            v = getattr(self, key)
            if v is not None and not (key == "escalation" and v == 0):
                rec[key] = _num(v) if key == "lead_time" else v
        return rec

    def line(self) -> str:
        """One human-readable line."""
        return f"step {self.step}: {self.severity.upper()} {self.kind} on {self.signal}: {self.message}"

    def to_state(self) -> dict[str, Any]:
        return {"step": int(self.step), "kind": self.kind, "severity": self.severity, "signal": self.signal,
                "value": _num(self.value), "threshold": _num(self.threshold), "message": self.message,
                "score": _num(self.score), "lead_time": _num(self.lead_time),
                "detected_step": None if self.detected_step is None else int(self.detected_step),
                "data_position": self.data_position, "escalation": int(self.escalation)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Alert":
        a = cls(**{k: d.get(k) for k in ("step", "kind", "severity", "signal", "value", "threshold", "message",
                                         "score", "lead_time", "detected_step", "data_position")})
        a.escalation = int(d.get("escalation") or 0)
        for key in ("value", "threshold"):
            if getattr(a, key) is None:
                setattr(a, key, math.nan)
        return a


from loopdyn.probes.sinks import (ConsoleSink, JsonlSink, ListSink, LoggingSink, Sink,  # noqa: E402
                                  TensorBoardSink)

__all__ = ["Alert", "ALERT_FIELDS", "KINDS", "FAMILIES", "SEVERITIES", "InstabilityError", "Sink", "ConsoleSink",
           "JsonlSink", "ListSink", "LoggingSink", "TensorBoardSink"]
