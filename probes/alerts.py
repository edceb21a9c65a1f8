"""Alerts and where they go: the console, a JSON Lines file, TensorBoard.

An `Alert` is one finding of a detector (or one action the monitor took). The JSON Lines
sink writes exactly the contract fields of shared/DESIGN.md §7 — step, kind, severity,
signal, value, threshold, message — one alert per line, each line written with a single
unbuffered write() (models.fileio.JsonlWriter), so a killed run leaves only whole lines.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from loopdyn.models.fileio import JsonlWriter

# Ordered: a larger index is more severe (the distributed reduction takes the MAX).
SEVERITIES = ("info", "warning", "critical")
KINDS = ("spike", "nonfinite", "trend", "early_warning", "action", "probe_error")
ALERT_FIELDS = ("step", "kind", "severity", "signal", "value", "threshold", "message")


class InstabilityError(RuntimeError):
    """Raised by the monitor when an alert's action is "raise" (the run stops with a traceback)."""

    def __init__(self, alert: "Alert"):
        super().__init__(alert.line())
        self.alert = alert


@dataclass
class Alert:
    """One detector finding.

    step: the optimiser step the evidence belongs to (1-based, as in `loopdyn train --log`).
    kind: spike | nonfinite | trend | early_warning | action | probe_error.
    severity: info | warning | critical.  signal: the signal name (e.g. "loss", "grad_norm").
    value / threshold: the detector's statistic and the level it crossed (units depend on
    the detector: a robust z-score, a ratio, a growth factor, the fused early-warning score).
    lead_time: early warnings only, the estimated steps until the instability breaks out
    (0 = imminent; None = no estimate). detected_step: the step at which the monitor saw the
    evidence (≥ step; the host reads device values every few steps). Neither of the last two
    is written to the JSON Lines file, whose fields are fixed by the contract.
    """

    step: int
    kind: str
    severity: str
    signal: str
    value: float
    threshold: float
    message: str
    lead_time: float | None = None
    detected_step: int | None = None

    @property
    def level(self) -> int:
        return SEVERITIES.index(self.severity)

    def record(self) -> dict[str, Any]:
        """The contract fields, JSON-ready (non-finite numbers become null)."""
        rec = {name: getattr(self, name) for name in ALERT_FIELDS}
        for key in ("value", "threshold"):
            v = rec[key]
            rec[key] = float(v) if v is not None and math.isfinite(float(v)) else None
        rec["step"] = int(rec["step"])
        return rec

    def line(self) -> str:
        """One human-readable line."""
        return (f"step {self.step}: {self.severity.upper()} {self.kind} on {self.signal}: {self.message}")

    def to_state(self) -> dict[str, Any]:
        return {"step": int(self.step), "kind": self.kind, "severity": self.severity, "signal": self.signal,
                "value": float(self.value), "threshold": float(self.threshold), "message": self.message,
                "lead_time": None if self.lead_time is None else float(self.lead_time),
                "detected_step": None if self.detected_step is None else int(self.detected_step)}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Alert":
        return cls(**{k: d.get(k) for k in ("step", "kind", "severity", "signal", "value", "threshold",
                                              "message", "lead_time", "detected_step")})


# ---- sinks ---------------------------------------------------------------------------------

class Sink:
    """Receives alerts (and, at sync points, the latest signal values)."""

    def emit(self, alert: Alert) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def signals(self, step: int, values: dict[str, float]) -> None:
        """Latest values of every signal, called at each host sync point (optional)."""

    def close(self) -> None:
        pass


@dataclass
class ConsoleSink(Sink):
    """One line per alert, on stderr by default (`write` may be e.g. tqdm.write)."""

    stream: TextIO | None = None
    write: Callable[[str], None] | None = None
    prefix: str = "loopdyn probe"

    def emit(self, alert: Alert) -> None:
        text = f"{self.prefix}: {alert.line()}"
        if self.write is not None:
            self.write(text)
            return
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(text + "\n")
        stream.flush()


class JsonlSink(Sink):
    """One JSON object per alert (the contract fields), complete on disk when emit() returns."""

    def __init__(self, path, fresh: bool = True):
        self.path = path
        self._writer = JsonlWriter(path, fresh=fresh)

    def emit(self, alert: Alert) -> None:
        self._writer.write(alert.record())

    def close(self) -> None:
        self._writer.close()


class TensorBoardSink(Sink):
    """Signals as scalars under `probes/<signal>` and alerts as text, via
    torch.utils.tensorboard (needs the optional `tensorboard` package; without it this sink
    warns once and does nothing)."""

    def __init__(self, log_dir):
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as err:  # ImportError, or tensorboard's own import-time errors
            warnings.warn(f"TensorBoard sink disabled: {err} (pip install tensorboard)", RuntimeWarning, stacklevel=3)
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def emit(self, alert: Alert) -> None:
        if self._writer is not None:
            self._writer.add_text(f"alerts/{alert.kind}", alert.line(), global_step=alert.step)
            self._writer.flush()

    def signals(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in values.items():
                if math.isfinite(value):
                    self._writer.add_scalar(f"probes/{name}", value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class ListSink(Sink):
    """Keeps alerts in memory (handy in tests and notebooks)."""

    alerts: list = field(default_factory=list)

    def emit(self, alert: Alert) -> None:
        self.alerts.append(alert)
