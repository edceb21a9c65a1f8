"""Issue 25, classes 2 and 3 (small files): one validation boundary, every error names its cause.

Every bad argument, config value or API input is refused with a message naming the argument: a
ValueError in the Python API, exit 1 and one line on the command line (never "internal error");
small files are read bounded, FIFOs and devices refused at once, and a permission problem, a
symlink loop or JSON nested too deeply are named as such."""
from __future__ import annotations

import errno
import os
import textwrap
from pathlib import Path

import pytest
import torch

from loopdyn.cli import main
from loopdyn.models import save
from tests.test_models import make_model


def one_line(capsys, argv, *words, code=1):
    assert main(argv) == code, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "internal error" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    path = tmp_path_factory.mktemp("val") / "ck"
    save(make_model(seed=0, block_size=64), path)
    return path


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "sweep.csv"
    path.write_text("loops,loss\n" + "".join(f"{t},{1 + 2.0 ** -t:.6f}\n" for t in range(1, 9)))
    return path


# ---- the command line: arguments and --set values ------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["train", "--warmup", "-5"], ["--warmup", "-5"]),
    (["train", "--seed", "-1"], ["--seed"]),
    (["train", "--seed", str(10**30)], ["--seed"]),
    (["train", "--steps", "0"], ["--steps"]),
    (["train", "--lr", "nan"], ["--lr"]),
    (["train", "--lr", "inf"], ["--lr"]),
    (["train", "--threads", "100000"], ["--threads", "100000"]),
    (["train", "--set", "n_heads=true"], ["n_heads", "True"]),
    (["train", "--set", "n_core=false"], ["n_core"]),
    (["train", "--set", "d_model=64.0"], ["d_model"]),
    (["train", "--set", "logit_softcap=Infinity"], ["logit_softcap"]),
    (["train", "--set", "norm_eps=NaN"], ["norm_eps"]),
    (["compare", "--seeds", "-3", "--steps", "1"], ["--seeds"]),
    (["compare", "--lrs", "nan", "--steps", "1"], ["--lrs"]),
    (["compare", "--threads", "100000", "--steps", "1"], ["--threads"]),
    (["demo", "--seed", "-1"], ["--seed"]),
])
def test_bad_arguments_are_one_line_naming_the_argument(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    one_line(capsys, argv, *words)
    assert os.listdir(tmp_path) == []  # refused before any work


def test_fit_refuses_a_nan_holdout_and_an_out_of_range_seed(capsys, csv):
    one_line(capsys, ["fit", str(csv), "--law", "testtime", "--holdout-above", "nan"], "--holdout-above")
    one_line(capsys, ["fit", str(csv), "--law", "testtime", "--seed", "-4"], "--seed")


def test_audit_refuses_nonfinite_and_out_of_range_options(capsys, ck):
    one_line(capsys, ["audit", str(ck), "--explosion-factor", "inf"], "--explosion-factor")
    one_line(capsys, ["audit", str(ck), "--exit-threshold", "nan"], "--exit-threshold")
    one_line(capsys, ["sweep-loops", str(ck), "--threads", "100000"], "--threads")


# ---- user code given as FILE.py:FUNCTION --------------------------------------------------

@pytest.mark.parametrize("source, line, kind", [
    ("def build(:\n    pass\n", 1, "SyntaxError"),
    ("import os\n\ndef build():\n    x = 1\n    raise KeyError('no such layer')\n", 5, "KeyError"),
    ("raise RuntimeError('broken at import')\n\ndef build():\n    pass\n", 1, "RuntimeError"),
    ("import torch\n\ndef build():\n    return torch.empty(-3)\n", 4, "RuntimeError"),
])
def test_user_code_that_fails_is_the_users_error_with_file_and_line(capsys, tmp_path, source, line, kind):
    user = tmp_path / "mine.py"
    user.write_text(source)
    err = one_line(capsys, ["audit", f"{user}:build", "--no-progress"], str(user), f"line {line}", kind)
    assert err.startswith("loopdyn audit: error:")


# ---- the Python API ----------------------------------------------------------------------

def test_api_inputs_raise_a_value_error_naming_the_argument():
    from loopdyn.dynamics import loop_jacobian, lyapunov, measure_trajectory
    from loopdyn.dynamics.phases import token_phases
    from loopdyn.dynamics.trajectory import trajectory_stats

    model = make_model(block_size=64)
    ids = torch.zeros(1, 4, dtype=torch.long)
    ctx = model.encode(ids)
    cases = [
        (lambda: model(torch.rand(1, 4)), "idx"),
        (lambda: model(torch.zeros(1, 0, dtype=torch.long)), "idx"),
        (lambda: model(torch.zeros(1, 4, dtype=torch.bool)), "idx"),
        (lambda: measure_trajectory(model, torch.rand(1, 4), 2), "idx"),
        (lambda: measure_trajectory(model, ids, True), "n_loops"),
        (lambda: measure_trajectory(model, ids, -1), "n_loops"),
        (lambda: lyapunov(model, torch.zeros(0, 4, dtype=torch.long), 2), "idx"),
        (lambda: lyapunov(model, ids, 2, k=2.0), "k"),
        (lambda: lyapunov(model, ids, 2, seed=-1), "seed"),
        (lambda: loop_jacobian(model, torch.zeros(1, 3, 5), ctx), "h"),
        (lambda: loop_jacobian(model, torch.zeros(1, 4, 64, dtype=torch.long), ctx), "h"),
        (lambda: token_phases([]), "states"),
        (lambda: trajectory_stats([]), "states"),
        (lambda: trajectory_stats([torch.zeros(1, 4, 8), torch.zeros(1, 4, 9)]), "states[1]"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(name + " "), (name, str(err.value))


def test_the_checks_reject_bools_floats_nonfinite_and_out_of_range():
    from loopdyn.models.checks import check_float, check_int, check_seed, check_states, check_tokens

    for bad in (True, 1.0, "1", None):
        with pytest.raises(ValueError, match="^n "):
            check_int(bad, "n")
    with pytest.raises(ValueError, match="≥ 0"):
        check_int(-1, "n", 0)
    assert check_int(torch.tensor(3).item(), "n", 0) == 3
    for bad in (float("nan"), float("inf"), True, "x"):
        with pytest.raises(ValueError, match="^x "):
            check_float(bad, "x")
    for bad in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match="^seed "):
            check_seed(bad)
    with pytest.raises(ValueError, match="^states is empty"):
        check_states([])
    check_tokens(torch.zeros(2, 3, dtype=torch.int32), "idx", 256, 8)


# ---- small files: bounded, never blocking, errors that name the cause -------------------------

def test_small_files_are_read_bounded_and_fifos_and_devices_refused(capsys, tmp_path, ck):
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB that take no space
    one_line(capsys, ["fit", str(huge), "--law", "testtime"], str(huge), "bytes, more than")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    one_line(capsys, ["fit", str(fifo), "--law", "testtime"], "FIFO")  # returns at once, never blocks
    one_line(capsys, ["fit", "/dev/zero", "--law", "testtime"], "/dev/zero", "device")
    big = tmp_path / "big"
    big.mkdir()
    os.link(ck / "model.safetensors", big / "model.safetensors")
    with open(big / "config.json", "wb") as f:
        f.truncate(64 << 30)
    one_line(capsys, ["audit", str(big)], "config.json", "bytes, more than")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line(capsys, ["audit", str(deep)], "config.json", "nested too deeply")
    (deep / "config.json").write_text('{"format": "loopdyn", "config": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_001)
    one_line(capsys, ["audit", str(deep)], "config.json", "nested too deeply")


def test_a_symlink_loop_is_named(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    os.symlink(b, a)
    os.symlink(a, b)
    one_line(capsys, ["audit", str(a)], str(a), "symlink loop")
    one_line(capsys, ["sweep-loops", str(a), "--csv", str(tmp_path / "x.csv")], "symlink loop")
    one_line(capsys, ["fit", str(a), "--law", "testtime"], "symlink loop")


def test_a_weights_file_without_read_permission_names_the_permission(capsys, tmp_path, ck, monkeypatch):
    import builtins

    real_open = builtins.open
    weights = str(tmp_path / "ck" / "model.safetensors")
    import shutil
    shutil.copytree(ck, tmp_path / "ck")
    os.chmod(weights, 0)

    def no_read(path, *a, **k):  # as a user other than root meets it (root reads anything)
        if str(path) == weights:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_read)
    one_line(capsys, ["audit", str(tmp_path / "ck")], "model.safetensors", "no permission to read")
