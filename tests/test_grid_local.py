"""The grid's coordinator and shared-folder storage on the local launcher: completion records,
attempts that die or race, failed runs reported with their reason and log, partial results,
and --resume after the coordinator itself was killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from loopdyn.cli import main
from loopdyn.compare import RECORD, RunRecord, RunSpec
from loopdyn.coordinator import RunState, eta_seconds
from loopdyn.schemas import validate
from loopdyn.gridstore import ATTEMPT, Attempt, Task, attempts_dir, bury_dead, run_dir, scan_attempts

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--no-progress"]


def _record(spec: RunSpec, note: str) -> dict:
    return asdict(RunRecord(spec=asdict(spec), params=1, mean_loops=4, steps=spec.steps, tokens=1, seconds=1.0,
                            losses=[1.0], val_by_loops={"4": 1.0}, outcome="converged", note=note))


# ---- attempts: one result per run, dead attempts buried ----------------------------------------

def test_of_two_attempts_at_one_run_the_first_to_finish_is_kept_and_the_other_leaves_nothing(tmp_path):
    spec = RunSpec("diagonal", 0.01, steps=3)
    task = Task(spec.name, spec, str(tmp_path))
    a, b = Attempt(task), Attempt(task)  # a retry racing a slow original
    for attempt, note in ((a, "a"), (b, "b")):
        (attempt.dir / RECORD).write_text(json.dumps(_record(spec, note)))
        (attempt.dir / "model.bin").write_bytes(note.encode() * 100)
    assert b.finish() is True
    assert a.finish() is False
    final = run_dir(tmp_path, spec.name)
    assert json.loads((final / RECORD).read_text())["note"] == "b" and (final / "model.bin").read_bytes() == b"b" * 100
    assert not a.dir.exists() and not b.dir.exists()
    states = {x.id: x.state for x in scan_attempts(tmp_path, spec.name)}
    assert states == {b.id: "finished", a.id: "duplicate"}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [spec.name]


def test_an_attempt_without_heartbeat_is_lost_and_buried_and_foreign_folders_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPDYN_HEARTBEAT_SECONDS", "0.1")  # stale after 0.6 s
    spec = RunSpec("linear", 0.01)
    attempt = Attempt(Task(spec.name, spec, str(tmp_path)))
    live = scan_attempts(tmp_path, spec.name)
    assert [x.live for x in live] == [True] and live[0].state == "running"
    attempt.stop()  # the worker froze or its node vanished: no more heartbeats
    info = json.loads((attempt.dir / ATTEMPT).read_text())
    info["host"] = "node-elsewhere"  # so its pid cannot be checked from here
    (attempt.dir / ATTEMPT).write_text(json.dumps(info))
    time.sleep(1.0)
    (lost,) = scan_attempts(tmp_path, spec.name)
    assert lost.state == "lost" and not lost.live and "no heartbeat" in lost.reason
    foreign = attempts_dir(tmp_path, spec.name) / "not-ours"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert bury_dead(tmp_path, spec.name) == 1
    assert not attempt.dir.exists() and (foreign / "keep.txt").is_file()
    (tomb,) = scan_attempts(tmp_path, spec.name)
    assert tomb.state == "lost" and tomb.id == attempt.id


def test_eta_comes_from_the_finished_runs():
    now = 1000.0
    states = [RunState("a", "diagonal", 0.01, 0, state="done", seconds=100.0),
              RunState("b", "diagonal", 0.02, 0, state="done", seconds=300.0),
              RunState("c", "linear", 0.01, 0, state="running", started=now - 50.0),
              RunState("d", "linear", 0.02, 0, state="running", started=now - 250.0),
              RunState("e", "fixed", 0.01, 0, state="pending"),
              RunState("f", "fixed", 0.02, 0, state="done", kept=True, seconds=5.0)]  # kept: not timed now
    # mean 200 s: c needs 150, d 0, e 200; two at a time
    assert eta_seconds(states, now) == pytest.approx((150 + 0 + 200) / 2)
    assert eta_seconds(states[2:5], now) is None


# ---- end to end on the local launcher ----------------------------------------------------------

def test_a_failed_run_is_reported_with_reason_and_log_and_resume_redoes_only_it(tmp_path, capsys, monkeypatch):
    import loopdyn.compare as compare_mod

    real = compare_mod.run_one

    def flaky(spec, folder, **kw):
        if spec.injection == "linear":
            raise RuntimeError("CUDA out of memory (on purpose)")
        return real(spec, folder, **kw)

    monkeypatch.setattr(compare_mod, "run_one", flaky)
    out = tmp_path / "cmp"
    argv = ["compare", "--injections", "diagonal,linear", "--lrs", "0.01", "--out", str(out), "--jobs", "1", *TINY]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "1 run(s) failed: linear-lr0.01-seed0 (RuntimeError: CUDA out of memory (on purpose)" in err
    summary = json.loads((out / "summary.json").read_text())
    validate("summary", summary)  # the status object is part of the documented contract
    status = {r["name"]: r for r in summary["status"]["runs"]}
    failed = status["linear-lr0.01-seed0"]
    assert failed["state"] == "failed" and "CUDA out of memory" in failed["reason"]
    log = Path(failed["log"])
    assert log.is_file() and "Traceback" in log.read_text() and "CUDA out of memory" in log.read_text()
    from loopdyn import allocator

    assert allocator.keep_freed_memory() in log.read_text()  # the run's allocator, set as the command line sets it
    assert str(log) in err
    assert summary["status"]["counts"] == {"done": 1, "running": 0, "pending": 0, "failed": 1}
    assert not summary["status"]["complete"]
    assert summary["matrix"]["linear"]["0.01"] == "failed"
    assert summary["matrix"]["diagonal"]["0.01"] == summary["runs"][0]["outcome"]
    html = (out / "report.html").read_text()
    assert "Grid status" in html and "✗ failed" in html and str(log) in html
    assert not run_dir(out, "linear-lr0.01-seed0").exists()  # nothing partial among the results
    assert [a.state for a in scan_attempts(out, "linear-lr0.01-seed0")] == ["failed"]

    monkeypatch.setattr(compare_mod, "run_one", real)  # the fault is fixed
    kept = run_dir(out, "diagonal-lr0.01-seed0") / RECORD
    before = (kept.stat().st_mtime_ns, kept.read_bytes())
    assert main(argv + ["--resume"]) == 0
    assert "1 finished run(s) kept, 1 to do" in capsys.readouterr().out
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == before
    summary = json.loads((out / "summary.json").read_text())
    status = {r["name"]: r for r in summary["status"]["runs"]}
    assert summary["status"]["complete"] and status["diagonal-lr0.01-seed0"]["kept"]
    assert status["linear-lr0.01-seed0"]["attempts"] == 2 and status["linear-lr0.01-seed0"]["retried"]
    assert "Grid status" in (out / "report.html").read_text()  # a retried run is worth a line
    assert summary["matrix"]["linear"]["0.01"] in ("inconclusive", "residual explosion")


def test_partial_results_are_written_as_runs_finish(tmp_path):
    from loopdyn.compare import grid, run_grid
    from loopdyn.report import write_outputs

    out = tmp_path / "cmp"
    seen = []

    def on_update(partial):
        data = write_outputs(partial, "png", None, plots=False)
        seen.append((data["status"]["counts"], dict(data["matrix"]), (out / "report.html").read_text()))

    specs = grid(["fixed"], [0.01, 0.02], [0], steps=2, batch_size=4, seq_len=32)
    result = run_grid(specs, out, jobs=1, threads=1, progress=False, log=lambda s: None, on_update=on_update)
    assert result.status["complete"] and len(result.records) == 2
    assert seen, "no partial update was written"
    counts, matrix, html = seen[0]
    assert counts["done"] == 1 and counts["running"] + counts["pending"] == 1
    assert set(matrix["fixed"].values()) & {"pending", "running"}
    assert "Partial results" in html and "The figures are drawn when the grid completes" in html


CRASHER = """
import sys
from loopdyn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_the_coordinator_was_killed_keeps_finished_runs_and_buries_the_interrupted(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--injections", "diagonal,linear", "--lrs", "0.01", "--out", str(out), "--jobs", "1", *TINY]
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = run_dir(out, "diagonal-lr0.01-seed0") / RECORD
    try:
        deadline = time.time() + 600
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.exists(), "the first run did not finish"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the coordinator dies: no cleanup, its lease stays behind
        proc.wait()
    assert (out / ".loopdyn.lease").exists()
    before = first.read_bytes(), first.stat().st_mtime_ns
    second_done = (run_dir(out, "linear-lr0.01-seed0") / RECORD).exists()
    assert main(argv + ["--resume"]) == 0  # same host, dead holder: the lease is taken over at once
    printed = capsys.readouterr().out
    assert f"{1 + second_done} finished run(s) kept, {1 - second_done} to do" in printed
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"]["complete"] and len(summary["runs"]) == 2
    for name in ("diagonal-lr0.01-seed0", "linear-lr0.01-seed0"):
        assert (run_dir(out, name) / RECORD).is_file() and (run_dir(out, name) / "model").is_dir()
        # no attempt folder is left: the killed one was buried (its tombstone says so)
        assert all(p.suffix == ".json" for p in attempts_dir(out, name).iterdir())
    if not second_done:
        states = [a.state for a in scan_attempts(out, "linear-lr0.01-seed0")]
        assert states[-1] == "finished" and set(states[:-1]) <= {"lost"}
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["diagonal-lr0.01-seed0", "linear-lr0.01-seed0"]


def test_an_attempt_still_alive_from_a_crashed_coordinator_is_adopted_not_run_twice(tmp_path, monkeypatch):
    """A Slurm array outlives its coordinator: --resume watches the live attempt instead of
    submitting the run again, and takes its result when it lands."""
    from loopdyn.compare import grid, run_grid
    from loopdyn.launchers.local import LocalLauncher

    monkeypatch.setenv("LOOPDYN_HEARTBEAT_SECONDS", "0.1")
    out = tmp_path / "cmp"
    (spec,) = grid(["diagonal"], [0.01], [0], steps=3)
    alive = Attempt(Task(spec.name, spec, str(out.resolve())))  # heartbeating, as on a node

    def land() -> None:
        time.sleep(2.0)
        (alive.dir / RECORD).write_text(json.dumps(_record(spec, "from the node")))
        alive.finish()

    submitted = []

    class Watching(LocalLauncher):
        def submit(self, tasks, out_):
            submitted.extend(t.name for t in tasks)
            super().submit(tasks, out_)

    lines: list[str] = []
    thread = __import__("threading").Thread(target=land)
    thread.start()
    result = run_grid([spec], out, resume=True, launcher=Watching(1, 1), progress=False, log=lines.append)
    thread.join()
    assert submitted == [] and any("adopted attempt" in line for line in lines)
    assert result.status["complete"] and result.records[0].note == "from the node"
    assert [a.state for a in scan_attempts(out, spec.name)] == ["finished"]
