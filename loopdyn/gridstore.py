"""The grid's shared output folder: how runs write results that hold on a shared file system.

Layout of `--out` (the coordinator and every worker, on any machine, see the same folder):

    runs/<name>/                      finished runs only; `record.json` inside is the completion
                                      record (the run's settings, `spec`, and every result)
    .grid/attempts/<name>/<attempt>/  an attempt's working folder while it runs
    .grid/attempts/<name>/<attempt>.json   what became of an ended attempt (failed, lost, preempted)
    logs/<name>/<attempt>.log         an attempt's log (local and Ray; Slurm logs are in slurm/)
    .loopdyn.lease                    the coordinator's lease (loopdyn.lease)

An attempt (`execute`) trains in its own folder `.grid/attempts/<name>/<attempt>/`, writing
`attempt.json` (host, pid, state, steps done) at start and then every HEARTBEAT seconds from a
background thread. Its results, record.json last, are written there; then the whole folder is
renamed to `runs/<name>` — one atomic rename, on NFS as well. So a run is done exactly when
`runs/<name>/record.json` exists, a killed attempt leaves nothing in `runs/`, and of two
attempts of one run (a retry racing a slow original) only the first rename wins: the other
finds the run done and removes its own folder. `--resume` and the settings check read only
completion records, so they work whichever machine ran what.

An attempt whose heartbeat is older than `stale_after()` (6 beats, at least 30 s) is dead: the
coordinator writes its tombstone `<attempt>.json` and removes its folder (only folders holding
an `attempt.json`, i.e. made by loopdyn). `LOOPDYN_HEARTBEAT_SECONDS` sets the beat (10 s).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loopdyn.lease import hostname, pid_alive
from loopdyn.io import atomic_write_json

RUNS = "runs"
ATTEMPTS = Path(".grid") / "attempts"
LOGS = "logs"
RECORD = "record.json"  # = loopdyn.compare.RECORD
ATTEMPT = "attempt.json"
DEFAULT_HEARTBEAT = 10.0


def heartbeat_seconds() -> float:
    try:
        return max(0.05, float(os.environ.get("LOOPDYN_HEARTBEAT_SECONDS", DEFAULT_HEARTBEAT)))
    except ValueError:
        return DEFAULT_HEARTBEAT


def stale_after() -> float:
    """Seconds without a heartbeat after which an attempt is taken for dead."""
    beat = heartbeat_seconds()
    return max(6 * beat, 30.0 if beat >= DEFAULT_HEARTBEAT else 6 * beat)


def run_dir(out: Path, name: str) -> Path:
    return Path(out) / RUNS / name


def is_done(out: Path, name: str) -> bool:
    return (run_dir(out, name) / RECORD).is_file()


def attempts_dir(out: Path, name: str) -> Path:
    return Path(out) / ATTEMPTS / name


@dataclass(frozen=True)
class Resources:
    """What one run needs: CPU cores, GPUs, memory (GiB; None = the launcher's default)."""
    cpus: int = 1
    gpus: int = 0
    mem_gb: float | None = None


@dataclass(frozen=True)
class Task:
    """One grid run as shipped to a worker (picklable: plain data only)."""
    name: str
    spec: Any  # loopdyn.compare.RunSpec
    out: str  # the shared output folder (absolute)
    threads: int = 1  # torch threads in the worker
    resources: Resources = field(default_factory=Resources)
    launcher: str = "local"


# ---- the worker side ----------------------------------------------------------------------------

class Attempt:
    """One attempt at one run: its folder, its heartbeat, its end (finished, failed, preempted)."""

    def __init__(self, task: Task, log_path: Path | None = None):
        self.task = task
        self.out = Path(task.out)
        self.host, self.pid = hostname(), os.getpid()
        root = attempts_dir(self.out, task.name)
        root.mkdir(parents=True, exist_ok=True)
        number = 1 + sum(1 for p in root.iterdir() if p.name.endswith(".json") or p.is_dir())
        self.id = f"{number:02d}-{self.host}-{self.pid}-{uuid.uuid4().hex[:6]}"
        self.dir = root / self.id
        self.dir.mkdir()
        self.log = log_path or (self.out / LOGS / task.name / f"{self.id}.log")
        self.state = "running"
        self.steps = 0
        self.started = time.time()
        self.reason = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="loopdyn-heartbeat", daemon=True)
        self.write()
        self._thread.start()

    def info(self) -> dict:
        return {"run": self.task.name, "attempt": self.id, "host": self.host, "pid": self.pid,
                "launcher": self.task.launcher, "state": self.state, "steps": self.steps,
                "total_steps": getattr(self.task.spec, "steps", None), "started": self.started,
                "heartbeat": time.time(), "heartbeat_every": heartbeat_seconds(), "reason": self.reason,
                "log": str(self.log), "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID") and
                f"{os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
                or os.environ.get("SLURM_JOB_ID")}

    def write(self) -> None:
        with self._lock:
            if self.dir.is_dir():
                atomic_write_json(self.dir / ATTEMPT, self.info())

    def step(self, n: int = 1) -> None:
        self.steps += n

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            try:
                self.write()
            except OSError:
                pass  # a network hiccup: the next beat tries again

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def finish(self) -> bool:
        """Move the finished folder into runs/<name>. False when another attempt got there first
        (this attempt's folder is then removed: the run is kept once)."""
        self.stop()
        self.state = "finished"
        self.write()
        final = run_dir(self.out, self.task.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not (final / RECORD).is_file():
            # an unfinished folder of an older loopdyn (it trained in place): keep it aside, never delete it
            os.rename(final, attempts_dir(self.out, self.task.name) / f"unfinished-{uuid.uuid4().hex[:6]}")
        tombstone = self.dir.with_name(self.id + ".json")
        try:
            os.rename(self.dir, final)
        except OSError:
            if (final / RECORD).is_file():
                self.state, self.reason = "duplicate", "another attempt finished this run first; it was kept"
                bury(self.dir, self.info())
                return False
            raise
        atomic_write_json(tombstone, self.info())
        return True

    def end(self, state: str, reason: str) -> None:
        """The attempt ended without a result: leave its tombstone, remove its folder."""
        self.stop()
        self.state, self.reason = state, reason
        bury(self.dir, self.info())


def bury(folder: Path, info: dict) -> None:
    """Replace an ended attempt's folder by its tombstone `<folder>.json`."""
    atomic_write_json(folder.with_name(folder.name + ".json"), info)
    if (folder / ATTEMPT).is_file():  # made by loopdyn: safe to remove
        shutil.rmtree(folder, ignore_errors=True)


def execute(task: Task, log_path: str | None = None, on_step=None) -> dict:
    """Run one grid task here (any machine that sees `task.out`); return a small summary.

    Raises what the run raised, after recording it; a run already finished (by another attempt)
    is not redone. `on_step(n)` is called after each training step (it may raise to stop the run)."""
    if is_done(Path(task.out), task.name):
        return {"run": task.name, "state": "done", "duplicate": True}
    import torch

    from loopdyn import compare  # looked up here: tests patch compare.run_one
    from loopdyn.allocator import keep_freed_memory

    memory_policy = keep_freed_memory()  # as the command line (loopdyn/allocator.py)

    attempt = Attempt(task, Path(log_path) if log_path else None)
    attempt.log.parent.mkdir(parents=True, exist_ok=True)
    with open(attempt.log, "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {task.name}: attempt {attempt.id} on {attempt.host} "
                  f"(pid {attempt.pid}), {task.threads} thread(s), launcher {task.launcher}; {memory_policy}\n")
        log.flush()
        try:
            if task.threads and torch.get_num_threads() != task.threads:
                torch.set_num_threads(task.threads)
            def step(n: int) -> None:
                attempt.step(n)
                if on_step is not None:
                    on_step(n)

            compare.run_one(task.spec, attempt.dir, progress=step)
        except KeyboardInterrupt:
            attempt.end("interrupted", "interrupted")
            raise
        except SystemExit as err:  # submitit's requeue after a preemption signal
            attempt.end("preempted", f"preempted (requeued, exit code {err.code})")
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} preempted: requeued\n")
            raise
        except BaseException as err:
            reason = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
            log.write(traceback.format_exc())
            attempt.end("failed", reason)
            raise
        first = attempt.finish()
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} finished in {time.time() - attempt.started:.1f} s"
                  f"{'' if first else ' (another attempt had finished it: kept that one)'}\n")
    return {"run": task.name, "state": "done", "attempt": attempt.id, "duplicate": not first}


