"""Issue 9: command-line conventions and no traceback for anything a user can cause.

`--version`; every option's default in --help; one spelling per concept (`--batch-size`,
`--data PATH`, `cut-lr`), old spellings kept as hidden aliases; `--threads N`; progress as log
lines when stderr is not a terminal; Ctrl-C at any moment (also while torch imports) is exit
130 and one line; `--device cuda` on a CPU build, internal errors and a full disk are one line.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loopdyn.cli import build_parser, main
from loopdyn.models import save
from tests.test_models import make_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--set", "block_size=32"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x * 2\n" * 200)
    return path


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"loopdyn \d+\.\d+\.\d+\S*", capsys.readouterr().out.strip())


def test_every_option_shows_its_default_in_help():
    for name, parser in _subcommands().items():
        help_text = parser.format_help()
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (not action.option_strings or action.help == argparse.SUPPRESS or action.required
                    or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._VersionAction))):
                continue
            shown = formatter._get_help_string(action) % dict(vars(action), prog=parser.prog)
            assert "default" in shown, (name, action.option_strings, shown)
        assert "%(default)" not in help_text


def test_one_spelling_per_concept():
    commands = _subcommands()
    for name, parser in commands.items():
        options = {s: a for a in parser._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
        assert "--batch" not in options, name  # the concept is --batch-size everywhere
        if "--data" in options:
            assert options["--data"].metavar == "PATH", name
        if "--device" in options:
            assert options["--device"].metavar == "DEV", name
        for option in options:
            assert "_" not in option, (name, option)
    for name in ("train", "audit", "compare", "demo", "sweep-loops"):
        assert any("--threads" in a.option_strings for a in commands[name]._actions), name
    train = commands["train"]
    on_warning = next(a for a in train._actions if "--on-warning" in a.option_strings)
    assert "cut-lr" in on_warning.choices and "cut_lr" not in on_warning.choices


def test_old_spellings_still_work_but_are_hidden(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["audit", "x", "--batch", "3"])
    assert args.batch_size == 3
    assert parser.parse_args(["audit", "x"]).batch_size == 1
    assert "--batch " not in _subcommands()["audit"].format_help()
    args = parser.parse_args(["train", "--on-warning", "cut_lr"])
    assert args.on_warning == "cut-lr"
    from loopdyn.commands.train import monitor_options

    assert monitor_options(args)["on_warning"] == "cut_lr"  # MonitorConfig's name


def test_threads_sets_torch_threads(corpus, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["train", "--data", str(corpus), *FAST, "--no-progress", "--threads", "1"]) == 0
    assert calls == [1]
    code = main(["train", "--data", str(corpus), *FAST, "--threads", "0"])
    assert code == 1 and "--threads" in capsys.readouterr().err


def test_progress_is_log_lines_when_stderr_is_not_a_terminal(corpus, capsys):
    assert main(["train", "--data", str(corpus), *FAST, "--steps", "20"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert len(lines) == 10, err
    assert lines[0].startswith("train: 2/20 steps (10%)") and lines[-1].startswith("train: 20/20 steps (100%)")
    assert "\r" not in err and "loss=" in lines[-1]
    assert main(["train", "--data", str(corpus), *FAST, "--no-progress"]) == 0
    assert "train: " not in capsys.readouterr().err


def test_audit_progress_is_one_line_per_stage_when_stderr_is_not_a_terminal(tmp_path, corpus, capsys):
    save(make_model(), tmp_path / "m")
    argv = ["audit", str(tmp_path / "m"), "--data", str(corpus), "--seq-len", "16", "--loops", "2"]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("audit: ")]
    # each stage once, in the order the audit runs them
    assert lines[:3] == ["audit: injection spectrum", "audit: trajectory", "audit: linearised loops"], lines
    assert "audit: forecast" in lines and len(lines) == len(set(lines))
    assert main([*argv, "--no-progress"]) == 0
    assert "audit: " not in capsys.readouterr().err


def test_data_split_is_reported(corpus, capsys):
    assert main(["train", "--data", str(corpus), *FAST, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"data: {corpus}: 1 file" in out and "split by position" in out


# ---- no tracebacks ---------------------------------------------------------------------------

def _one_line(capsys, argv, code=1) -> str:
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "audit", "sweep-loops"])
def test_device_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys, command):
    ckpt = save(make_model(), tmp_path / "ckpt")
    argv = {"train": ["train", "--steps", "1"], "audit": ["audit", str(ckpt)],
            "sweep-loops": ["sweep-loops", str(ckpt), "--csv", str(tmp_path / "s.csv")]}[command]
    line = _one_line(capsys, [*argv, "--device", "cuda"])
    assert "--device cuda" in line and "CUDA" in line
    line = _one_line(capsys, [*argv, "--device", "gpu7"])
    assert "--device" in line and "gpu7" in line


def test_an_internal_error_is_one_line_with_how_to_get_the_traceback(capsys, monkeypatch):
    import loopdyn.commands.fit as fit

    def boom(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(fit, "run", boom)
    line = _one_line(capsys, ["fit", "x.csv", "--law", "testtime"])
    assert "internal error" in line and "ZeroDivisionError: a bug" in line
    assert "--debug" in line and "LOOPDYN_DEBUG=1" in line
    with pytest.raises(ZeroDivisionError):
        main(["fit", "x.csv", "--law", "testtime", "--debug"])
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "fit", "x.csv", "--law", "testtime"])
    monkeypatch.setenv("LOOPDYN_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["fit", "x.csv", "--law", "testtime"])


def test_ctrl_c_inside_a_command_is_exit_130_one_line(capsys, monkeypatch):
    import loopdyn.commands.fit as fit

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(fit, "run", interrupted)
    assert _one_line(capsys, ["fit", "x.csv", "--law", "testtime"], code=130) == "loopdyn fit: interrupted"


_IMPORT_INTERRUPTED = textwrap.dedent("""
    import builtins, sys
    real = builtins.__import__
    def fake(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise KeyboardInterrupt   # Ctrl-C while torch is importing
        return real(name, *args, **kwargs)
    builtins.__import__ = fake
    from loopdyn.cli import main
    sys.exit(main(["audit", "some/checkpoint"]))
""")


def test_ctrl_c_while_torch_imports_is_exit_130_one_line():
    result = subprocess.run([sys.executable, "-c", _IMPORT_INTERRUPTED], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=ENV)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "loopdyn audit: interrupted"


def test_the_console_entry_imports_nothing_heavy():
    code = "import sys, loopdyn.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert result.stdout.strip() == "False", result.stderr


def _default_sigint() -> None:
    """In the child: SIGINT's default disposition, as in a terminal. A test runner started in the
    background by a non-interactive shell has SIGINT ignored, the children inherit that, and
    loopdyn (rightly) never overrides an ignored SIGINT; the test must not depend on how it ran."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_ctrl_c_at_any_moment_of_a_real_run(tmp_path, corpus, delay):
    """SIGINT to `python -m loopdyn train` while it starts, imports torch, or trains."""
    proc = subprocess.Popen([sys.executable, "-m", "loopdyn", "train", "--data", str(corpus), *FAST,
                             "--steps", "100000", "--log", str(tmp_path / "log.jsonl"), "--save", str(tmp_path / "m")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_default_sigint)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()  # a test that fails never leaves a training run behind
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "loopdyn train: interrupted" and "Traceback" not in err, err
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    if (tmp_path / "log.jsonl").exists():
        assert (tmp_path / "log.jsonl").read_text() in ("",) or (tmp_path / "log.jsonl").read_text().endswith("\n")


def test_sigterm_unwinds_like_ctrl_c(tmp_path, corpus):
    proc = subprocess.Popen([sys.executable, "-m", "loopdyn", "train", "--data", str(corpus), *FAST,
                             "--steps", "100000", "--log", str(tmp_path / "log.jsonl")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not (tmp_path / "log.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
