"""Running the compare grid: every run not already finished in `--out`, on a launcher (this
machine's process pool by default; Ray or Slurm: `loopdyn.launchers`), scheduled and collected by
`loopdyn.coordinator`, with `--out` leased and locked the whole time (docs/design.md §6).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from loopdyn.compare.records import CompareResult, RunSpec


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (which stops them), so they print no tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_grid(specs: list[RunSpec], out: Path, resume: bool = False, jobs: int | None = None,
             progress: bool = True, log: Callable[[str], None] = print, threads: int | None = None,
             launcher=None, on_update: Callable[[CompareResult], None] | None = None) -> CompareResult:
    """Run every spec not already finished in `out` on `launcher` (default: this machine, in
    parallel processes when jobs > 1; loopdyn.launchers), through loopdyn.coordinator. `out` is
    leased and locked for the whole time: a second coordinator on it is refused."""
    from loopdyn.coordinator import coordinate
    from loopdyn.launchers.local import LocalLauncher

    launcher = launcher or LocalLauncher(jobs, threads)
    return coordinate(specs, Path(out), launcher, resume=resume, progress=progress, log=log, on_update=on_update)
