"""Issue 9: files are sacred. `save` touches only its own two files, in any folder (`.` and the
working directory too), with plain-write permissions, no temporary file left on any exit path
(kill -9 included, cleaned by the next save); a missing checkpoint is an error and a fallback
to the backup copy is announced; every output path is checked before the work; JSON Lines
never end in half a line, full disk included; configs are bounded before anything is
allocated; compare keeps its grid honest."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import loopdyn.models as models_pkg
from loopdyn.cli import main
from loopdyn.compare import RunRecord, RunSpec, grid, prepare_out
from loopdyn.models import CheckpointError, ConfigError, InputError, LoopConfig, LoopedLM, load, save
from loopdyn.io import (JsonlWriter, OutLock, WriteError, atomic_write_text, remove_stale_temps,
                        write_file_atomically, write_whole)
from tests.test_models import make_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress",
        "--set", "block_size=32"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same(a: LoopedLM, b: LoopedLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line_error(capsys, argv, *words) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    assert ".tmp" not in lines[0] and "loopdyn-" not in lines[0].split(":")[-1]
    return lines[0]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x * 2\n" * 200)
    return path


# ---- save keeps everything else --------------------------------------------------------------

def test_save_writes_only_its_own_files_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "log.jsonl").write_text('{"step": 1}\n')
    (folder / "sub" / "notes.md").write_text("mine")
    (folder / ".hidden").write_text("also mine")
    before = _files(folder)
    first, second = make_model(seed=1), make_model(seed=2)
    save(first, folder)
    save(second, folder)  # replace
    after = _files(folder)
    assert set(after) == set(before) | {"config.json", "model.safetensors"}
    assert {k: after[k] for k in before} == before
    assert _same(second, load(folder))


def test_save_into_dot_and_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("precious")
    model = make_model(seed=3)
    save(model, ".")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "keep.txt", "model.safetensors"]
    save(make_model(seed=4), os.getcwd())
    save(model, Path.cwd())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "keep.txt", "model.safetensors"]
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert _same(model, load("."))


@pytest.mark.parametrize("name,content", [("config.json", '{"model_type": "llama"}'),
                                          ("config.json", "not even json"),
                                          ("model.safetensors", "a user's weights")])
def test_save_never_overwrites_a_file_loopdyn_did_not_write(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(CheckpointError, match=f"{name}.*not written by loopdyn"):
        save(make_model(), tmp_path)
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == content


def test_permissions_are_those_of_a_plain_write(tmp_path):
    old = os.umask(0o027)
    try:
        save(make_model(), tmp_path / "ckpt")
        atomic_write_text(tmp_path / "new.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for p in (tmp_path / "ckpt" / "config.json", tmp_path / "ckpt" / "model.safetensors", tmp_path / "new.txt"):
        assert mode(p) == mode(tmp_path / "plain.txt") == 0o640, p
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain_dir")
    # overwriting an existing file keeps its mode, as open(path, "w") would
    os.chmod(tmp_path / "new.txt", 0o600)
    atomic_write_text(tmp_path / "new.txt", "y")
    assert mode(tmp_path / "new.txt") == 0o600 and (tmp_path / "new.txt").read_text() == "y"


def _fail_weights(monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(safetensors.torch, "save_file", broken)


def _interrupt_on_commit(monkeypatch, which: int):
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == which:
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fault", ["disk-full", "ctrl-c-backup", "ctrl-c-first-rename", "ctrl-c-second-rename"])
def test_an_interrupted_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch, fault):
    folder = tmp_path / "ckpt"
    old = make_model(seed=1)
    save(old, folder)
    (folder / "mine.txt").write_text("x")
    before = _files(folder)
    if fault == "disk-full":
        _fail_weights(monkeypatch)
        expected = InputError
    else:
        # renames: the backup folder, then the weights, then the config
        _interrupt_on_commit(monkeypatch, {"ctrl-c-backup": 1, "ctrl-c-first-rename": 2, "ctrl-c-second-rename": 3}[fault])
        expected = KeyboardInterrupt
    with pytest.raises(expected) as info:
        save(make_model(seed=2), folder)
    monkeypatch.undo()
    if fault == "disk-full":
        assert str(folder / "model.safetensors") in str(info.value) and ".tmp" not in str(info.value)
    assert sorted(os.listdir(folder)) == sorted(before)  # no temporary file, no backup left
    assert _files(folder) == before
    assert _same(old, load(folder))


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import loopdyn.models.checkpoint as ck
    from tests.test_models import make_model
    where = sys.argv[2]
    real = os.replace
    if where == "between-renames":
        def replace(src, dst):
            if str(dst).endswith("config.json"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.replace = replace
    else:  # while the weights are being written
        import safetensors.torch
        def save_file(tensors, filename, metadata=None):
            open(filename, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.save_file = save_file
    ck.save(make_model(seed=2), sys.argv[1])
""")


