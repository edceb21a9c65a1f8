"""Issue 2: byte-level data (split, batches, unigram baseline) and the training loop
(loss goes down, JSONL log, schedule, weight-decay groups, early stop, save)."""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from loopdyn.models import InputError, LoopedLM, load
from loopdyn import train as train_module
from loopdyn.data import load_text
from loopdyn.train import TrainConfig, evaluate, learning_rate, param_groups, train
from tests.test_models import tiny_config, tokens


def _write_corpus(folder: Path, n_files: int = 40, seed: int = 0, order=None) -> dict[str, bytes]:
    """Files with random, pairwise distinct contents (so a file's bytes identify it)."""
    rng = random.Random(seed)
    contents = {}
    for i in range(n_files):
        body = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(rng.randint(150, 400)))
        contents[f"sub{i % 3}/file{i:02d}.txt"] = f"<<{i}:{rng.getrandbits(64):x}>>{body}".encode()
    for rel in (order(list(contents)) if order else contents):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[rel])
    return contents


# ---- data -----------------------------------------------------------------------------------

def test_folder_split_is_deterministic_and_by_file(tmp_path):
    contents = _write_corpus(tmp_path / "a")
    data = load_text(tmp_path / "a")
    again = load_text(tmp_path / "a")
    assert np.array_equal(data.train, again.train) and np.array_equal(data.val, again.val)
    assert data.train.dtype == np.uint8 and data.n_files == 40 and len(data.val) > 0
    train, val = data.train.tobytes(), data.val.tobytes()
    assert len(train) + len(val) == sum(len(c) for c in contents.values())
    in_val = set()
    for rel, body in contents.items():
        assert (body in train) != (body in val), rel  # each file wholly in exactly one split
        if body in val:
            in_val.add(rel)
    assert 1 <= len(in_val) <= 15  # about one in ten
    # the split depends on the relative path only, not on creation order or the folder's name
    _write_corpus(tmp_path / "b", order=lambda names: names[::-1])
    other = load_text(tmp_path / "b")
    assert other.train.tobytes() == train and other.val.tobytes() == val


def test_default_corpus_is_deterministic_with_a_validation_split():
    a, b = load_text(max_bytes=200_000), load_text(max_bytes=200_000)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.val) > 0 and len(a.train) > 5 * len(a.val) and "stdlib" in a.source
    assert b"def " in a.train.tobytes() or b"import " in a.train.tobytes()


def test_single_file_split_by_position(tmp_path):
    text = bytes(random.Random(1).getrandbits(8) for _ in range(5000))
    (tmp_path / "corpus.bin").write_bytes(text)
    data = load_text(tmp_path / "corpus.bin")
    assert data.n_files == 1 and data.train.tobytes() + data.val.tobytes() == text
    assert len(data.val) == 500
    assert load_text(tmp_path / "corpus.bin", max_bytes=2000).train.tobytes() == text[:1800]


def test_tiny_folder_still_has_validation(tmp_path):
    (tmp_path / "one.txt").write_bytes(b"x" * 3000)
    data = load_text(tmp_path)
    assert len(data.val) > 0 and len(data.train) + len(data.val) == 3000


@pytest.mark.parametrize("side", ["train", "validation"])
def test_a_folder_holding_a_single_text_file_splits_by_position_and_says_so(tmp_path, side):
    """Whichever side of the by-file hash split the one file falls on, the text is split by
    position (the last 10% is validation), and `describe` says how."""
    from loopdyn.data import _is_validation

    name = next(f"f{i}.txt" for i in range(1000) if _is_validation(f"f{i}.txt") == (side == "validation"))
    text = bytes(random.Random(2).getrandbits(8) for _ in range(4000))
    (tmp_path / name).write_bytes(text)
    data = load_text(tmp_path)
    assert data.train.tobytes() + data.val.tobytes() == text and len(data.val) == 400
    assert data.split == "by position"
    described = data.describe()
    assert "1 file" in described and "split by position" in described and side in described
    x, y = data.batch(2, 16, torch.Generator().manual_seed(0))
    assert x.shape == (2, 16)
    _write_corpus(tmp_path / "many", n_files=30)
    assert load_text(tmp_path / "many").split == "by file"
    assert "split by file" in load_text(tmp_path / "many").describe()


