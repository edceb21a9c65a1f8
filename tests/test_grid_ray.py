"""`loopdyn compare --launcher ray` on a real local Ray cluster (127.0.0.1, 2 CPUs, started once
for the module and always shut down): the same matrix and losses as the local launcher, and a
worker process killed mid-run is retried without a duplicate, partial or lost result."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from loopdyn.cli import main  # noqa: E402
from loopdyn.compare import RECORD, RunSpec, run_one  # noqa: E402
from loopdyn.gridstore import ATTEMPT, attempts_dir, run_dir, scan_attempts  # noqa: E402
from loopdyn.schemas import validate  # noqa: E402

GRID = ["--injections", "diagonal,linear", "--lrs", "0.01,0.05", "--seeds", "3", "--steps", "4",
        "--batch-size", "4", "--seq-len", "32", "--no-progress"]


@pytest.fixture(scope="module")
def cluster():
    # workers inherit the environment of ray.init: a fast heartbeat, so a lost attempt shows at once
    saved = os.environ.get("LOOPDYN_HEARTBEAT_SECONDS")
    os.environ["LOOPDYN_HEARTBEAT_SECONDS"] = "0.2"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("LOOPDYN_HEARTBEAT_SECONDS", None)
        else:
            os.environ["LOOPDYN_HEARTBEAT_SECONDS"] = saved


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / RECORD).read_text()) for p in sorted((out / "runs").iterdir())}


def test_a_ray_grid_gives_the_local_launchers_matrix(cluster, tmp_path, capsys):
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    assert main(["compare", *GRID, "--launcher", "ray", "--cpus-per-run", "1", "--out", str(ray_out)]) == 0
    assert main(["compare", *GRID, "--jobs", "1", "--threads", "1", "--out", str(local_out)]) == 0
    capsys.readouterr()
    on_ray, here = _summary(ray_out), _summary(local_out)
    assert on_ray["matrix"] == here["matrix"] and len(on_ray["runs"]) == 4
    assert on_ray["status"]["complete"] and on_ray["status"]["launcher"].startswith("ray")
    validate("summary", on_ray)
    assert all(r["attempts"] == 1 and not r["retried"] for r in on_ray["status"]["runs"])
    a, b = _records(ray_out), _records(local_out)
    assert sorted(a) == sorted(b) == sorted(f"{i}-lr{lr}-seed3" for i in ("diagonal", "linear") for lr in ("0.01", "0.05"))
    for name in a:  # the same seed, data and batches: the same training, wherever it ran
        np.testing.assert_allclose(a[name]["losses"], b[name]["losses"], rtol=1e-5)
        assert a[name]["outcome"] == b[name]["outcome"]
    # the runs really ran in Ray's worker processes, not here
    pids = {json.loads((ray_out / "runs" / n / ATTEMPT).read_text())["pid"] for n in a}
    assert os.getpid() not in pids
    assert "--launcher ray --cpus-per-run 1" in (ray_out / "report.html").read_text()


def test_a_killed_ray_worker_is_retried_and_the_grid_completes_once(cluster, tmp_path, capsys):
    out = tmp_path / "ray"
    victim = "linear-lr0.01-seed0"
    argv = ["compare", "--injections", "diagonal,linear", "--lrs", "0.01", "--steps", "24", "--batch-size", "4",
            "--seq-len", "32", "--no-progress", "--launcher", "ray", "--retries", "2", "--out", str(out)]
    killed: list[int] = []

    def killer() -> None:  # kill the victim's worker process once it has trained a step
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            root = attempts_dir(out, victim)
            for a in scan_attempts(out, victim) if root.is_dir() else []:
                if a.live and a.steps >= 1 and a.pid:
                    os.kill(a.pid, signal.SIGKILL)
                    killed.append(a.pid)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert main(argv) == 0
    thread.join(timeout=5)
    printed = capsys.readouterr()
    assert killed, "the victim's worker was never seen running"
    summary = _summary(out)
    status = {r["name"]: r for r in summary["status"]["runs"]}
    assert summary["status"]["complete"] and status[victim]["state"] == "done"
    assert status[victim]["attempts"] == 2 and status[victim]["retried"]
    assert summary["status"]["retried"] == 1 and f"{victim}: retried" in printed.out + printed.err
    # exactly one complete result per run: nothing duplicated, partial or lost
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["diagonal-lr0.01-seed0", victim]
    for name, record in _records(out).items():
        assert len(record["losses"]) == 24 and record["steps"] == 24
        assert (run_dir(out, name) / "model" / "config.json").is_file()
    history = scan_attempts(out, victim)
    assert [a.state for a in history] == ["lost", "finished"]
    assert history[0].pid == killed[0] != history[1].pid
    assert all(p.suffix == ".json" for p in attempts_dir(out, victim).iterdir())  # the killed attempt's folder is gone
    # the retried run is the run: the same losses as training it here
    here = run_one(RunSpec("linear", 0.01, seed=0, steps=24, batch_size=4, seq_len=32), tmp_path / "here", audit=False)
    np.testing.assert_allclose(_records(out)[victim]["losses"], here.losses, rtol=1e-5)
