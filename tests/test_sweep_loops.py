"""Tests for `loopdyn sweep-loops`: the one-unroll sweep against separate forward passes, and the
command line end to end (CSV → `loopdyn fit`), including bad input."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from loopdyn.scaling.flops import unrolled_params
from loopdyn.cli import main
from loopdyn.scaling.sweep import sweep_loops
from loopdyn.dynamics.overthinking import sweep_losses
from loopdyn.data import load_text
from loopdyn.train import evaluate
from loopdyn.models import LoopConfig, LoopedLM, save
from loopdyn.models.errors import InputError


def nonlinear_tiny(seed=0, **overrides):
    """A tiny model whose core is not the identity (the official init zeroes output projections)."""
    torch.manual_seed(seed)
    model = LoopedLM(LoopConfig.preset("tiny", **overrides))
    with torch.no_grad():
        for blk in [*model.prelude, *model.core, *model.coda]:
            blk.attn.c_proj.weight.normal_(0, 0.05)
            blk.mlp.proj.weight.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    # deterministic, varied text: this test file's own source, repeated
    src = open(__file__, "rb").read()
    path.write_bytes(src * 4)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(nonlinear_tiny(), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_one_unroll_equals_separate_forward_passes(text_file):
    model = nonlinear_tiny(state_init="like-init")
    data = load_text(text_file)
    K, Bs, S, N = 2, 3, 24, 9
    swept = sweep_losses(model, data.val_batches(K, Bs, S), N)
    separate = np.array([evaluate(model, data, K, Bs, S, n_loops=T) for T in range(1, N + 1)])
    # the same operations in the same order: equal to float32 round-off of the averaging
    np.testing.assert_allclose(swept, separate, rtol=1e-6, atol=0)
    # and the curve really depends on T (so the comparison can tell loop counts apart)
    assert np.ptp(swept) > 1e-3
    # direct check on one batch with model(idx, targets, n_loops=T)
    x, y = data.val_batches(1, 2, S)[0]
    one = sweep_losses(model, [(x, y)], 5)
    direct = [float(model(x, y, n_loops=T).loss) for T in range(1, 6)]
    np.testing.assert_allclose(one, direct, rtol=1e-6, atol=0)


def test_sweep_restores_training_mode_and_rejects_fixed_depth(text_file):
    model = nonlinear_tiny().train()
    data = load_text(text_file)
    s = sweep_loops(model, data, n_batches=1, batch_size=2, seq_len=16)
    assert model.training
    assert list(s.loops) == list(range(1, 13))  # default 3 × mu_rec
    assert s.params == unrolled_params(model.config, 4)
    with pytest.raises(InputError, match="fixed-depth"):
        sweep_loops(LoopedLM(LoopConfig.preset("gpt-tiny")), data, n_batches=1, batch_size=2, seq_len=16)


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_cli_writes_csv_that_fit_reads(checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    code = main(["sweep-loops", str(checkpoint), "--data", str(text_file), "--batches", "2",
                 "--batch-size", "2", "--seq-len", "16", "--csv", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "trained mean" in printed and f"wrote {out}" in printed
    header, rows = read_csv(out)
    assert header == ["loops", "mean_recurrence", "params", "tokens", "loss"]
    assert [int(r[0]) for r in rows] == list(range(1, 13))
    assert {r[1] for r in rows} == {"4"}
    assert {r[2] for r in rows} == {str(unrolled_params(LoopConfig.preset("tiny"), 4))}
    assert {r[3] for r in rows} == {""}  # training tokens unknown
    losses = np.array([float(r[4]) for r in rows])
    # the CSV holds the same numbers as the library call
    model = nonlinear_tiny()
    expected = sweep_losses(model, load_text(text_file).val_batches(2, 2, 16), 12)
    np.testing.assert_allclose(losses, expected, rtol=1e-7)

    code = main(["fit", str(out), "--law", "testtime", "--holdout-above", "4",
                 "--restarts", "4", "--bootstrap", "0"])
    assert code == 0
    assert "law: testtime" in capsys.readouterr().out

    # --max-loops and --tokens
    out2 = tmp_path / "short.csv"
    assert main(["sweep-loops", str(checkpoint), "--data", str(text_file), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "16", "--csv", str(out2), "--max-loops", "5",
                 "--tokens", "1e6", "--no-progress"]) == 0
    _, rows = read_csv(out2)
    assert len(rows) == 5 and {r[3] for r in rows} == {"1000000"}


@pytest.mark.parametrize("extra,message", [
    (["--max-loops", "0"], "--max-loops must be a positive integer"),
    (["--max-loops", "1000000"], "--max-loops 1000000 is too large"),
    (["--seq-len", "4096"], "--seq-len 4096 is longer"),
    (["--batches", "0"], "--batches must be a positive integer"),
    (["--tokens", "-5"], "--tokens must be a positive number"),
])
def test_cli_bad_options(checkpoint, text_file, tmp_path, capsys, extra, message):
    out = tmp_path / "x.csv"
    code = main(["sweep-loops", str(checkpoint), "--data", str(text_file), "--csv", str(out),
                 "--no-progress", *extra])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("loopdyn sweep-loops: error:")
    assert not out.exists()


def test_cli_missing_and_fixed_depth_checkpoints(tmp_path, text_file, capsys):
    out = tmp_path / "x.csv"
    assert main(["sweep-loops", str(tmp_path / "nope"), "--csv", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such checkpoint" in err[0]

    fixed = save(LoopedLM(LoopConfig.preset("gpt-tiny")), tmp_path / "gpt")
    assert main(["sweep-loops", str(fixed), "--data", str(text_file), "--csv", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fixed-depth" in err[0]

    assert main(["sweep-loops", str(fixed), "--csv", str(tmp_path / "no" / "dir.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_training_tokens_recorded_by_the_trainer_fill_the_tokens_column(text_file, tmp_path):
    from loopdyn.train import TrainConfig, train

    model = LoopedLM(LoopConfig.preset("tiny"))
    data = load_text(text_file)
    train(model, data, TrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=0, eval_batches=1,
                                   progress=False, save_dir=str(tmp_path / "ckpt")))
    assert main(["sweep-loops", str(tmp_path / "ckpt"), "--data", str(text_file), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "16", "--max-loops", "2", "--csv", str(tmp_path / "s.csv"),
                 "--no-progress"]) == 0
    _, rows = read_csv(tmp_path / "s.csv")
    assert {float(r[3]) for r in rows} == {3 * 2 * 16}  # steps × batch × sequence
