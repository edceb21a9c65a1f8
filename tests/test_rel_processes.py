"""Issue 25, classes 3 and 4: --data larger than memory trains, and no process outlives its parent.

- A 64 GiB sparse corpus trains under an address-space limit (RLIMIT_AS) of 4 GiB: batches are
  windows read by offset, the validation split is deterministic.
- `compare --jobs 2`: after kill -9 of the parent no process of its group keeps running and
  `--resume` works; SIGINT to the process group is one line and exit 130, nothing else.
- Ctrl-C while PyTorch imports, and while the process exits, is exit 130 and one line.
- A stale temporary file of any name (`.NAME.loopdyn-<dead pid>-….tmp`) is removed by the next
  write into its folder; one of a live process, or any other file, is left alone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import loopdyn.data as data_mod
from loopdyn.data import ByteStream, load_text
from loopdyn.io import atomic_write_text

LOOPDYN = [sys.executable, "-m", "loopdyn"]
TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress",
        "--set", "block_size=32", "--threads", "1"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- class 3: --data read by offset --------------------------------------------------------

def test_a_corpus_read_by_offset_gives_the_same_batches_as_in_memory(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "one.txt").write_bytes(rng.integers(32, 127, 50_000, dtype=np.uint8).tobytes())
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(30):
        (folder / f"f{i}.txt").write_bytes(rng.integers(32, 127, 3000 + 17 * i, dtype=np.uint8).tobytes())
    for path in (tmp_path / "one.txt", folder):
        memory = load_text(path)
        monkeypatch.setattr(data_mod, "IN_MEMORY_LIMIT", 0)
        stream = load_text(path)
        monkeypatch.undo()
        assert isinstance(stream.train, ByteStream) and isinstance(memory.train, np.ndarray)
        assert len(stream.train) == len(memory.train) and len(stream.val) == len(memory.val)
        assert stream.split == memory.split
        assert np.array_equal(stream.train[0:len(stream.train)], memory.train)
        assert np.array_equal(stream.val[0:len(stream.val)], memory.val)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for a, b in zip(stream.batch(4, 32, g1), memory.batch(4, 32, g2)):
            assert torch.equal(a, b)
        for (x1, y1), (x2, y2) in zip(stream.val_batches(3, 2, 16), memory.val_batches(3, 2, 16)):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


SPARSE_TRAIN = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.argv = ["loopdyn", "train", "--data", sys.argv[1], *sys.argv[2:]]
from loopdyn.cli import main
sys.exit(main())
"""


def test_a_corpus_far_larger_than_the_address_space_trains(tmp_path):
    big = tmp_path / "corpus.txt"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB, sparse: takes no disk space
        f.seek(10 << 30)
        f.write(b"def f(x):\n    return x * 2\n" * 1000)  # some text in the middle
    log = tmp_path / "log.jsonl"
    run = subprocess.run([sys.executable, "-c", SPARSE_TRAIN, str(big), *TINY, "--log", str(log)],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "68,719,476,736" not in run.stderr and "out of memory" not in run.stderr
    assert "split by position" in run.stdout and "validation" in run.stdout
    assert len(log.read_text().splitlines()) == 2
    # the validation split is deterministic: the same windows every time
    data = load_text(big)
    assert isinstance(data.val, ByteStream)
    a, b = data.val_batches(2, 2, 16), data.val_batches(2, 2, 16)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert len(data.val) == (64 << 30) - int((64 << 30) * 0.9)


# ---- class 4: processes --------------------------------------------------------------------

def _group(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(pgid) and "Z" not in line.split()[2]]


def _start_compare(tmp_path: Path, out: Path, steps: int = 100_000):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 400)
    argv = [*LOOPDYN, "compare", "--injections", "diagonal,linear", "--lrs", "0.01", "--steps", str(steps),
            "--batch-size", "2", "--seq-len", "16", "--jobs", "2", "--threads", "1", "--data", str(corpus),
            "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # both workers are training (their logs have lines)
        logs = list(out.rglob("train.jsonl")) if out.is_dir() else []  # in the runs' attempt folders
        if len(logs) == 2 and all(p.stat().st_size > 0 for p in logs):
            return proc, argv
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the workers did not start")


def test_compare_workers_die_with_a_killed_parent_and_resume_works(tmp_path):
    out = tmp_path / "out"
    proc, argv = _start_compare(tmp_path, out)
    assert len(_group(proc.pid)) >= 3  # the parent and two workers (and the resource tracker)
    proc.kill()  # kill -9 of the parent only, as the OOM killer does
    proc.wait()
    deadline = time.monotonic() + 30
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _group(proc.pid) == []
    sizes = {p: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    time.sleep(1.5)
    assert {p: p.stat().st_size for p in out.rglob("*") if p.is_file()} == sizes  # nobody writes any more
    argv = [a if a != "100000" else "2" for a in argv] + ["--resume"]
    again = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "in use by another" not in again.stderr


def test_sigint_to_the_compare_group_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "out"
    proc, _ = _start_compare(tmp_path, out)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["loopdyn compare: interrupted"]
    time.sleep(1)
    assert _group(proc.pid) == []


INTERRUPT_AT = r"""
import os, signal, sys, threading, time
where = sys.argv[1]
sys.argv = ["loopdyn", *sys.argv[2:]]
if where == "import":  # Ctrl-C in the middle of PyTorch's import
    import builtins
    real = builtins.__import__
    def slow(name, *a, **k):
        if name == "torch._C" and not getattr(slow, "done", False):
            slow.done = True
            os.kill(os.getpid(), signal.SIGINT)
        return real(name, *a, **k)
    builtins.__import__ = slow
if where == "exit":  # Ctrl-C while the interpreter exits, after the command's last line
    import atexit
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))
from loopdyn.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("where", ["import", "exit"])
def test_ctrl_c_while_torch_imports_or_at_exit_is_one_line_and_130(tmp_path, where):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    run = subprocess.run([sys.executable, "-c", INTERRUPT_AT, where, "train", "--data", str(corpus), *TINY],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 130, (run.returncode, run.stderr[-2000:])
    assert run.stderr.strip().splitlines()[-1] == "loopdyn train: interrupted", run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
    if where == "import":
        assert "tokens/s" not in run.stdout  # the interrupt was not swallowed: no training ran


def test_a_stale_temporary_file_of_any_name_is_removed_by_the_next_write(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    stale = [tmp_path / f".x.json.loopdyn-{dead}-abcd1234.tmp", tmp_path / f".other.csv.loopdyn-{dead}-00ff.tmp"]
    live = tmp_path / f".y.json.loopdyn-{os.getpid()}-abcd.tmp"
    foreign = [tmp_path / f".x.json.loopdyn-{dead}-abcd.tmpx", tmp_path / f"x.json.loopdyn-{dead}-ab.tmp",
               tmp_path / ".x.json.tmp"]
    for p in stale + [live] + foreign:
        p.write_text("left behind")
    atomic_write_text(tmp_path / "new.txt", "hello")
    assert not any(p.exists() for p in stale)
    assert live.exists() and all(p.exists() for p in foreign)
    assert (tmp_path / "new.txt").read_text() == "hello"