@pytest.mark.parametrize("where", ["while-writing", "between-renames"])
def test_kill_9_during_save(tmp_path, capfd, where):
    folder = tmp_path / "ckpt"
    old = make_model(seed=1)
    save(old, folder)
    (folder / "log.jsonl").write_text("{}\n")
    result = subprocess.run([sys.executable, "-c", _KILLER, str(folder), where], cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL
    left = sorted(os.listdir(folder))
    stale = [n for n in left if ".loopdyn-" in n and n.endswith(".tmp")]
    assert stale, left  # the killed process left its (recognisably named) temporary file
    capfd.readouterr()
    loaded = load(folder)  # the old checkpoint, whole
    assert _same(old, loaded)
    err = capfd.readouterr().err
    if where == "between-renames":  # new weights, old config: the backup copy is used, and said so
        assert "interrupted" in err and ".loopdyn-backup" in err
    else:
        assert err == ""
    new = make_model(seed=3)
    save(new, folder)  # the next save cleans up after the killed one
    assert sorted(os.listdir(folder)) == ["config.json", "log.jsonl", "model.safetensors"]
    assert _same(new, load(folder))


def test_a_checkpoint_that_is_gone_is_an_error_even_with_an_old_copy_beside_it(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    save(make_model(seed=1), folder)
    shutil.copytree(folder, tmp_path / ".ckpt.old")  # what an older loopdyn's interrupted save left
    shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(folder)
    _one_line_error(capsys, ["audit", str(folder)], folder, "no such checkpoint")


def test_config_and_weights_from_different_saves_without_a_backup_is_an_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save(make_model(seed=1), a)
    save(make_model(seed=2), b)
    shutil.copy(b / "config.json", a / "config.json")
    with pytest.raises(CheckpointError, match="different saves"):
        load(a)


def test_train_save_keeps_the_log_it_wrote_in_the_same_folder(tmp_path, corpus, capsys, monkeypatch):
    """The README's `loopdyn train … --save runs/x --log runs/x/log.jsonl`."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--data", str(corpus), *FAST, "--save", "runs/x", "--log", "runs/x/log.jsonl"])
    assert code == 0, capsys.readouterr().err
    lines = (tmp_path / "runs/x/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert sorted(os.listdir(tmp_path / "runs/x")) == ["config.json", "log.jsonl", "model.safetensors"]
    # and `--save .` in a working directory full of the user's files
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["train", "--data", str(corpus), *FAST, "--save", "."]) == 0
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "corpus.txt").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    load(tmp_path)


# ---- every output path checked before the work --------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Any real work (reading data, building or loading a model) fails the test."""
    def work(*a, **k):
        raise AssertionError("the work started before the output paths were checked")
    import loopdyn.commands.train as train_cmd
    import loopdyn.data as data_mod
    import loopdyn.compare as compare_mod  # the run store looks run_one up here (loopdyn.gridstore)

    monkeypatch.setattr(train_cmd, "load_text", work)
    monkeypatch.setattr(train_cmd, "LoopedLM", work)
    monkeypatch.setattr(data_mod, "load_text", work)
    monkeypatch.setattr(compare_mod, "run_one", work)
    monkeypatch.setattr(models_pkg, "load", work)


@pytest.fixture
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "model"
    save(make_model(seed=0, block_size=64), path)
    return path


def test_bad_output_paths_cost_nothing(tmp_path, capsys, no_work, ckpt, corpus):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    cases = [
        (["train", *FAST, "--log", str(a_file / "log.jsonl")], a_file / "log.jsonl"),
        (["train", *FAST, "--log", str(a_dir)], a_dir),
        (["train", *FAST, "--alerts", str(a_dir)], a_dir),
        (["train", *FAST, "--save", str(a_file)], a_file),
        (["train", *FAST, "--save", str(a_file / "sub")], a_file / "sub"),
        (["train", *FAST, "--log", str(corpus), "--data", str(corpus)], corpus),
        (["train", *FAST, "--log", str(tmp_path / "same"), "--alerts", str(tmp_path / "same")], tmp_path / "same"),
        (["audit", str(ckpt), "--json", str(a_dir)], a_dir),
        (["audit", str(ckpt), "--plots", str(a_file)], a_file),
        (["sweep-loops", str(ckpt), "--csv", str(a_dir)], a_dir),
        (["compare", "--steps", "1", "--out", str(a_file)], a_file),
        (["demo", "--steps", "1", "--out", str(a_file)], a_file),
        (["fit", str(corpus), "--law", "testtime", "--json", str(a_dir)], a_dir),
    ]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        os.chmod(locked, 0o500)
        cases.append((["audit", str(ckpt), "--json", str(locked / "a.json")], locked))
    for argv, path in cases:
        _one_line_error(capsys, argv, path)
    assert a_file.read_text() == "x" and os.listdir(a_dir) == []


def test_write_errors_name_the_users_path_never_a_temporary_name(tmp_path):
    target = tmp_path / "out" / "audit.json"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    with pytest.raises(WriteError) as info:
        write_file_atomically(target, full)
    assert str(info.value) == f"{target}: cannot write: no space left on device (disk full)"
    assert os.listdir(target.parent) == []


def test_a_full_disk_on_an_output_is_one_line_exit_1(tmp_path, capsys, ckpt, monkeypatch):
    import loopdyn.io as fileio

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileio.os, "fsync", fsync)
    out = tmp_path / "audit.json"
    _one_line_error(capsys, ["audit", str(ckpt), "--json", str(out), "--loops", "2", "--horizon", "2",
                             "--lyapunov-k", "0", "--seq-len", "8", "--no-progress"], out, "disk full")
    assert os.listdir(tmp_path) == []


# ---- JSON Lines: never half a line -------------------------------------------------------------

class ShortWriter:
    """A raw file that accepts only `room` more bytes, then writes short (a filling disk)."""

    def __init__(self, room: int):
        self.data = bytearray(b'{"step": 0}\n')
        self.room = room

    def seek(self, offset, whence=0):
        return len(self.data)

    def write(self, b):
        n = min(len(b), self.room)
        self.data += bytes(b[:n])
        self.room -= n
        if n == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def truncate(self, size):
        del self.data[size:]


@pytest.mark.parametrize("room", [0, 1, 7, 20])
def test_a_short_write_is_cut_back_to_whole_lines(room):
    f = ShortWriter(room)
    line = b'{"step": 1, "loss": 2.5}\n'
    with pytest.raises(WriteError, match="disk full"):
        write_whole(f, line, "log.jsonl")
    assert bytes(f.data) == b'{"step": 0}\n'
    ok = ShortWriter(100)
    write_whole(ok, line, "log.jsonl")  # a write in two pieces is still one whole line
    assert bytes(ok.data).endswith(line)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_jsonl_writer_on_dev_full():
    writer = JsonlWriter("/dev/full", fresh=False)
    with pytest.raises(WriteError, match="/dev/full.*disk full"):
        writer.write({"step": 1})
    writer.close()


_FSIZE = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit is short, then EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    from loopdyn.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_log_that_hits_the_file_size_limit_keeps_whole_lines(tmp_path, corpus):
    """A real short write from the kernel: the log ends in a whole line; one line, exit 1."""
    log = tmp_path / "log.jsonl"
    argv = ["train", "--data", str(corpus), *FAST, "--steps", "30", "--log", str(log)]
    result = subprocess.run([sys.executable, "-c", _FSIZE, "1000", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(log) in lines[0] and "Traceback" not in result.stderr, result.stderr
    text = log.read_text()
    assert 0 < len(text) <= 1000 and text.endswith("\n")
    steps = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps == list(range(1, len(steps) + 1))


# ---- configs bounded before anything is allocated -------------------------------------------

@pytest.fixture
def nothing_built(monkeypatch):
    import loopdyn.models.checkpoint as ck
    import loopdyn.commands.train as train_cmd

    def build(*a, **k):
        raise AssertionError("a model was allocated")
    monkeypatch.setattr(ck, "LoopedLM", build)
    monkeypatch.setattr(train_cmd, "LoopedLM", build)


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("changes,words", [({"n_core": 1_000_000}, ["n_core", "parameters"]),
                                           ({"vocab_size": 10**9}, ["parameters"]),
                                           ({"block_size": 10**12}, ["parameters"])])
def test_absurd_configs_are_refused_before_any_allocation(tmp_path, capsys, nothing_built, changes, words):
    folder = tmp_path / "ckpt"
    save(make_model(), folder)
    _edit_config(folder, **changes)
    assert (folder / "config.json").stat().st_size < 3000
    with pytest.raises(CheckpointError, match="parameters"):
        load(folder)
    _one_line_error(capsys, ["audit", str(folder)], folder, "parameters")
    if "n_core" in changes:
        _one_line_error(capsys, ["train", *FAST, "--set", "n_core=1000000"], "parameters", "memory")
    if "vocab_size" in changes:
        _one_line_error(capsys, ["train", *FAST, "--set", "vocab_size=1000000000"], "parameters", "memory")


def test_a_config_larger_than_its_weights_file_is_refused(tmp_path, nothing_built):
    folder = tmp_path / "ckpt"
    save(make_model(), folder)
    _edit_config(folder, n_core=40)  # a few MB of parameters: fits in memory, not in the file
    with pytest.raises(CheckpointError, match="model.safetensors: refused: its .* bytes cannot hold"):
        load(folder)


def test_the_memory_bound(monkeypatch, capsys, corpus):
    monkeypatch.setenv("LOOPDYN_MEMORY_LIMIT", str(2**20))  # 1 MiB: the tiny model trains in ~4 MiB
    _one_line_error(capsys, ["train", "--data", str(corpus), *FAST], "memory available")
    cfg = LoopConfig.preset("tiny")
    with pytest.raises(ConfigError, match="memory"):
        cfg.check_fits(factor=4.0)
    monkeypatch.setenv("LOOPDYN_MEMORY_LIMIT", str(2**30))
    assert cfg.check_fits(factor=4.0) == cfg.model_bytes()


@pytest.mark.parametrize("overrides", [{}, {"injection": "linear", "bias": True}, {"injection": "additive"},
                                       {"injection": "none"}, {"tie_embeddings": False, "qk_bias": True,
                                                               "mlp": "swiglu", "norm": "layernorm",
                                                               "block": "sandwich"},
                                       {"n_kv_heads": 2, "d_state": 128, "n_state_heads": 8, "value_embeds": False,
                                        "n_prelude": 3, "n_core": 3, "n_coda": 2, "injection": "linear"},
                                       {"mean_loops": 7, "backprop_loops": 3, "n_core": 3}])
def test_param_count_is_exact_without_allocating(overrides):
    cfg = LoopConfig.preset("tiny", **overrides)
    with torch.device("meta"):
        model = LoopedLM(cfg)
    assert cfg.param_count() == model.num_params()
    assert cfg.param_count(exact=False) <= cfg.param_count()
    rope = model.rope.numel()
    assert cfg.model_bytes() == 4 * (model.num_params() + rope)


from hypothesis import given, strategies as st  # noqa: E402


@given(st.sampled_from(["diagonal", "linear", "additive", "none"]), st.integers(1, 3), st.integers(0, 3),
       st.integers(0, 3), st.sampled_from([(32, 2), (64, 4), (64, 2), (96, 3)]), st.booleans(), st.booleans(),
       st.booleans(), st.sampled_from(["relu2", "swiglu"]), st.sampled_from(["rmsnorm", "layernorm"]),
       st.integers(1, 9), st.integers(8, 300))
def test_param_count_property(injection, n_prelude, n_core, n_coda, width, tied, bias, value_embeds, mlp, norm,
                              mean_loops, vocab):
    """The arithmetic count equals the parameters of the model built on the meta device."""
    d, heads = width
    if injection != "none" and n_core == 0:
        n_core = 1
    cfg = LoopConfig.preset("tiny", injection=injection, n_prelude=n_prelude, n_core=n_core, n_coda=n_coda,
                            d_model=d, n_heads=heads, d_mlp=3 * d, tie_embeddings=tied, bias=bias,
                            value_embeds=value_embeds, mlp=mlp, norm=norm, mean_loops=mean_loops, vocab_size=vocab)
    with torch.device("meta"):
        model = LoopedLM(cfg)
    assert cfg.param_count() == model.num_params()


@pytest.mark.parametrize("name,published", [("parcae-140m", 144_323_136), ("parcae-370m", 388_003_328),
                                            ("parcae-770m", 776_655_680), ("parcae-1.3b", 1_338_591_744)])
def test_param_count_matches_the_published_counts(name, published):
    """reference/parcae-checkpoint-format.md §7.2, counted without building the model."""
    assert LoopConfig.preset(name).param_count() == published


def _official(tmp_path, **overrides) -> Path:
    from tests import parcae_reference as ref

    folder = tmp_path / "official"
    folder.mkdir()
    cfg = dict(ref.official_parcae_config(), **overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.pt").write_bytes(b"\0" * 64)
    return folder


@pytest.mark.parametrize("field,value,words", [
    ("n_embd", "64", ["n_embd", "integer"]), ("n_embd", 64.5, ["n_embd", "integer"]),
    ("n_embd", True, ["n_embd", "integer"]), ("bias", "yes", ["bias", "true or false"]),
    ("norm_eps", "1e-5", ["norm_eps", "number"]), ("padding_multiple", 0, ["padding_multiple", "≥ 1"]),
    ("mean_recurrence", [8], ["mean_recurrence", "integer"]), ("injection_type", 3, ["injection_type", "string"]),
    ("rope_settings", {"rope_base": "big"}, ["rope_settings.rope_base", "number"]),
    ("n_layers_in_coda", -1, ["n_layers_in_coda", "≥ 0"]),
])
def test_official_configs_are_type_checked_field_by_field(tmp_path, capsys, field, value, words):
    folder = _official(tmp_path, **{field: value})
    with pytest.raises(CheckpointError) as info:
        load(folder)
    for w in words:
        assert w in str(info.value)
    _one_line_error(capsys, ["audit", str(folder)], field)


@pytest.mark.parametrize("dtype,kind", [(torch.int64, "integer"), (torch.bool, "boolean"),
                                        (torch.complex64, "complex"), (torch.int8, "integer")])
def test_integer_boolean_and_complex_weights_are_refused_by_name(tmp_path, dtype, kind):
    from tests import parcae_reference as ref

    folder = tmp_path / "official"
    cfg = ref.official_parcae_config()
    state = ref.random_official_state_dict(cfg, seed=1)
    state["transformer.wte.weight"] = state["transformer.wte.weight"].to(dtype)
    ref.write_official_checkpoint(folder, cfg, state)
    with pytest.raises(CheckpointError, match=f"'transformer.wte.weight' is {kind}"):
        load(folder)
    # and in loopdyn's own format
    from safetensors.torch import load_file, save_file

    if dtype != torch.complex64:
        own = save(make_model(seed=0), tmp_path / "own")
        weights = load_file(own / "model.safetensors")
        weights["wte.weight"] = weights["wte.weight"].to(dtype)
        meta = json.loads((own / "config.json").read_text())
        save_file(weights, str(own / "model.safetensors"), metadata={"format": "loopdyn", "save_id": meta["save_id"]})
        with pytest.raises(CheckpointError, match=f"'wte.weight' is {kind}"):
            load(own)


# ---- compare keeps its grid honest --------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [(["--lrs", "0.01,0.01"], ["--lrs", "0.01", "twice"]),
                                        (["--lrs", "0.01,1e-2"], ["--lrs", "0.01"]),
                                        (["--seeds", "0,1,0"], ["--seeds", "0"]),
                                        (["--injections", "linear,linear"], ["--injections", "linear"])])
def test_duplicate_grid_values_are_refused(tmp_path, capsys, no_work, argv, words):
    out = tmp_path / "cmp"
    _one_line_error(capsys, ["compare", "--steps", "1", "--out", str(out), *argv], *words)
    assert not (out / "runs").exists()


def _stored_run(out: Path, spec: RunSpec) -> None:
    run = out / "runs" / spec.name
    run.mkdir(parents=True)
    record = RunRecord(spec=asdict(spec), params=1, mean_loops=4, steps=spec.steps, tokens=1, seconds=1.0,
                       losses=[1.0] * spec.steps, val_by_loops={"4": 1.0}, outcome="converged")
    (run / "record.json").write_text(json.dumps(asdict(record)))


def test_resume_refuses_runs_made_with_other_settings(tmp_path, capsys, no_work):
    out = tmp_path / "cmp"
    _stored_run(out, RunSpec("diagonal", 0.01, steps=80))
    specs = grid(["diagonal"], [0.01], [0], steps=5)
    with pytest.raises(Exception) as info:
        prepare_out(out, specs, resume=True)
    message = str(info.value)
    assert "diagonal-lr0.01-seed0" in message and "steps 80 there, 5 now" in message
    _one_line_error(capsys, ["compare", "--injections", "diagonal", "--lrs", "0.01", "--steps", "5",
                             "--out", str(out), "--resume"], "diagonal-lr0.01-seed0", "steps 80")
    # the same settings are kept, not redone
    todo, done = prepare_out(out, grid(["diagonal"], [0.01], [0], steps=80), resume=True)
    assert todo == [] and len(done) == 1


_HOLDER = textwrap.dedent("""
    import sys, time
    from loopdyn.io import OutLock
    with OutLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_one_process_per_out_folder_and_a_dead_owner_lock_is_taken_over(tmp_path, capsys, no_work):
    out = tmp_path / "cmp"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(capsys, ["compare", "--steps", "1", "--out", str(out), "--resume"],
                               out, "in use", f"pid {holder.pid}")
        assert "another loopdyn process" in line
        with pytest.raises(Exception, match="in use"):
            OutLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up (kill -9): its lock file is still there, and is taken over
    assert (out / OutLock.NAME).read_text().strip() == str(holder.pid)
    with OutLock(out) as lock:
        assert (out / OutLock.NAME).read_text().strip() == str(os.getpid())
        with OutLock(out):  # the same process may nest
            pass
        assert lock.path.exists()
    assert not (out / OutLock.NAME).exists()


def test_stale_temporary_files_of_live_processes_are_left_alone(tmp_path):
    mine = tmp_path / f".x.json.loopdyn-{os.getpid()}-abcd.tmp"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    theirs = tmp_path / f".x.json.loopdyn-{int(dead.stdout)}-abcd.tmp"
    users = tmp_path / ".x.json.tmp"
    for p in (mine, theirs, users):
        p.write_text("")
    assert remove_stale_temps(tmp_path) == [theirs]
    assert mine.exists() and users.exists()


def test_a_safetensors_write_error_names_the_users_file(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        raise RuntimeError(f"Error while serializing: IoError(No space left on device) at {filename}")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(CheckpointError) as info:
        save(make_model(), tmp_path / "ckpt")
    assert str(tmp_path / "ckpt" / "model.safetensors") in str(info.value) and ".tmp" not in str(info.value)
    assert not (tmp_path / "ckpt").exists()
