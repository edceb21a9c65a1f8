"""The grid's coordinator: schedules the runs on a launcher, collects them, reports as they finish.

It holds the output folder's lease (loopdyn.lease) for the whole grid, submits every run not
finished yet to the launcher (loopdyn.launchers), and then watches two sources: the completion
records in the shared `--out` (a run is done exactly when `runs/<name>/record.json` exists,
loopdyn.gridstore) and the launcher's events (a task that failed or was retried). Each run is
in one state:

    pending   submitted, not started (waiting for a worker, a node, a slot in the array)
    running   an attempt with a fresh heartbeat (on some host; steps done so far)
    done      its completion record exists
    failed    the launcher gave up on it (the reason and the log path are kept)

and `retried` when more than one attempt was made (a lost worker, a preemption). As runs
finish, `on_update(result)` rewrites the partial outputs (summary.json, the matrix,
report.html) at most every `update_every` seconds; progress (done / running / failed, the ETA
from the finished runs' durations) goes to a bar on a terminal and to log lines otherwise.

A coordinator that crashed leaves the completion records behind: `--resume` keeps them and
submits the rest. Attempts still alive from the crashed coordinator (a Slurm array outlives
it) are adopted, not submitted twice: the run is watched and only resubmitted if that attempt
dies.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from loopdyn.gridstore import Resources, Task, bury_dead, is_done, run_dir, scan_attempts
from loopdyn.launchers.base import Launcher
from loopdyn.lease import Lease

ENDED_GRACE = 30.0  # seconds a task may have ended before its completion record is visible (NFS caches)
STATES = ("done", "running", "pending", "failed")


@dataclass
class RunState:
    name: str
    injection: str
    lr: float
    seed: int
    state: str = "pending"
    attempts: int = 0
    retried: bool = False
    host: str = ""
    steps: int = 0
    total_steps: int = 0
    reason: str = ""
    log: str = ""
    kept: bool = False  # finished before this invocation (--resume)
    seconds: float | None = None  # wall time of the attempt that finished it
    started: float | None = field(default=None, repr=False)
    ended_at: float | None = field(default=None, repr=False)
    submitted: bool = field(default=False, repr=False)

    def public(self) -> dict:
        d = asdict(self)
        for k in ("started", "ended_at", "submitted"):
            d.pop(k)
        return d


def status_dict(states: list[RunState], launcher: str, started: float) -> dict:
    counts = {s: sum(r.state == s for r in states) for s in STATES}
    return {"complete": counts["done"] == len(states), "counts": counts,
            "retried": sum(r.retried for r in states), "launcher": launcher,
            "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "elapsed_seconds": round(time.time() - started, 1),
            "runs": [r.public() for r in states]}


def eta_seconds(states: list[RunState], now: float) -> float | None:
    """Seconds left, from the mean wall time of the runs finished in this session: each running
    run needs what is left of that mean, each pending one all of it, spread over as many runs at
    a time as are running now. None before any run finished."""
    durations = [r.seconds for r in states if r.state == "done" and not r.kept and r.seconds]
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    running = [r for r in states if r.state == "running"]
    pending = sum(r.state == "pending" for r in states)
    left = sum(max(0.0, mean - (now - (r.started or now))) for r in running) + pending * mean
    return left / max(1, len(running))


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


class GridProgress:
    """Progress of the grid: a tqdm bar over runs on a terminal, log lines otherwise."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None], every: float = 60.0):
        self.log, self.every = log, every
        # the progress lines go to stderr, like every progress in loopdyn, unless the caller collects lines
        self.status_log = log if log is not print else (lambda s: print(s, file=sys.stderr, flush=True))
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="grid", unit="run", dynamic_ncols=True, leave=True, file=sys.stderr)
        self._last_line = time.monotonic()

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def update(self, states: list[RunState], now: float, changed: bool) -> None:
        if not self.enabled:
            return
        counts = {s: sum(r.state == s for r in states) for s in STATES}
        steps = sum(r.steps for r in states if r.state == "running")
        total = sum(r.total_steps for r in states if r.state == "running")
        eta = eta_seconds(states, now)
        if self.bar is not None:
            self.bar.n = counts["done"]
            self.bar.set_postfix_str(f"running {counts['running']}, failed {counts['failed']}, "
                                     f"pending {counts['pending']}"
                                     + (f", steps {steps}/{total}" if total else "")
                                     + f", ETA {_fmt_seconds(eta)}", refresh=True)
        elif changed or time.monotonic() - self._last_line >= self.every:
            self._last_line = time.monotonic()
            retried = sum(r.retried for r in states)
            self.status_log(f"grid: {counts['done']}/{len(states)} done, {counts['running']} running, "
                     f"{counts['failed']} failed, {counts['pending']} pending"
                     + (f", {retried} retried" if retried else "")
                     + (f"; running runs at {steps}/{total} steps" if total else "")
                     + (f"; about {_fmt_seconds(eta)} left" if eta is not None and counts["done"] + counts["failed"]
                        < len(states) else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def coordinate(specs: list, out: Path, launcher: Launcher, resume: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, on_update: Callable | None = None, update_every: float = 10.0,
               resources: Resources | None = None, threads: int = 1, poll_every: float = 1.0):
    """Run the grid `specs` into `out` on `launcher`; return loopdyn.compare.CompareResult (its
    `status` says what became of every run)."""
    from loopdyn import compare
    from loopdyn.models.errors import InputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    with Lease(out) as lease, compare.OutLock(out):
        todo, kept = compare.prepare_out(out, specs, resume)
        if kept:
            log(f"resuming: {len(kept)} finished run(s) kept, {len(todo)} to do")
        start = time.time()
        order = {s.name: i for i, s in enumerate(specs)}
        records = {compare.RunSpec(**r.spec).name: r for r in kept}
        states = {s.name: RunState(s.name, s.injection, s.lr, s.seed, total_steps=s.steps) for s in specs}
        for name, record in records.items():
            states[name].state, states[name].kept, states[name].steps = "done", True, record.steps
        plan = getattr(launcher, "plan", None)
        if plan is not None:
            plan(len(todo))
        threads = getattr(launcher, "threads", threads)
        absolute = str(out.resolve())
        tasks = {s.name: Task(s.name, s, absolute, threads=threads, resources=resources or Resources(),
                              launcher=launcher.name) for s in todo}
        # adopt attempts still alive from an earlier coordinator; bury the dead ones
        fresh = []
        for name in tasks:
            bury_dead(out, name)
            alive = [a for a in scan_attempts(out, name) if a.live]
            if alive:
                log(f"{name}: adopted attempt {alive[-1].id} still running on {alive[-1].host}")
            else:
                fresh.append(tasks[name])
                states[name].submitted = True
        bar = GridProgress(len(specs), progress, log)
        cancel = True
        try:
            if todo:
                log(f"{len(todo)} run(s) on {launcher.describe()}")
            launcher.submit(fresh, out)
            last_update, dirty = 0.0, False
            while any(states[n].state in ("pending", "running") for n in tasks):
                lease.check()
                events = launcher.poll(poll_every)
                now = time.time()
                changed = False
                for ev in events:
                    st = states.get(ev.run)
                    if st is None:
                        continue
                    if ev.kind == "retried":
                        st.retried = True
                        bar.line(f"{ev.run}: retried ({ev.reason})")
                        changed = True
                    elif st.ended_at is None:
                        st.ended_at = now
                        if ev.kind == "failed":
                            st.reason = ev.reason or "failed"
                        st.log = ev.log or st.log
                for name in tasks:
                    st = states[name]
                    if st.state in ("done", "failed"):
                        continue
                    before = (st.state, st.attempts, st.host)
                    attempts = scan_attempts(out, name, now)
                    st.attempts = max(st.attempts, len(attempts))
                    st.retried = st.retried or len(attempts) > 1
                    live = [a for a in attempts if a.live]
                    if is_done(out, name):
                        record = compare.load_record(run_dir(out, name) / compare.RECORD)
                        records[name] = record
                        finished = [a for a in attempts if a.state == "finished"]
                        begun = finished[-1].started if finished else st.started
                        st.state, st.seconds = "done", (now - begun) if begun else record.seconds
                        st.steps = record.steps
                        if finished:
                            st.host = finished[-1].host
                        st.log = (finished[-1].log if finished else "") or st.log
                        st.reason = ""
                        bar.line(f"{name}: {record.outcome} — {record.outcome_reason}"
                                 + (f" (after {st.attempts} attempts)" if st.attempts > 1 else ""))
                        changed = dirty = True
                        continue
                    if st.ended_at is not None and (st.reason or now - st.ended_at > ENDED_GRACE):
                        last = attempts[-1] if attempts else None
                        st.state = "failed"
                        st.reason = st.reason or "the task ended without a completion record"
                        if last is not None and last.reason and last.reason not in st.reason:
                            st.reason += f" ({last.reason})"
                        st.log = st.log or (last.log if last else "")
                        bar.line(f"{name}: failed — {st.reason}" + (f"; log: {st.log}" if st.log else ""))
                        changed = dirty = True
                        continue
                    if live:
                        a = live[-1]
                        st.state, st.host, st.steps, st.log = "running", a.host, a.steps, a.log or st.log
                        st.started = a.started
                    else:
                        st.state = "pending"
                        if not st.submitted:  # an adopted attempt died: submit the run now
                            st.submitted = True
                            launcher.submit([tasks[name]], out)
                    if attempts and attempts[-1].state in ("lost", "preempted", "failed") and not live:
                        st.reason = f"attempt {attempts[-1].id}: {attempts[-1].state} ({attempts[-1].reason})"
                    if (st.state, st.attempts, st.host) != before:
                        changed = True
                        if st.state == "running" and st.attempts > 1 and before[1] < st.attempts:
                            bar.line(f"{name}: retried (attempt {st.attempts} on {st.host})")
                bar.update(list(states.values()), now, changed)
                if on_update is not None and dirty and records and now - last_update >= update_every:
                    on_update(_result(out, specs, records, kept, launcher, states, start, order))
                    last_update, dirty = now, False
            cancel = False
        finally:
            bar.close()
            launcher.shutdown(cancel=cancel)
        for name in tasks:
            bury_dead(out, name)
        result = _result(out, specs, records, kept, launcher, states, start, order)
        log(f"{len(todo)} run(s) in {time.time() - start:.0f} s on {launcher.describe()}")
        return result


def _result(out, specs, records, kept, launcher, states, start, order):
    from loopdyn import compare

    done = sorted(records.values(), key=lambda r: order.get(compare.RunSpec(**r.spec).name, len(order)))
    status = status_dict([states[s.name] for s in specs], launcher.describe(), start)
    return compare.CompareResult(out=out, records=done, skipped=[compare.RunSpec(**r.spec).name for r in kept],
                                 jobs=getattr(launcher, "jobs", 1), threads=getattr(launcher, "threads", 1),
                                 status=status)