def test_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    """Reading a FIFO with no writer would block forever, /dev/zero would never end."""
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed():  # so that code which does try to read the FIFO finishes (and the test fails)
        import time

        time.sleep(2)
        with open(fifo, "wb") as f:
            f.write(b"x" * 5000)
    threading.Thread(target=feed, daemon=True).start()
    with pytest.raises(InputError, match="FIFO"):
        load_text(fifo)
    with pytest.raises(InputError, match="device"):
        load_text("/dev/null")
    # inside a folder, such entries are skipped
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    (folder / "text.txt").write_bytes(b"y" * 3000)
    assert load_text(folder).n_files == 1


def test_unigram_baseline_matches_a_direct_computation(tmp_path):
    _write_corpus(tmp_path, n_files=30, seed=3)
    data = load_text(tmp_path)
    counts = Counter(data.train.tobytes())
    total = len(data.train) + 256  # add-one smoothing over all 256 byte values
    val = data.val.tobytes()
    want = -sum(math.log((counts[b] + 1) / total) for b in val) / len(val)
    assert data.unigram_loss() == pytest.approx(want, rel=1e-12)
    assert 0 < want < math.log(256)


def test_batches_are_shifted_windows_of_the_data(tmp_path):
    _write_corpus(tmp_path)
    data = load_text(tmp_path)
    x, y = data.batch(4, 20, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 20) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train = data.train.tobytes()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert bytes(row_x + row_y[-1:]) in train
    x2, _ = data.batch(4, 20, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    first, second = data.val_batches(2, 3, 16), data.val_batches(2, 3, 16)
    assert len(first) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert bytes(first[1][0][2].tolist()) in data.val.tobytes()


def test_bad_data_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        load_text(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_bytes(b"")
    with pytest.raises(InputError, match="blank"):
        load_text(tmp_path / "blank")
    with pytest.raises(InputError, match="nowhere"):
        load_text(tmp_path / "nowhere")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(InputError, match="short.txt"):
        load_text(tmp_path / "short.txt")
    (tmp_path / "ok.txt").write_bytes(b"y" * 2000)
    data = load_text(tmp_path / "ok.txt")
    with pytest.raises(InputError, match="ok.txt"):
        data.batch(2, 1800, torch.Generator())
    with pytest.raises(InputError, match="validation"):
        data.val_batches(1, 2, 300)


# ---- training ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus():
    return load_text(max_bytes=300_000)


def test_a_short_run_learns_and_logs_every_step(tmp_path, small_corpus, monkeypatch):
    applied = []
    real = train_module.make_optimizer

    def recording_optimizer(model, cfg):
        opt = real(model, cfg)
        step = opt.step

        def recorded_step(*args, **kwargs):
            applied.append([g["lr"] for g in opt.param_groups])
            return step(*args, **kwargs)
        opt.step = recorded_step
        return opt
    monkeypatch.setattr(train_module, "make_optimizer", recording_optimizer)

    torch.manual_seed(0)
    model = LoopedLM(tiny_config())
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=20,
                      eval_batches=2, progress=False, log_path=str(tmp_path / "log" / "train.jsonl"),
                      save_dir=str(tmp_path / "model"))
    seen = []
    result = train(model, small_corpus, cfg, on_step=lambda step, record: seen.append(step))
    assert result.steps == 30 and len(result.losses) == 30 and seen == list(range(1, 31))
    assert not result.diverged and result.stop_reason is None
    assert result.tokens == 30 * 8 * 32
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert result.losses[0] > 5.0 and last < first - 1.0, (result.losses[0], first, last)  # from ≈ ln 256
    assert [s for s, _ in result.val] == [20, 30] and result.final_val_loss < 4.5

    lines = (tmp_path / "log" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 30
    records = [json.loads(line) for line in lines]  # every line a complete JSON object
    for i, rec in enumerate(records):
        assert {"step", "loss", "lr", "grad_norm", "tokens"} <= set(rec)
        assert rec["step"] == i + 1 and rec["tokens"] == (i + 1) * 8 * 32
        assert rec["loss"] == pytest.approx(result.losses[i], rel=1e-12)
        assert rec["lr"] == pytest.approx(learning_rate(i, cfg), rel=1e-12)
        assert rec["grad_norm"] > 0 and math.isfinite(rec["grad_norm"])
        assert ("val_loss" in rec) == (rec["step"] in (20, 30))
    assert records[-1]["val_loss"] == pytest.approx(result.final_val_loss)
    # the optimiser really used the scheduled learning rate, in every group
    assert len(applied) == 30
    for i, lrs in enumerate(applied):
        assert lrs == pytest.approx([learning_rate(i, cfg)] * len(lrs), rel=1e-12)

    saved = load(tmp_path / "model")
    model.eval()
    idx = tokens(B=2, S=16)
    assert torch.equal(saved(idx).logits, model(idx).logits)
    assert evaluate(saved, small_corpus, 2, 8, 32) == pytest.approx(result.final_val_loss, rel=1e-6)


def test_learning_rate_schedule_closed_form():
    cfg = TrainConfig(steps=110, lr=2e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(2e-4)
    assert learning_rate(4, cfg) == pytest.approx(1e-3)
    assert learning_rate(9, cfg) == pytest.approx(2e-3)
    assert learning_rate(10, cfg) == pytest.approx(2e-3)  # cosine starts at the peak
    assert learning_rate(60, cfg) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half way
    assert learning_rate(35, cfg) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert learning_rate(110, cfg) == pytest.approx(2e-4)
    assert learning_rate(500, cfg) == pytest.approx(2e-4)  # floor after the end
    lrs = [learning_rate(s, cfg) for s in range(110)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert TrainConfig(steps=300).warmup == 30 and TrainConfig(steps=5000).warmup == 100


def test_weight_decay_groups():
    model = LoopedLM(tiny_config(bias=True, qk_bias=True, tie_embeddings=False))
    groups = param_groups(model, 0.1)
    decay_of = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in decay_of  # each parameter in exactly one group
            decay_of[id(p)] = group["weight_decay"]
    names = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}
    for name, p in names.items():
        no_decay = (name.startswith(("injection.", "readout.")) or "norm" in name or "ln_" in name
                    or name.endswith("bias"))
        assert decay_of[id(p)] == (0.0 if no_decay else 0.1), name
    for name in ("injection.A_log", "injection.dt_bias", "injection.B", "readout.weight", "readout.bias",
                 "ln_f.weight", "core.0.norm_1.weight", "prelude.0.attn.qk_bias", "coda.0.mlp.fc.bias"):
        assert decay_of[id(names[name])] == 0.0, name
    for name in ("core.0.attn.c_q.weight", "prelude.0.mlp.proj.weight", "coda.0.attn.c_proj.weight",
                 "wte.weight", "lm_head.weight"):
        assert decay_of[id(names[name])] == 0.1, name
    linear = LoopedLM(tiny_config(injection="linear"))
    groups = {id(p): g["weight_decay"] for g in param_groups(linear, 0.1) for p in g["params"]}
    assert groups[id(linear.injection.W.weight)] == 0.0


def test_monitor_can_stop_training_and_is_closed(small_corpus):
    class Monitor:
        def __init__(self, model, optimizer):
            self.steps, self.closed, self.stop_requested = 0, False, False

        def close(self):
            self.closed = True

    monitors = []

    def factory(model, optimizer):
        monitors.append(Monitor(model, optimizer))
        return monitors[-1]

    def on_step(step, record):
        monitors[0].stop_requested = step >= 3

    model = LoopedLM(tiny_config(injection="none"))  # a fixed-depth model trains too
    cfg = TrainConfig(steps=50, batch_size=2, seq_len=16, eval_every=0, eval_batches=1, progress=False)
    result = train(model, small_corpus, cfg, monitor_factory=factory, on_step=on_step)
    assert result.steps == 3 and "monitor" in result.stop_reason and monitors[0].closed


def test_bad_training_inputs(small_corpus):
    model = LoopedLM(tiny_config())
    with pytest.raises(InputError, match="block_size"):
        train(model, small_corpus, TrainConfig(steps=1, seq_len=65, progress=False))
    for bad in (dict(steps=0), dict(batch_size=0), dict(lr=-1.0), dict(lr=float("nan")), dict(eval_every=-1)):
        with pytest.raises(InputError):
            train(model, small_corpus, TrainConfig(progress=False, **bad))
