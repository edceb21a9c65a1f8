"""loopdyn compare: outcome criteria on synthetic curves, a two-step grid end to end, resume, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loopdyn.cli import main
from loopdyn.compare import (DIVERGE_MARGIN, EXPLOSION_RATIO, RECORD, STEEP_DROP, STEEP_T, CompareResult, RunRecord,
                             RunSpec, classify, grid, injection_norms, smoothed, state_norms, still_falling)
from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.schemas import validate as validate_schema

UNIGRAM = 3.26
MU = 4


def decaying(n=100, start=5.5, end=2.0):
    return list(end + (start - end) * np.exp(-np.arange(n) / 15))


def norms(growth_per_loop: float, n=4 * MU + 1, base=10.0):
    return [base * growth_per_loop ** t for t in range(n)]


# ---- criteria on synthetic curves ----------------------------------------------------------------

def test_a_steadily_decreasing_run_with_bounded_state_converges():
    outcome, reason, note = classify(decaying(), 2.1, UNIGRAM, norms(1.0), MU)
    assert outcome == "converged" and note == ""


def test_a_non_finite_loss_is_divergence_and_names_the_step():
    losses = decaying()
    losses[42] = float("nan")
    outcome, reason, _ = classify(losses, 2.1, UNIGRAM, norms(1.0), MU)
    assert outcome == "diverged" and "step 43" in reason


def test_a_loss_that_rises_above_its_best_by_the_margin_diverged():
    losses = decaying(80) + list(np.linspace(2.0, 2.0 + DIVERGE_MARGIN + 0.3, 40))
    assert classify(losses, 2.1, UNIGRAM, norms(1.0), MU)[0] == "diverged"
    # a rise smaller than the margin (a spike that recovers) is not divergence
    bumpy = decaying(80) + list(2.0 + 0.3 * np.sin(np.linspace(0, np.pi, 40)))
    assert classify(bumpy, 2.1, UNIGRAM, norms(1.0), MU)[0] == "converged"


def test_a_run_stalled_far_above_the_unigram_baseline_diverged():
    """It did not even learn byte frequencies and is not falling: stalled > margin above the baseline."""
    stuck = decaying(end=UNIGRAM + DIVERGE_MARGIN + 0.4)
    outcome, reason, _ = classify(stuck, UNIGRAM + 0.9, UNIGRAM, norms(1.0), MU)
    assert outcome == "diverged" and "stalled" in reason
    assert classify(stuck, None, UNIGRAM, norms(1.0), MU)[0] == "diverged"
    assert classify(decaying(), float("nan"), UNIGRAM, norms(1.0), MU)[0] == "diverged"


def noisy_curve(values, sd=0.08, seed=0):
    return list(np.asarray(values) + np.random.default_rng(seed).normal(0, sd, len(values)))


def test_a_short_run_still_falling_steeply_above_the_baseline_is_inconclusive_not_diverged():
    # 40 steps of a Parcae-like curve: ln 256 → still 0.6 nats above the baseline and falling, noisy
    short = noisy_curve(UNIGRAM - 1.2 + (5.55 - UNIGRAM + 1.2) * np.exp(-np.arange(40) / 25))
    falling, drop, t = still_falling(short)
    assert falling and drop > STEEP_DROP and t >= STEEP_T
    outcome, reason, _ = classify(short, UNIGRAM + 0.4, UNIGRAM, norms(1.0), MU)
    assert outcome == "inconclusive" and "still falling" in reason
    # the same curve trained to the end converges: the label was about length, not stability
    full = noisy_curve(UNIGRAM - 1.2 + (5.55 - UNIGRAM + 1.2) * np.exp(-np.arange(300) / 25))
    assert classify(full, UNIGRAM - 1.1, UNIGRAM, norms(1.0), MU)[0] == "converged"


def test_a_run_resting_on_the_unigram_plateau_is_inconclusive():
    # dropped from ln 256 to the byte-frequency plateau and sits there, noisy, not rising (demo --steps 80)
    plateau = noisy_curve(np.r_[np.linspace(5.5, 3.4, 15), np.full(65, UNIGRAM + 0.05)], seed=1)
    assert not still_falling(plateau)[0]
    outcome, reason, _ = classify(plateau, UNIGRAM + 0.03, UNIGRAM, norms(1.0), MU)
    assert outcome == "inconclusive" and "plateau" in reason
    # a flat curve that is not falling and sits far above the plateau is not inconclusive
    assert classify(list(np.full(80, 5.5)), 5.5, UNIGRAM, norms(1.0), MU)[0] == "diverged"


def test_still_falling_is_a_significance_test_not_noise():
    rng = np.random.default_rng(3)
    flat = list(3.0 + rng.normal(0, 0.1, 200))
    assert not still_falling(flat)[0]
    slope = list(3.0 - 0.004 * np.arange(200) + rng.normal(0, 0.1, 200))  # 0.2 nats between the last quarters
    assert still_falling(slope)[0]
    assert not still_falling([3.0, 2.9, 2.8])[0]  # too few steps to say
    # ... and a run that short is inconclusive, not diverged, whatever its loss (unless non-finite)
    assert classify([5.5, 5.4, 5.2], 5.3, UNIGRAM, norms(1.0), MU)[0] == "inconclusive"
    assert classify([5.5, 5.4, float("inf")], 5.3, UNIGRAM, norms(1.0), MU)[0] == "diverged"


def test_still_falling_t_is_welchs_statistic_by_its_formula():
    rng = np.random.default_rng(5)
    x = 3.0 - 0.002 * np.arange(120) + rng.normal(0, 0.05, 120)
    q = len(x) // 4
    a, b = x[-2 * q:-q], x[-q:]
    t = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / q + b.var(ddof=1) / q)
    falling, drop, t_got = still_falling(list(x))
    assert t_got == pytest.approx(t, rel=1e-12) and drop == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    # no spread in either quarter: any drop is certain, no drop is no evidence
    assert still_falling([3.0] * 12 + [2.0] * 4)[2] == np.inf
    assert still_falling([3.0] * 16)[2] == 0.0


def test_inconclusive_does_not_hide_an_explosion_or_a_divergence():
    short = decaying(40)
    assert classify(short, UNIGRAM + 0.5, UNIGRAM, norms(1.3), MU)[0] == "residual explosion"
    broken = short[:-1] + [float("nan")]
    assert classify(broken, UNIGRAM + 0.5, UNIGRAM, norms(1.0), MU)[0] == "diverged"
    # fixed-depth runs can be inconclusive too
    assert classify(short, UNIGRAM + 0.5, UNIGRAM, [], None)[0] == "inconclusive"


def test_geometric_state_growth_is_a_residual_explosion_and_linear_growth_is_not():
    # ρ = 1.3 per loop: ‖h_16‖/‖h_4‖ = 1.3¹² ≈ 23 > 10
    outcome, reason, _ = classify(decaying(), 2.1, UNIGRAM, norms(1.3), MU)
    assert outcome == "residual explosion" and "‖h_16‖ / ‖h_4‖" in reason
    # additive-like linear growth h_t = t·e: ratio 16/4 = 4: converged, noted as marginal
    linear = [10.0 * (t + 1) for t in range(4 * MU + 1)]
    outcome, _, note = classify(decaying(), 2.1, UNIGRAM, linear, MU)
    assert outcome == "converged" and "grows with loops" in note
    # right at the threshold
    ratio_just_above = (EXPLOSION_RATIO * 1.01) ** (1 / (3 * MU))
    assert classify(decaying(), 2.1, UNIGRAM, norms(ratio_just_above), MU)[0] == "residual explosion"


def test_a_non_finite_state_is_an_explosion():
    n = norms(1.0)
    n[9] = math.inf
    outcome, reason, _ = classify(decaying(), 2.1, UNIGRAM, n, MU)
    assert outcome == "residual explosion" and "T = 9" in reason


def test_divergence_takes_precedence_over_explosion():
    losses = decaying()
    losses[-1] = float("inf")
    assert classify(losses, 2.1, UNIGRAM, norms(2.0), MU)[0] == "diverged"


def test_fixed_depth_runs_are_judged_by_loss_only():
    assert classify(decaying(), 2.1, UNIGRAM, [], None)[0] == "converged"


def test_smoothed_is_a_trailing_mean():
    x = [1.0, 2.0, 3.0, 4.0]
    assert np.allclose(smoothed(x, 2), [1.0, 1.5, 2.5, 3.5])


def test_matrix_aggregates_seeds():
    def rec(inj, lr, seed, outcome):
        spec = RunSpec(inj, lr, seed=seed)
        return RunRecord(spec=spec.__dict__, params=1, mean_loops=4, steps=1, tokens=1, seconds=0.0,
                         losses=[1.0], val_by_loops={}, outcome=outcome)
    result = CompareResult(out=None, skipped=[], records=[
        rec("diagonal", 0.01, 0, "converged"), rec("diagonal", 0.01, 1, "converged"),
        rec("linear", 0.01, 0, "converged"), rec("linear", 0.01, 1, "residual explosion")])
    m = result.matrix()
    assert m["diagonal"]["0.01"] == "converged"
    assert m["linear"]["0.01"] == "1/2 converged, 1/2 residual explosion"


# ---- measurements --------------------------------------------------------------------------------

def test_injection_norms_match_numpy_for_each_kind():
    for injection in ("diagonal", "linear", "additive"):
        model = LoopedLM(LoopConfig.preset("tiny", injection=injection))
        rho, norm = injection_norms(model)
        A = model.injection.linear_part().A.dense().double().numpy()
        assert rho == pytest.approx(np.abs(np.linalg.eigvals(A)).max(), rel=1e-9)
        assert norm == pytest.approx(np.linalg.svd(A, compute_uv=False)[0], rel=1e-9)


def test_state_norms_follow_the_lti_closed_form_at_init():
    """At init every core block is the identity, so h_t = Ā h_{t−1} + B̄ e exactly."""
    model = LoopedLM(LoopConfig.preset("tiny", state_init="zero"))
    idx = __import__("torch").randint(0, 256, (2, 16))
    got = state_norms(model, idx, 6)
    ctx = model.encode(idx)
    a, b = 0.4472135955, 0.8047189562  # Ā₀ and Δ₀, B = I
    e = ctx.e.detach().double().numpy()
    want = [float(np.linalg.norm(b * (1 - a ** t) / (1 - a) * e, axis=-1).mean()) for t in range(7)]
    assert np.allclose(got, want, rtol=1e-5)


# ---- end to end ----------------------------------------------------------------------------------

def test_two_step_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--injections", "diagonal,linear,fixed", "--lrs", "0.01,0.05", "--steps", "2",
                 "--batch-size", "4", "--seq-len", "32", "--out", str(out), "--jobs", "1", "--no-progress"])
    assert code == 0
    for name in ("summary.json", "report.html", "loss_curves.png", "spectral_radius.png", "state_norm.png",
                 "val_vs_loops.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    validate_schema("summary", summary)  # docs/design.md §7
    assert set(summary["matrix"]) == {"diagonal", "linear", "fixed"}
    assert set(summary["matrix"]["linear"]) == {"0.01", "0.05"}
    assert len(summary["runs"]) == 6 and all(r["steps"] == 2 for r in summary["runs"])
    # same token budget for every run; parameter counts reported
    assert len({r["tokens"] for r in summary["runs"]}) == 1
    assert all(r["params"] > 0 for r in summary["runs"])
    # two steps say nothing about stability: no run is called diverged for being short
    assert {r["outcome"] for r in summary["runs"]} <= {"inconclusive", "residual explosion"}
    assert "2 step(s) are too few" in summary["runs"][0]["outcome_reason"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Convergence matrix" in html
    assert "loopdyn compare --injections diagonal,linear,fixed --lrs 0.01,0.05 --seeds 0 --steps 2" in html
    for name in ("diagonal-lr0.01-seed0", "fixed-lr0.05-seed0"):
        record = json.loads((out / "runs" / name / RECORD).read_text())
        assert len(record["losses"]) == 2 and (out / "runs" / name / "model" / "config.json").is_file()
    diag = json.loads((out / "runs" / "diagonal-lr0.01-seed0" / RECORD).read_text())
    assert diag["spectral_radius"] and max(diag["spectral_radius"]) < 1
    assert set(diag["val_by_loops"]) == {"1", "2", "4", "8", "16"}
    printed = capsys.readouterr().out
    assert "diagonal" in printed and "wrote" in printed

    # resume: nothing is redone, finished runs are untouched
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/record.json")}
    code = main(["compare", "--injections", "diagonal,linear,fixed", "--lrs", "0.01,0.05", "--steps", "2",
                 "--batch-size", "4", "--seq-len", "32", "--out", str(out), "--resume", "--no-progress"])
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/record.json")} == before
    assert "6 finished run(s) kept, 0 to do" in capsys.readouterr().out


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_input(tmp_path, capsys):
    base = ["compare", "--steps", "2", "--no-progress", "--out", str(tmp_path / "o")]
    assert "unknown injection" in _one_line_error(capsys, base + ["--injections", "diagonal,ssm"])
    assert "empty" in _one_line_error(capsys, base + ["--lrs", ","])
    assert "empty" in _one_line_error(capsys, base + ["--injections", ""])
    assert "positive" in _one_line_error(capsys, base + ["--lrs", "-0.1"])
    assert "--lrs" in _one_line_error(capsys, base + ["--lrs", "fast"])
    assert "unknown preset" in _one_line_error(capsys, base + ["--preset", "huge"])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a folder" in _one_line_error(capsys, ["compare", "--steps", "1", "--out", str(afile)])


def test_finished_runs_are_never_overwritten_and_corruption_is_reported(tmp_path, capsys):
    out = tmp_path / "o"
    run = out / "runs" / "diagonal-lr0.01-seed0"
    run.mkdir(parents=True)
    (run / RECORD).write_text('{"spec": {"injection": "diagonal"')  # a truncated record
    argv = ["compare", "--injections", "diagonal", "--lrs", "0.01", "--steps", "1", "--out", str(out),
            "--no-progress"]
    err = _one_line_error(capsys, argv)
    assert "already holds finished runs" in err and "--resume" in err
    err = _one_line_error(capsys, argv + ["--resume"])
    assert "corrupted earlier run" in err and RECORD in err
    assert (run / RECORD).read_text() == '{"spec": {"injection": "diagonal"'  # untouched


def test_grid_is_the_full_product():
    specs = grid(["diagonal", "linear"], [0.01, 0.02, 0.03], [0, 1], steps=5)
    assert len(specs) == 12 and len({s.name for s in specs}) == 12
    assert RunSpec("fixed", 0.01).config().looped is False
    assert RunSpec("fixed", 0.01).config().n_prelude == LoopConfig.preset("tiny").n_blocks


def test_a_record_with_overflowed_states_survives_resume_and_reporting(tmp_path):
    """JSON stores NaN/Inf as null; a resumed record must read them back as numbers and the
    report must still be built (an exploded run is exactly what a compare is for)."""
    from dataclasses import asdict

    from loopdyn.compare import load_record
    from loopdyn.report import summary
    from loopdyn.io import atomic_write_json, json_safe

    spec = RunSpec("linear", 0.05)
    exploded = [10.0 * 30 ** t for t in range(4 * MU)] + [math.inf]
    record = RunRecord(spec=asdict(spec), params=1, mean_loops=MU, steps=3, tokens=3, seconds=1.0,
                       losses=[5.0, 4.0, float("nan")], val_by_loops={"4": 3.0, "16": float("nan")},
                       probe_steps=[0, 3], spectral_radius=[0.6, float("inf")], spectral_norm=[0.7, float("nan")],
                       state_norms=[norms(1.0), exploded], final_state_norms=exploded, unigram_loss=UNIGRAM,
                       outcome="residual explosion")
    atomic_write_json(tmp_path / RECORD, json_safe(asdict(record)))
    back = load_record(tmp_path / RECORD)
    assert math.isnan(back.losses[2]) and math.isnan(back.final_state_norms[-1])
    assert math.isnan(back.state_norms[1][-1]) and math.isnan(back.val_by_loops["16"])
    assert classify(back.losses, 3.0, UNIGRAM, back.final_state_norms, MU)[0] == "diverged"
    data = summary(CompareResult(out=tmp_path, records=[back], skipped=[]))
    assert data["runs"][0]["state_growth"] is None and data["runs"][0]["spectral_radius_max"] == 0.6
