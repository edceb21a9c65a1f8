"""Running the compare grid: every run not already finished in `--out`, one after another or in a
local pool of processes, with one progress bar over all steps; `--out` is held by an `OutLock`
the whole time (docs/design.md, "loopdyn compare").
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from loopdyn.compare.records import CompareResult, RunRecord, RunSpec, prepare_out
from loopdyn.compare.run import run_one
from loopdyn.io import OutLock
from loopdyn.models.errors import InputError


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (which stops them), so they print no tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(spec: RunSpec, run_dir: str, threads: int, queue) -> dict:
    torch.set_num_threads(threads)
    report = (lambda n: queue.put(("step", n))) if queue is not None else None
    record = run_one(spec, Path(run_dir), progress=report)
    return asdict(record)


def run_grid(specs: list[RunSpec], out: Path, resume: bool = False, jobs: int | None = None,
             progress: bool = True, log: Callable[[str], None] = print, threads: int | None = None) -> CompareResult:
    """Run every spec not already finished in `out`, in parallel processes when jobs > 1.
    `out` is locked for the whole time (OutLock): a second process on it is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    with OutLock(out):
        return _run_grid(specs, out, resume, jobs, progress, log, threads)


def _run_grid(specs: list[RunSpec], out: Path, resume: bool, jobs: int | None, progress: bool,
              log: Callable[[str], None], threads: int | None) -> CompareResult:
    todo, done = prepare_out(out, specs, resume)
    if done:
        log(f"resuming: {len(done)} finished run(s) kept, {len(todo)} to do")
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(todo) or 1))
    threads = threads or max(1, cores // jobs)
    bar = _bar(sum(s.steps for s in todo), len(todo), progress)
    records = list(done)
    start = time.perf_counter()
    records += (_run_here if jobs == 1 else _run_in_pool)(todo, out, jobs, threads, bar, log)
    if bar is not None:
        bar.close()
    order = {s.name: i for i, s in enumerate(specs)}
    records.sort(key=lambda r: order.get(RunSpec(**r.spec).name, len(order)))
    log(f"{len(todo)} run(s) in {time.perf_counter() - start:.0f} s ({jobs} process(es) × {threads} thread(s))")
    return CompareResult(out=out, records=records, skipped=[RunSpec(**r.spec).name for r in done],
                         jobs=jobs, threads=threads)


def _run_here(todo: list[RunSpec], out: Path, jobs: int, threads: int, bar, log) -> list[RunRecord]:
    """The runs one after another in this process."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    records = []
    for spec in todo:
        records.append(run_one(spec, out / "runs" / spec.name, progress=bar.update if bar else None))
        _after_run(records[-1], bar, log)
    return records


def _run_in_pool(todo: list[RunSpec], out: Path, jobs: int, threads: int, bar, log) -> list[RunRecord]:
    """The runs in `jobs` spawned local processes of `threads` torch threads each; Ctrl-C or a
    failed run stops the others at once."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    records = []
    ctx = mp.get_context("spawn")  # fork after torch threads exist is unsafe
    with mp.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        queue = manager.Queue()
        pending = {pool.submit(_worker, s, str(out / "runs" / s.name), threads, queue) for s in todo}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(queue, bar)
                for fut in finished:
                    records.append(RunRecord(**fut.result()))
                    _after_run(records[-1], bar, log)
            _drain(queue, bar)
        except BaseException:  # Ctrl-C or a failed run: stop the other runs now, not after they finish
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return records


def _bar(total_steps: int, n_runs: int, enabled: bool):
    from loopdyn.progress import progress as make_progress

    return make_progress(total_steps, f"{n_runs} runs", "step", enabled=enabled, leave=True)


def _drain(queue, bar) -> None:
    while not queue.empty():
        _, n = queue.get()
        if bar is not None:
            bar.update(n)


def _after_run(record: RunRecord, bar, log) -> None:
    spec = RunSpec(**record.spec)
    line = f"{spec.name}: {record.outcome} — {record.outcome_reason}"
    from loopdyn.progress import LineProgress

    if bar is not None and not isinstance(bar, LineProgress):
        bar.write(line)
    else:
        log(line)
