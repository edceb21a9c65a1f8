"""Issue 25, class 1: an output never overwrites an input.

For every command and every pair (output option, input file or folder of that command), spelled
directly, through a symlink, through a hard link or with `..` in it, the command refuses in one
line before any work and every input is byte-identical afterwards (a hypothesis property)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loopdyn.models as models_pkg
from loopdyn.cli import main
from loopdyn.models import save
from tests import huginn_reference as huginn_ref
from tests.test_models import make_model

FAST = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress",
        "--set", "block_size=32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    ck = root / "ck"
    save(make_model(seed=0, block_size=64), ck)
    sharded = huginn_ref.make_huginn_checkpoint(root / "sharded", layout="sharded")
    corpus = root / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    folder = root / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"t{i}.txt").write_text(f"text {i}\n" * 300)
    csv = root / "sweep.csv"
    csv.write_text("loops,loss\n" + "".join(f"{t},{1 + 2.0 ** -t:.6f}\n" for t in range(1, 9)))
    user = root / "mine.py"
    user.write_text(textwrap.dedent("""\
        from tests.test_models import make_model
        def build():
            return make_model(seed=0, block_size=64)
    """))
    links = root / "links"
    links.mkdir()
    return dict(root=root, ck=ck, sharded=Path(sharded), corpus=corpus, folder=folder, csv=csv, user=user,
                links=links)


def _inputs(w):
    """command → [(argv without outputs, [input paths it reads])]"""
    ck, sh = w["ck"], w["sharded"]
    ck_files = [p for p in (ck, ck / "config.json", ck / "model.safetensors", ck / ".loopdyn-backup",
                            ck / ".loopdyn-backup" / "config.json", ck / ".loopdyn-backup" / "model.safetensors")
                if p.exists()]
    sh_files = [sh] + sorted(p for p in sh.iterdir())
    folder_files = [w["folder"]] + sorted(w["folder"].iterdir())
    return {
        "train": [(["train", *FAST, "--data", str(w["corpus"])], [w["corpus"]]),
                  (["train", *FAST, "--data", str(w["folder"])], folder_files)],
        "audit": [(["audit", str(ck), "--data", str(w["corpus"])], ck_files + [w["corpus"]]),
                  (["audit", str(ck / "config.json")], ck_files),
                  (["audit", str(sh)], sh_files),
                  (["audit", f"{w['user']}:build"], [w["user"]])],
        "sweep-loops": [(["sweep-loops", str(ck), "--data", str(w["folder"])], ck_files + folder_files),
                        (["sweep-loops", str(sh)], sh_files)],
        "fit": [(["fit", str(w["csv"]), "--law", "testtime"], [w["csv"]])],
        "compare": [(["compare", "--steps", "1", "--data", str(w["folder"])], folder_files)],
    }


OUTPUTS = {"train": ["--log", "--alerts", "--save", "--tensorboard", "--plots"], "audit": ["--json", "--plots"],
           "sweep-loops": ["--csv"], "fit": ["--json", "--plot"], "compare": ["--out"]}


def _digest(paths) -> dict[str, str]:
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def no_work():
    def work(*a, **k):
        raise AssertionError("the work started before the outputs were checked")
    import loopdyn.commands.train as train_cmd
    import loopdyn.compare as compare_mod
    import loopdyn.data as data_mod
    import loopdyn.inputs as inputs_mod
    from loopdyn.cli import build_parser

    build_parser()  # every command module imported first: none binds a patched name for good

    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((train_cmd, "load_text"), (train_cmd, "LoopedLM"), (data_mod, "load_text"),
                             (compare_mod, "run_one"), (models_pkg, "load"), (inputs_mod, "load_model")):
            mp.setattr(module, name, work)
        yield


def _spell(path: Path, how: str, links: Path, n: int) -> str:
    if how == "direct":
        return str(path)
    if how == "dotdot":
        return str(path.parent / ".." / path.parent.name / path.name)
    link = links / f"l{n}"
    if how == "symlink":
        os.symlink(path, link)
    else:  # a hard link: a different name for the same inode (files only)
        os.link(path, link)
    return str(link)


_counter = iter(range(10**9))


@settings(max_examples=80)
@given(data=st.data())
def test_an_output_is_never_an_input(world, data):
    inputs = _inputs(world)
    command = data.draw(st.sampled_from(sorted(inputs)), label="command")
    argv, readable = data.draw(st.sampled_from(inputs[command]), label="invocation")
    option = data.draw(st.sampled_from(OUTPUTS[command]), label="output option")
    target = data.draw(st.sampled_from(readable), label="input")
    hows = ["direct", "dotdot", "symlink"] + (["hardlink"] if target.is_file() else [])
    how = data.draw(st.sampled_from(hows), label="spelled")
    before = _digest([world["root"] / n for n in ("ck", "sharded", "corpus.txt", "texts", "sweep.csv", "mine.py")])
    names_before = sorted(str(p) for p in world["root"].rglob("*") if "links" not in p.parts)
    out = _spell(target, how, world["links"], next(_counter))
    err = io.StringIO()
    try:
        with no_work(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([*argv, option, out])
    finally:
        if how in ("symlink", "hardlink"):
            os.unlink(out)
    lines = err.getvalue().strip().splitlines()
    assert code == 1, (argv, option, out, err.getvalue())
    assert len(lines) == 1 and option in lines[0], lines
    assert _digest([world["root"] / n for n in ("ck", "sharded", "corpus.txt", "texts", "sweep.csv",
                                                "mine.py")]) == before
    assert sorted(str(p) for p in world["root"].rglob("*") if "links" not in p.parts) == names_before


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_audit_and_sweep_refuse_the_checkpoints_own_files_and_it_still_loads(world, capsys, name):
    """The issue's two examples, without any monkeypatching: refused, nothing touched, still loads."""
    ck = world["ck"]
    before = _digest([ck])
    assert main(["audit", str(ck), "--json", str(ck / name), "--no-progress"]) == 1
    assert main(["sweep-loops", str(ck), "--csv", str(ck / name), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("an output may not overwrite an input" in line for line in err), err
    assert _digest([ck]) == before
    models_pkg.load(ck)


def test_a_new_file_beside_the_checkpoint_is_still_allowed(world, tmp_path):
    from loopdyn.iocheck import check_outputs_against_inputs, checkpoint_input, data_input

    # a fresh audit.json inside the checkpoint folder, or a log inside a folder of a --data file: fine
    check_outputs_against_inputs({"--json": (world["ck"] / "audit.json", "file")},
                                 [checkpoint_input("PATH", world["ck"])])
    check_outputs_against_inputs({"--log": (world["root"] / "log.jsonl", "file")},
                                 [data_input("--data", world["corpus"])])
