"""The local launcher: the grid's runs in a pool of processes on this machine (the default).

jobs = 1 runs each task in a thread of this process (no start-up cost; Ctrl-C stops the run at
its next step); jobs > 1 in `spawn`ed worker processes (fork after torch threads exist is
unsafe). A worker that dies takes the pool with it: the runs still pending are reported failed
(rerun them with --resume).
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

from loopdyn.gridstore import Task, execute
from loopdyn.launchers.base import Event, Launcher


class Cancelled(KeyboardInterrupt):
    """Raised in an in-process run, at its next step, when the grid is stopped."""


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, jobs: int | None = None, threads: int | None = None):
        self.jobs_wanted, self.threads_wanted = jobs, threads
        self.jobs, self.threads = 1, 1
        self._events: queue.Queue[Event] = queue.Queue()
        self._pool = None
        self._futures: dict = {}
        self._thread: threading.Thread | None = None
        self._todo: queue.Queue[Task] = queue.Queue()
        self._cancel = threading.Event()

    def plan(self, n_tasks: int) -> tuple[int, int]:
        """(processes, torch threads per process) for n_tasks runs on this machine."""
        cores = os.cpu_count() or 1
        jobs = max(1, min(self.jobs_wanted or cores, n_tasks or 1))
        threads = self.threads_wanted or max(1, cores // jobs)
        self.jobs, self.threads = jobs, threads
        return jobs, threads

    def describe(self) -> str:
        return f"local: {self.jobs} process(es) × {self.threads} thread(s)"

    def submit(self, tasks: list[Task], out: Path) -> None:
        if not tasks:
            return
        if self.jobs == 1:
            for task in tasks:
                self._todo.put(task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serial, name="loopdyn-grid", daemon=True)
                self._thread.start()
            return
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            from loopdyn import compare

            ctx = mp.get_context("spawn")
            compare.quiet_resource_tracker()
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=compare._worker_init,
                                             initargs=(os.getpid(),))  # workers die with this process
        self._futures.update({self._pool.submit(execute, t): t.name for t in tasks})

    def _serial(self) -> None:
        import torch

        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)
        while not self._cancel.is_set():
            try:
                task = self._todo.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                execute(task, on_step=self._check)
                self._events.put(Event(task.name, "ended"))
            except Cancelled:
                return
            except Exception as err:  # noqa: BLE001 - recorded as the run's failure
                self._events.put(Event(task.name, "failed", f"{type(err).__name__}: {err}".splitlines()[0]))

    def _check(self, n: int) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        if self._futures:
            from concurrent.futures import FIRST_COMPLETED, wait
            from concurrent.futures.process import BrokenProcessPool

            done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in done:
                name = self._futures.pop(fut)
                try:
                    fut.result()
                    events.append(Event(name, "ended"))
                except BrokenProcessPool:
                    events.append(Event(name, "failed", "a worker process died (killed or out of memory)"))
                except Exception as err:  # noqa: BLE001
                    events.append(Event(name, "failed", f"{type(err).__name__}: {err}".splitlines()[0]))
        else:
            try:
                events.append(self._events.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def shutdown(self, cancel: bool = False) -> None:
        self._cancel.set()
        if self._pool is not None:
            if cancel:  # stop the other runs now, not after they finish
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.terminate()
            self._pool.shutdown(wait=not cancel, cancel_futures=True)
            self._pool = None
        if self._thread is not None:
            self._thread.join(timeout=None if not cancel else 60)
            self._thread = None
