"""`loopdyn train` with the stability monitor: options, alerts file, printed alerts."""
import json

import pytest

from loopdyn.cli import main
from loopdyn.commands.train import monitor_options

SMALL = ["train", "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--no-progress"]


def test_train_with_alerts_file_uses_the_monitor(tmp_path, capsys):
    alerts, log = tmp_path / "alerts.jsonl", tmp_path / "log.jsonl"
    assert main(SMALL + ["--alerts", str(alerts), "--log", str(log), "--on-spike", "skip"]) == 0
    out = capsys.readouterr().out
    assert "monitor: alerts" in out and str(alerts) in out
    assert alerts.exists()
    for line in alerts.read_text().splitlines():
        assert list(json.loads(line))[:8] == ["step", "kind", "severity", "signal", "value", "threshold", "score",
                                               "message"]
    assert len(log.read_text().splitlines()) == 12
    assert out.strip().splitlines()[-1].startswith("run ")  # the one-line verdict ends the output


def test_train_ends_with_a_verdict_naming_the_loop_instability(tmp_path, capsys):
    """The issue's new-user run, shortened: a linear injection at lr 0.05 with --on-warning
    cut-lr. ρ(Ā) crosses 1 within a few steps; the monitor says so, cuts the learning rate, keeps
    reporting (and cutting) while it worsens, and the last line is the verdict."""
    alerts = tmp_path / "alerts.jsonl"
    code = main(["train", "--injection", "linear", "--lr", "0.05", "--steps", "24", "--batch-size", "4",
                 "--seq-len", "32", "--eval-every", "0", "--no-progress", "--alerts", str(alerts),
                 "--on-warning", "cut-lr"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    loop = [r for r in records if r["kind"] == "loop_instability"]
    assert loop and loop[0]["signal"] == "injection_radius" and loop[0]["value"] > 1 == loop[0]["threshold"]
    assert len(loop) >= 2 and loop[1]["severity"] == "critical" and loop[1]["escalation"] == 1
    assert out[-1].startswith("run ") and f"loop unstable since step {loop[0]['step']}" in out[-1]
    # --on-warning applies to the loop family too, and the cut is repeated at each escalation
    cuts = [r for r in records if r["kind"] == "action" and "learning rate cut" in r["message"]]
    assert len(cuts) >= len(loop) >= 2 and "learning-rate cut" in out[-1]


def test_on_loop_acts_on_the_loop_family_alone(tmp_path, capsys):
    """--on-loop sets the loop_instability action apart from --on-warning: with `--on-loop
    cut-lr` every learning-rate cut answers a loop_instability alert (at its step), none a spike
    warning; with `--on-loop warn` there is no cut at all."""
    def run(on_loop):
        alerts = tmp_path / f"alerts-{on_loop}.jsonl"
        assert main(["train", "--injection", "linear", "--lr", "0.05", "--steps", "24", "--batch-size", "4",
                     "--seq-len", "32", "--eval-every", "0", "--no-progress", "--alerts", str(alerts),
                     "--on-warning", "warn", "--on-loop", on_loop]) == 0
        capsys.readouterr()
        return [json.loads(line) for line in alerts.read_text().splitlines()]

    records = run("cut-lr")
    loop_steps = {r["step"] for r in records if r["kind"] == "loop_instability"}
    cuts = [r for r in records if r["kind"] == "action" and "learning rate cut" in r["message"]]
    assert loop_steps and cuts and {c["step"] for c in cuts} <= loop_steps
    assert all(c["signal"] in {r["signal"] for r in records if r["kind"] == "loop_instability"} for c in cuts)
    records = run("warn")
    assert [r for r in records if r["kind"] == "loop_instability"]
    assert not [r for r in records if r["kind"] == "action" and "learning rate cut" in r["message"]]


def test_train_prints_alerts_as_they_happen(tmp_path, capsys):
    """A learning rate of 30 wrecks the tiny model at once: the monitor reports it on stderr
    while training, writes the same alerts to the file, and `--on-spike stop` ends the run."""
    alerts = tmp_path / "alerts.jsonl"
    code = main(["train", "--steps", "60", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
                 "--no-progress", "--warmup", "1", "--lr", "30", "--alerts", str(alerts), "--on-spike", "stop"])
    assert code == 0
    captured = capsys.readouterr()
    printed = [line for line in captured.err.splitlines() if line.startswith("loopdyn probe: ")]
    records = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert printed and len(printed) == len(records)
    assert any(r["kind"] in ("spike", "nonfinite") for r in records)
    assert "stopped early" in captured.out


def test_no_monitor_unless_asked(tmp_path, capsys):
    assert main(SMALL) == 0
    assert "monitor:" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--sync-every", "0"], ["--jacobian-every", "-1"]])
def test_bad_monitor_options_are_one_line_errors(bad, capsys):
    assert main(SMALL + bad) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopdyn train: error: monitor option")


def test_monitor_options_mapping():
    from loopdyn.cli import build_parser

    args = build_parser().parse_args(["train", "--on-warning", "cut-lr", "--sync-every", "5"])
    assert monitor_options(args) == {"alerts_path": None, "tensorboard_dir": None, "on_warning": "cut_lr",
                                     "sync_every": 5}
    assert monitor_options(build_parser().parse_args(["train"])) is None


@pytest.mark.slow  # an inductor compile of the model: ~30-60 s on a quiet 2-core CPU
def test_train_compile_works_with_the_monitor(tmp_path, capsys):
    """`loopdyn train --compile` with --alerts, --on-spike and --probes (refused before): the
    monitor runs compile-safe, the loop signals come from its probe pass, the run ends with
    its verdict line."""
    alerts, plots = tmp_path / "alerts.jsonl", tmp_path / "plots"
    assert main(SMALL + ["--compile", "--alerts", str(alerts), "--on-spike", "skip", "--probes",
                         "--plots", str(plots), "--format", "svg"]) == 0
    out = capsys.readouterr().out
    assert alerts.exists() and (plots / "monitor.svg").exists()
    assert out.strip().splitlines()[-1].startswith("run ")
