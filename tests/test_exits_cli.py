"""`loopdyn exits` and `loopdyn audit --exits` end to end, in-process: exit codes, JSON, plots, bad input."""
import json

import pytest

from loopdyn.cli import main
from loopdyn.commands.exits import parse_budget
from loopdyn.models import InputError, save
from tests import ouro_reference as oref
from tests.helpers import small_loop_model

SEQ = ["--seq-len", "12", "--batch-size", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    save(small_loop_model("diagonal", d=16, perturb=0.2), root / "tiny")
    oref.make_ouro_checkpoint(root / "ouro", seed=1, gate_scale=6.0)
    return root


def run(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_exits_json_and_plots(ckpts, tmp_path, capsys):
    js, plots = tmp_path / "exits.json", tmp_path / "plots"
    code, out, err = run(capsys, "exits", ckpts / "tiny", "--budget", "1%", "--max-loops", "6", "--json", js,
                         "--plots", plots, "--criteria", "kl,latent-diff,contraction", *SEQ)
    assert code == 0, err
    assert "kl (default)" in out and "contraction (≤1%)" in out and "best depth of the probe" in out
    rec = json.loads(js.read_text())
    cal = rec["calibration"]
    assert cal["budget"] == pytest.approx(0.01) and cal["budget_loops"] == 6 and rec["horizon"] == 24
    assert set(cal["defaults"]) == {"kl", "latent-diff", "contraction"}
    assert len(rec["lens"]["per_token"]["loss"]) == 24 and len(rec["lens"]["per_token"]["loss"][0]) == 12
    assert rec["best_depth"]["probe_best"] >= 1 and len(rec["best_depth"]["interval"]) == 2
    assert sorted(p.name for p in plots.iterdir()) == ["exits_depth.png", "exits_lens.png", "exits_pareto.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.iterdir())
    assert not list(tmp_path.glob(".*.tmp"))


def test_exits_on_an_ouro_checkpoint_includes_its_gate(ckpts, tmp_path, capsys):
    code, out, err = run(capsys, "exits", ckpts / "ouro", "--horizon", "8", "--criteria", "exit-gate,kl", *SEQ)
    assert code == 0, err
    assert "exit-gate (default)" in out and "exit-gate (≤0.5%)" in out


def test_audit_exits_section(ckpts, tmp_path, capsys):
    js = tmp_path / "audit.json"
    code, out, err = run(capsys, "audit", ckpts / "tiny", "--loops", "4", "--horizon", "12", "--exits", "--json", js,
                         *SEQ)
    assert code == 0, err
    assert "VERDICT" in out and "exit criteria against the oracle" in out
    rec = json.loads(js.read_text())
    assert rec["exits"]["calibration"]["budget_loops"] == 4 and rec["exits"]["horizon"] == 12
    assert "per_token" not in rec["exits"]["lens"]


@pytest.mark.parametrize("argv, message", [
    (["--budget", "lots"], "--budget 'lots'"),
    (["--budget=-1%"], "must be ≥ 0"),
    (["--criteria", "kl,wobble"], "unknown exit criterion 'wobble'"),
    (["--criteria", "exit-gate"], "no exit_gate"),
    (["--max-loops", "8", "--horizon", "4"], "--horizon (4) must be at least --max-loops (8)"),
    (["--oracle-kl", "0"], "--oracle-kl must be > 0"),
])
def test_bad_input_is_one_line_and_exit_code_1(ckpts, capsys, argv, message):
    code, out, err = run(capsys, "exits", ckpts / "tiny", *argv, *SEQ)
    assert code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_checkpoint_and_output_over_input(ckpts, tmp_path, capsys):
    code, _, err = run(capsys, "exits", tmp_path / "nope", *SEQ)
    assert code == 1 and "nope" in err
    data = tmp_path / "data.txt"
    data.write_text("hello world " * 200)
    code, _, err = run(capsys, "exits", ckpts / "tiny", "--data", data, "--json", data, *SEQ)
    assert code == 1 and data.read_text().startswith("hello world")


def test_parse_budget():
    assert parse_budget("0.5%") == pytest.approx(0.005) and parse_budget("0.02") == 0.02
    with pytest.raises(InputError):
        parse_budget("x%")
