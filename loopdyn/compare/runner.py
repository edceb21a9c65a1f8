"""Running the compare grid: every run not already finished in `--out`, on a launcher (this
machine's process pool by default; Ray or Slurm: `loopdyn.launchers`), scheduled and collected by
`loopdyn.coordinator`, with `--out` leased and locked the whole time (docs/design.md §6).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from loopdyn.compare.records import CompareResult, RunSpec


def _worker_init(parent: int | None = None) -> None:
    """Start-up of a worker process: it leaves Ctrl-C to the parent (which stops it), so it prints
    no traceback, and it dies with its parent (`die_with_parent`), so a parent killed outright
    (kill -9, the OOM killer) leaves no worker running, writing into --out or holding its lock."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


def die_with_parent(parent: int | None) -> None:
    """End this process when `parent` (the pid that started it) is gone: at once on Linux
    (prctl PR_SET_PDEATHSIG: SIGKILL on the parent's death), else by a watcher thread that checks
    the parent pid twice a second; and now if the parent died before this ran."""
    import os
    import sys
    import threading
    import time

    if parent is None:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="loopdyn-parent-watch", daemon=True).start()


def quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with its stderr on /dev/null: after an interrupt
    (the parent exits at once, with 130) it would otherwise print 'leaked semaphore' warnings
    after the one 'interrupted' line. It still cleans up what it tracks."""
    import os
    import sys
    from multiprocessing import resource_tracker

    if getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
        return  # already running
    try:
        sys.stderr.flush()
        err = sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):
        return
    saved = os.dup(err)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, err)
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, err)
        os.close(saved)
        os.close(devnull)


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
