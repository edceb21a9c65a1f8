"""Issue 2: the command line (`loopdyn train`, `loopdyn demo`, `python -m loopdyn`) and its
exit codes: 0 success, 1 bad input (one stderr line, no traceback), 2 usage."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from loopdyn.cli import main
from loopdyn.models import load
from tests.test_models import tokens

FAST = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress"]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x * 2\n" * 200)
    return path


def _bad_input(capsys, argv, *words):
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"loopdyn {argv[0]}: error: ")
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


def test_train_on_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _bad_input(capsys, ["train", "--data", str(tmp_path / "empty"), *FAST], tmp_path / "empty")
    _bad_input(capsys, ["train", "--data", str(tmp_path / "missing"), *FAST], "missing")


def test_train_with_a_sequence_longer_than_the_block(corpus_file, capsys):
    _bad_input(capsys, ["train", "--data", str(corpus_file), *FAST, "--seq-len", "300"], "block_size")


@pytest.mark.parametrize("item,word", [("d_model", "FIELD=VALUE"), ("nosuch=1", "nosuch"),
                                       ("mean_loops=abc", "mean_loops"), ("norm_eps=abc", "norm_eps"),
                                       ("injection=gru", "injection"), ("d_model=62", "d_model"),
                                       ("tie_embeddings=3", "tie_embeddings")])
def test_train_with_a_bad_set(corpus_file, capsys, item, word):
    _bad_input(capsys, ["train", "--data", str(corpus_file), *FAST, "--set", item], word)


def test_unknown_preset(corpus_file, capsys):
    _bad_input(capsys, ["train", "--data", str(corpus_file), *FAST, "--preset", "parcae-9b"], "parcae-9b")


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["train", "--steps", "abc"], ["train", "--bogus"],
                                  ["train", "--injection", "gru"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("as_folder", [False, True])
def test_train_on_a_file_or_a_folder(tmp_path, corpus_file, capsys, as_folder):
    data = corpus_file
    if as_folder:
        data = tmp_path / "folder"
        for i in range(12):
            (data / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
            (data / f"d{i % 2}" / f"f{i}.py").write_text(f"# file {i}\n" + "x = [i for i in range(10)]\n" * 30)
    log, out = tmp_path / "log.jsonl", tmp_path / "model"
    code = main(["train", "--data", str(data), *FAST, "--log", str(log), "--save", str(out),
                 "--set", "block_size=32", "--mean-loops", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "validation loss" in captured.out and "unigram baseline" in captured.out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    model = load(out)
    assert model.config.mean_loops == 2 and model.config.block_size == 32
    assert torch.isfinite(model(tokens(S=8)).logits).all()


def test_python_dash_m_loopdyn_help():
    result = subprocess.run([sys.executable, "-m", "loopdyn", "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    for command in ("train", "demo"):
        assert command in result.stdout


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The main job: three injections × two learning rates, audited, reported (2 steps each here)."""
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and "report.html" in printed
    for name in ("summary.json", "report.html"):
        assert (out / name).is_file()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(f"{i}-lr{lr}-seed0" for i in ("diagonal", "linear", "additive") for lr in ("0.01", "0.05"))
    parcae = out / "runs" / "diagonal-lr0.01-seed0"
    records = [json.loads(line) for line in (parcae / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    model = load(parcae / "model")
    assert model.config.name == "tiny" and model.config.injection == "diagonal"
    assert model.checkpoint_info.format == "loopdyn"


def test_train_compile_runs_with_the_monitor(tmp_path, corpus_file, capsys):
    """`--compile` with the monitor (docs/design.md §5, compile-safe mode): it used to be refused;
    now the compiled run trains with the monitor attached and logs every step."""
    log = tmp_path / "log.jsonl"
    assert main(["train", "--data", str(corpus_file), *FAST, "--compile", "--probes", "--log", str(log)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) >= 2


@pytest.mark.slow
def test_train_compile_runs_the_training_step_compiled(tmp_path, corpus_file, capsys, monkeypatch):
    """`--compile` trains through torch.compile (inductor: about a minute here) and learns like eager."""
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(a) or real(*a, **k))
    log = tmp_path / "log.jsonl"
    assert main(["train", "--data", str(corpus_file), *FAST, "--compile", "--log", str(log),
                 "--set", "block_size=32", "--mean-loops", "2"]) == 0, capsys.readouterr().err
    assert len(compiled) == 1
    assert all(math.isfinite(json.loads(line)["loss"]) for line in log.read_text().splitlines())
