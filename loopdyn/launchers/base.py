"""The launcher interface: where the runs of a grid execute.

A launcher gets the grid's tasks (`loopdyn.gridstore.Task`: one run each, with the resources
it needs), starts them wherever it runs things (a local process pool, a Ray cluster, a Slurm
job array) and reports what its scheduler knows through `poll`. Every task calls
`loopdyn.gridstore.execute` on its worker, which writes the results into the shared `--out`;
the coordinator (loopdyn.coordinator) trusts only the completion records there, and uses the
launcher's events for what the folder cannot tell: a task that failed before it could record
anything, a retry, a log path.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from loopdyn.gridstore import Task


@dataclass(frozen=True)
class Event:
    """What a launcher learnt about one task."""
    run: str
    kind: str  # "ended" (the task returned), "failed" (gave up: no more retries), "retried"
    reason: str = ""
    log: str = ""


class Launcher(ABC):
    name = "?"
    retries_on_loss = 0  # how many times a run is restarted when its worker is lost

    @abstractmethod
    def submit(self, tasks: list[Task], out: Path) -> None:
        """Submit tasks (returns at once; may be called again with more)."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Event]:
        """Wait up to `timeout` seconds for news; return what happened since the last call."""

    @abstractmethod
    def shutdown(self, cancel: bool = False) -> None:
        """Release the launcher's resources; with `cancel`, stop tasks still running first."""

    def describe(self) -> str:
        """One line for the log and the report: where the runs execute."""
        return self.name

    def log_path(self, task: Task) -> str | None:
        """Where this launcher's log of the task is, when it keeps one itself (else the attempt's log)."""
        return None


class MissingExtra(Exception):
    pass


def need(module: str, extra: str, option: str):
    """Import an optional dependency, or fail with one line naming the extra to install."""
    import importlib

    from loopdyn.models.errors import InputError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{option} needs the `{module}` package: pip install 'loopdyn[{extra}]'") from None
