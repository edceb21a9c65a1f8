"""`loopdyn audit` end to end, in-process: exit codes, JSON, plots, official checkpoints, bad input."""
import json

import pytest
import torch

from loopdyn.cli import main
from loopdyn.models import LoopConfig, LoopedLM, save
from tests.parcae_reference import official_parcae_config, random_official_state_dict, write_official_checkpoint
from tests.helpers import small_loop_model

D = 32
SEQ = ["--seq-len", "16", "--no-progress"]


def tiny(injection="diagonal", perturb=0.05, **kw):
    return small_loop_model(injection, d=D, perturb=perturb, **kw)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    save(tiny(), root / "stable")
    explosive = tiny("linear")
    with torch.no_grad():
        explosive.injection.W.weight[:, :D] = 1.3 * torch.eye(D)
    save(explosive, root / "explosive")
    nan = tiny()
    with torch.no_grad():
        nan.core[0].mlp.fc.weight[0, 0] = float("nan")
    save(nan, root / "nan")
    save(LoopedLM(LoopConfig.preset("gpt-tiny", d_model=D, n_heads=2, d_mlp=2 * D, value_embeds=False)), root / "gpt")
    cfg = official_parcae_config()
    write_official_checkpoint(root / "official", cfg, random_official_state_dict(cfg, seed=0))
    return root


def run(capsys, *argv):
    code = main(["audit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_stable_checkpoint_json_and_plots(ckpts, tmp_path, capsys):
    js_path, plots = tmp_path / "audit.json", tmp_path / "plots"
    code, out, err = run(capsys, ckpts / "stable", "--loops", 4, "--horizon", 16, "--json", js_path,
                         "--plots", plots, "--strict", *SEQ)
    assert code == 0, err
    assert "VERDICT: STABLE" in out and "decided by" in out
    js = json.loads(js_path.read_text())
    assert set(js) == {"model", "injection", "trajectory", "jacobian", "lyapunov", "forecast", "gain_graph", "verdict",
                       "skipped", "normalised", "exit_gate", "phases", "precision"}
    assert js["model"]["format"] == "loopdyn" and js["forecast"]["measured_loops"] == 4
    assert len(js["forecast"]["state_norm"]) == 16
    assert sorted(p.name for p in plots.iterdir()) == ["eigenvalues.png", "jacobian.png", "lyapunov.png",
                                                      "phases.png", "trajectory.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.iterdir())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_explosive_checkpoint_exit_codes(ckpts, capsys):
    code, out, _ = run(capsys, ckpts / "explosive", "--loops", 4, "--horizon", 32, *SEQ)
    assert code == 0 and "VERDICT: EXPLOSIVE" in out
    code, _, _ = run(capsys, ckpts / "explosive", "--loops", 4, "--horizon", 32, "--strict", *SEQ)
    assert code == 3


def test_official_checkpoint(ckpts, tmp_path, capsys):
    js_path = tmp_path / "official.json"
    code, out, err = run(capsys, ckpts / "official", "--loops", 3, "--json", js_path, *SEQ)
    assert code == 0, err
    js = json.loads(js_path.read_text())
    assert js["model"]["format"] == "parcae" and js["forecast"]["loops"] == list(range(1, 13))
    assert "modulo the vocabulary" in out  # the official test config has 128 ids < 256 bytes


def test_nonfinite_weights_are_reported(ckpts, tmp_path, capsys):
    js_path = tmp_path / "nan.json"
    code, out, err = run(capsys, ckpts / "nan", "--loops", 3, "--json", js_path, *SEQ)
    assert code == 0 and "Traceback" not in err
    js = json.loads(js_path.read_text())
    assert js["verdict"] == "explosive" and js["forecast"]["evidence"][0].startswith("non-finite")
    code, _, _ = run(capsys, ckpts / "nan", "--loops", 3, "--strict", *SEQ)
    assert code == 3


@pytest.mark.parametrize("argv, message", [
    (["missing"], "no such checkpoint"),
    (["stable", "--loops", "0"], "--loops"),
    (["stable", "--loops", "100000"], "--loops"),
    (["stable", "--loops", "4", "--horizon", "2"], "--horizon"),
    (["stable", "--seq-len", "10000"], "longer than the model's context"),
    (["gpt"], "no loop"),
])
def test_bad_input_is_one_line_and_exit_1(ckpts, capsys, argv, message):
    code, out, err = run(capsys, ckpts / argv[0], *argv[1:], "--no-progress")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
