"""Where alerts and signals go: Python logging (the console), JSON Lines, TensorBoard, framework
loggers (through `MetricsSink`), or a list in memory.

The library writes nothing with print(): console lines are records of the `loopdyn.probes`
logger ("loopdyn probe: step 12: WARNING spike_warning on lr: …"; actions at INFO, warnings at
WARNING, critical findings at ERROR). When that logger has no handler of its own, a default
one writes the bare line to the current sys.stderr; add your own handler to
`logging.getLogger("loopdyn.probes")` (and remove the default one, `sinks.DEFAULT_HANDLER`) to
route them elsewhere. The JSON Lines sink writes each record with a single unbuffered write()
(loopdyn.io.JsonlWriter), so a killed run leaves only whole lines.
"""
from __future__ import annotations

import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, TextIO

from loopdyn.io import JsonlWriter

logger = logging.getLogger("loopdyn.probes")
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a logging handler never raises into the caller
            self.handleError(record)


DEFAULT_HANDLER = _StderrHandler(logging.INFO)


def _ensure_default_handler() -> None:
    if not logger.handlers:
        logger.addHandler(DEFAULT_HANDLER)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


class Sink:
    """Receives alerts (and, at sync points, the latest signal values)."""

    def emit(self, alert) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def signals(self, step: int, values: dict[str, float]) -> None:
        """Latest values of every signal, called at each host sync point (optional)."""

    def close(self) -> None:
        pass


@dataclass
class ConsoleSink(Sink):
    """One line per alert through the `loopdyn.probes` logger; `write` (e.g. tqdm.write, so a
    progress bar stays intact) or `stream` send the line there directly instead."""

    stream: TextIO | None = None
    write: Callable[[str], None] | None = None
    prefix: str = "loopdyn probe"

    def emit(self, alert) -> None:
        text = f"{self.prefix}: {alert.line()}"
        if self.write is not None:
            self.write(text)
        elif self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            _ensure_default_handler()
            logger.log(LEVELS.get(alert.severity, logging.WARNING), text)


LoggingSink = ConsoleSink  # the same thing: alerts as records of the loopdyn.probes logger


class JsonlSink(Sink):
    """One JSON object per alert (the contract fields), complete on disk when emit() returns."""

    def __init__(self, path, fresh: bool = True):
        self.path = path
        self._writer = JsonlWriter(path, fresh=fresh)

    def emit(self, alert) -> None:
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

    def emit(self, alert) -> None:
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

    def emit(self, alert) -> None:
        self.alerts.append(alert)


@dataclass
class MetricsSink(Sink):
    """Collects what a framework logger should receive: the latest value of every signal (as
    `<prefix><signal>`) and running alert counts per kind (`<prefix>alerts/<kind>`); `pop()`
    hands them over once and forgets the signal values until the next sync point."""

    prefix: str = "loopdyn/"
    counts: dict = field(default_factory=dict)
    latest: dict = field(default_factory=dict)

    def emit(self, alert) -> None:
        self.counts[alert.kind] = self.counts.get(alert.kind, 0) + 1

    def signals(self, step: int, values: dict[str, float]) -> None:
        self.latest.update({k: float(v) for k, v in values.items() if math.isfinite(float(v))})

    def pop(self) -> dict[str, float]:
        out = {f"{self.prefix}{k}": v for k, v in self.latest.items()}
        out.update({f"{self.prefix}alerts/{k}": float(n) for k, n in self.counts.items()})
        self.latest = {}
        return out