# ---- the coordinator side -----------------------------------------------------------------------

@dataclass
class AttemptInfo:
    id: str
    state: str  # running | finished | failed | lost | preempted | interrupted
    host: str = ""
    pid: int | None = None
    steps: int = 0
    started: float = 0.0
    heartbeat: float = 0.0
    reason: str = ""
    log: str = ""
    live: bool = False  # a running attempt with a fresh heartbeat


def scan_attempts(out: Path, name: str, now: float | None = None) -> list[AttemptInfo]:
    """Every attempt at run `name`, oldest first: live, ended (tombstones) and dead (stale heartbeat)."""
    root = attempts_dir(out, name)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    found: dict[str, AttemptInfo] = {}
    for p in root.iterdir():
        if p.name.endswith(".tmp") or p.name.startswith("unfinished-"):
            continue
        path = p / ATTEMPT if p.is_dir() else p
        if not path.name.endswith(".json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        aid = data.get("attempt") or p.name.removesuffix(".json")
        info = AttemptInfo(id=aid, state=data.get("state", "?"), host=data.get("host", ""), pid=data.get("pid"),
                           steps=int(data.get("steps") or 0), started=float(data.get("started") or 0),
                           heartbeat=float(data.get("heartbeat") or 0), reason=data.get("reason") or "",
                           log=data.get("log") or "")
        if p.is_dir() and info.state in ("running", "finished"):  # finished: being moved into runs/
            local_dead = info.host == hostname() and isinstance(info.pid, int) and not pid_alive(info.pid)
            if local_dead or now - info.heartbeat > stale_after():
                info.state, info.reason = "lost", ("its process is gone" if local_dead else
                                                   f"no heartbeat for {now - info.heartbeat:.0f} s")
            else:
                info.live = True
        if aid not in found or p.is_dir():
            found[aid] = info
    return sorted(found.values(), key=lambda a: (a.started, a.id))


def bury_dead(out: Path, name: str) -> int:
    """Tombstone and remove attempt folders of run `name` that are dead (stale or gone). Returns how many."""
    n = 0
    for a in scan_attempts(out, name):
        folder = attempts_dir(out, name) / a.id
        if a.state == "lost" and folder.is_dir():
            info = json.loads((folder / ATTEMPT).read_text()) if (folder / ATTEMPT).is_file() else {}
            info.update(state="lost", reason=a.reason)
            bury(folder, info)
            n += 1
    return n


def attempt_summary(attempts: list[AttemptInfo]) -> dict[str, Any]:
    return {"attempts": len(attempts), "retried": len(attempts) > 1,
            "history": [asdict(a) for a in attempts]}
