"""`loopdyn compare --launcher slurm`: the sbatch script of the grid's job array (array,
resources, requeue), the options' checks, the missing-extra message, and a real run through
submitit's LocalExecutor (real subprocesses, the same code path up to sbatch) in which a run
killed with SIGTERM (a preemption) is requeued and completes."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import pytest

submitit = pytest.importorskip("submitit")

from loopdyn.cli import main  # noqa: E402
from loopdyn.commands import compare as compare_cmd  # noqa: E402
from loopdyn.compare import RECORD, grid, run_grid  # noqa: E402
from loopdyn.gridstore import Resources, attempts_dir, run_dir, scan_attempts  # noqa: E402
from loopdyn.launchers import launcher_from_args, sbatch_lines, slurm_minutes  # noqa: E402
from loopdyn.launchers.slurm import SlurmLauncher  # noqa: E402
from loopdyn.models.errors import InputError  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare_cmd.register(parser.add_subparsers())
    return parser.parse_args(["compare", *argv])


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_the_sbatch_script_is_one_array_with_the_resources_and_requeue(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")  # a login node
    args = parse(["--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-time", "1:30:00",
                  "--cpus-per-run", "4", "--slurm-gpus-per-run", "1", "--slurm-mem", "16", "--jobs", "2",
                  "--slurm-sbatch=--account=proj", "--slurm-sbatch", "#SBATCH --qos=high",
                  "--slurm-sbatch", "exclusive"])
    launcher = launcher_from_args(args)
    assert isinstance(launcher, SlurmLauncher) and launcher.cluster == "slurm"
    folder = tmp_path / "slurm"
    script = launcher.script(6, folder)
    lines = set(script.splitlines())
    for line in ("#SBATCH --array=0-5%2", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=16GB",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "#SBATCH --job-name=loopdyn-compare", f"#SBATCH --output={folder}/%A_%a_0_log.out",
                 f"#SBATCH --error={folder}/%A_%a_0_log.err"):
        assert line in lines, (line, script)
    assert script.startswith("#!/bin/bash") and "srun" in script and "submitit.core._submit" in script
    # without a GPU or memory request, no such line; the array is as wide as the grid
    plain = SlurmLauncher(Resources(cpus=1), time_min=60, cluster="local").script(4, folder)
    assert "#SBATCH --array=0-3%4" in plain and "gpus" not in plain and "--mem" not in plain
    assert "--partition" not in plain and "#SBATCH --requeue" in plain


def test_slurm_options_are_checked(capsys, tmp_path):
    assert [slurm_minutes(t) for t in ("90", "1:30:00", "2-00:00:00", "1-12", "45:30")] == [90, 90, 2880, 2160, 46]
    for bad in ("soon", "1:2:3:4", "0"):
        with pytest.raises(InputError, match="--slurm-time"):
            slurm_minutes(bad)
    assert sbatch_lines(["--account=a b", "#SBATCH --constraint=volta", "exclusive"]) == {
        "account": "a b", "constraint": "volta", "exclusive": True}
    with pytest.raises(InputError, match="--slurm-sbatch"):
        sbatch_lines(["--bad option=1"])
    base = ["compare", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o")]
    assert "sbatch/srun not found" in _one_line_error(capsys, base + ["--launcher", "slurm"])
    assert "--cpus-per-run" in _one_line_error(capsys, base + ["--launcher", "ray", "--cpus-per-run", "0"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("launcher,module,extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_without_the_extra_the_option_names_it(capsys, tmp_path, monkeypatch, launcher, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    err = _one_line_error(capsys, ["compare", "--steps", "1", "--no-progress", "--launcher", launcher,
                                   "--out", str(tmp_path / "o")])
    assert f"pip install 'loopdyn[{extra}]'" in err and f"--launcher {launcher}" in err
    assert not (tmp_path / "o").exists()


def test_a_preempted_run_is_requeued_and_completes_through_submitit(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPDYN_HEARTBEAT_SECONDS", "0.2")  # the job subprocesses inherit it
    out = tmp_path / "cmp"
    victim = "linear-lr0.01-seed0"
    specs = grid(["diagonal", "linear"], [0.01], [0], steps=24, batch_size=4, seq_len=32)
    sent: list[int] = []

    def preempt() -> None:  # SIGTERM to the victim's process once it trained a step, as Slurm does
        deadline = time.time() + 600
        while time.time() < deadline and not sent:
            for a in scan_attempts(out, victim) if attempts_dir(out, victim).is_dir() else []:
                if a.live and a.steps >= 1 and a.pid:
                    os.kill(a.pid, signal.SIGTERM)
                    sent.append(a.pid)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    lines: list[str] = []
    launcher = SlurmLauncher(Resources(cpus=1), time_min=30, cluster="local")
    result = run_grid(specs, out, launcher=launcher, progress=True, log=lines.append)
    thread.join(timeout=5)
    assert sent, "the victim was never seen running"
    status = {r["name"]: r for r in result.status["runs"]}
    assert result.status["complete"] and status[victim]["state"] == "done"
    assert status[victim]["attempts"] == 2 and status[victim]["retried"]
    history = scan_attempts(out, victim)
    assert [a.state for a in history] == ["preempted", "finished"] and history[0].pid == sent[0]
    assert "preempted" in history[0].reason
    # requeued by submitit (the same job: its log has both attempts)
    log = status[victim]["log"]
    assert log.startswith(str((out / "slurm").resolve())) and log.endswith("_log.err")
    text = open(log).read()
    assert "preempted: requeued" in text and "finished in" in text
    from loopdyn import allocator

    assert text.count(allocator.keep_freed_memory()) == 2  # set in the worker by each attempt (loopdyn/allocator.py)
    # one complete result per run, nothing left of the preempted attempt
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["diagonal-lr0.01-seed0", victim]
    for name in ("diagonal-lr0.01-seed0", victim):
        record = json.loads((run_dir(out, name) / RECORD).read_text())
        assert record["steps"] == 24 and len(record["losses"]) == 24
    assert all(p.suffix == ".json" for p in attempts_dir(out, victim).iterdir())
    assert any("grid: 2/2 done" in line for line in lines)
