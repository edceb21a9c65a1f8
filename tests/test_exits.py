"""Issue 23: exit criteria, the oracle, the per-loop lens and the best depth, against ground truth
by construction (tests/exits_cases.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from loopdyn.dynamics.exits import (CRITERIA, DEFAULTS, HUGINN, best_depth, calibrate, check_criteria, criterion_values, exit_loops,
                                    exits, loop_signals, oracle_loops, predicted_distance)
from loopdyn.dynamics.exits.calibrate import pareto_front, pick_for_budget
from loopdyn.dynamics.exits.criteria import FIRST, WINDOW
from loopdyn.dynamics.loopmap import DynamicsError
from loopdyn.models import LoopAdapter
from tests import exits_cases as cases


def probe(B, S, V=12, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# ---- the contraction criterion: a contraction with a known rate ------------------------------------

RATES = torch.tensor([[0.2, 0.5, 0.7, 0.85], [0.3, 0.6, 0.8, 0.9]])


def expected_contraction_exit(q: float, eps: float, T: int) -> int:
    """From h_0 = 0: ‖h_t − h*‖ = q^t ‖h*‖, ‖h_t‖ = (1 − q^t)‖h*‖, r_t = (1 − q) q^{t−1} h*, so the
    value is q^t/(1 − q^t), known from loop FIRST on."""
    for t in range(FIRST, T + 1):
        if q ** t / (1 - q ** t) < eps:
            return t
    return T


@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-6])
def test_contraction_criterion_exits_exactly_where_the_closed_form_says(eps):
    model = cases.contraction(RATES)
    sig = loop_signals(model, probe(2, 4), 160)
    got = exit_loops(sig, "contraction", eps, max_loops=160)
    want = [expected_contraction_exit(float(q), eps, 160) for q in RATES.flatten()]
    assert got.tolist() == want
    assert len(set(want)) >= 5  # the rates give different exit loops


def test_contraction_bound_holds_for_every_token_and_loop():
    """The predicted distance ‖r_t‖·q/(1−q)/‖h_t‖ bounds the true relative distance to h*: exactly
    (equality) for a one-rate contraction; with the Jacobian rate for a many-rate one, where the
    residual ratio alone underestimates q early and the bound fails."""
    model = cases.contraction(RATES)
    sig = loop_signals(model, probe(2, 4), 60, h0=torch.zeros(2, 4, 6, dtype=torch.float64))
    qs = RATES.to(torch.float64).flatten().numpy()
    true = np.stack([qs ** t / (1 - qs ** t) for t in range(1, 61)])  # ‖h_t − h*‖/‖h_t‖
    v = predicted_distance(sig)
    known = np.isfinite(v)
    assert known[FIRST - 1:].all() and not known[:FIRST - 1].any()
    exact = known & (true > 1e-10)  # below, h_t = h* to round-off
    assert exact.sum() > 200
    np.testing.assert_allclose(v[exact], true[exact], rtol=1e-7, atol=1e-14)  # float64 round-off in r_t

    g = torch.Generator().manual_seed(3)
    rates = torch.rand(2, 4, 6, generator=g, dtype=torch.float64) * 0.5 + 0.1
    rates[..., 0] = 0.93  # a slow mode the initial error barely excites
    many = cases.contraction(rates, seed=4)
    e = many.encode(None)["e"]
    h0 = e.clone()
    h0[..., 0] -= 1e-4
    h0[..., 1:] -= 3.0
    X = [h0]
    for _ in range(60):
        X.append(many.step(X[-1], {"e": e}))
    dist = torch.stack([torch.linalg.vector_norm(x - e, dim=-1) / torch.linalg.vector_norm(x, dim=-1)
                        for x in X[1:]]).reshape(60, -1).numpy()
    residual_only = predicted_distance(loop_signals(many, probe(2, 4), 60, h0=h0))
    real = dist > 1e-10  # below, the distance is round-off
    assert (dist > residual_only * (1 + 1e-9))[real].any()  # the heuristic rate is not a bound here
    with_J = loop_signals(many, probe(2, 4), 60, h0=h0, jacobian_rate=True)
    np.testing.assert_allclose(with_J.jacobian_rate, rates.amax(-1).flatten().numpy(), rtol=1e-9)
    bound = predicted_distance(with_J)
    ok = np.isfinite(bound)
    assert ok[FIRST - 1:].all()
    ok &= real
    assert ok.sum() > 200 and (dist[ok] <= bound[ok] * (1 + 1e-7)).all()


# ---- the oracle, and criteria on settling and cycling tokens ---------------------------------------

SETTLE = torch.tensor([[1, 2, 3, 5, 0, 8], [13, 0, 0, 4, 6, 0]])
PERIOD = torch.tensor([[0, 0, 0, 0, 3, 0], [0, 4, 5, 0, 0, 3]])


@pytest.fixture(scope="module")
def settle_signals():
    model = cases.settle_or_cycle(SETTLE, PERIOD, symmetric=(1, 1))
    return loop_signals(model, probe(2, 6), 32)


def test_oracle_loops_are_the_known_settle_loops(settle_signals):
    o = oracle_loops(settle_signals, 1e-3)
    k = SETTLE.flatten().numpy()
    settle = k > 0
    assert o[settle].tolist() == k[settle].tolist()
    assert (o[~settle] == 32).all()  # a cycling token never stays near its long-run distribution
    labels = np.array(settle_signals.phases)
    assert (labels[settle] == "fixed point").all()
    assert labels[~settle].tolist() == [f"cycle {p}" for p in PERIOD.flatten()[~torch.from_numpy(settle)].tolist()]


def test_no_convergence_claim_on_a_cycling_token_or_the_report_says_which(settle_signals):
    cal = calibrate(settle_signals, ("all",), budget_loops=32)
    nonconv = settle_signals.nonconvergent
    assert nonconv.sum() == 4
    for p in cal.points:  # the report's count is the direct count
        e = exit_loops(settle_signals, p.criterion, p.threshold, 32)
        v = criterion_values(settle_signals, p.criterion)
        fired = (v >= p.threshold if p.criterion == "argmax-stability" else v < p.threshold).any(0)
        assert p.fires_on_nonconvergent == int((fired & nonconv).sum()), (p.criterion, p.threshold)
        if p.criterion == "contraction":  # never, at any threshold
            assert p.fires_on_nonconvergent == 0 and (e[nonconv] == 32).all()
    # the period-4 token whose readout is permuted by its rotation keeps a constant entropy:
    # entropy-diff claims convergence on it, and the report says so
    sym = 1 * 6 + 1
    assert exit_loops(settle_signals, "entropy-diff", 1e-3, 32)[sym] == 2
    assert cal.defaults["entropy-diff"].fires_on_nonconvergent >= 1
    for name in ("kl", "minp-kl", "latent-diff", "cosine", "contraction"):
        assert cal.defaults[name].fires_on_nonconvergent == 0, name


def test_contraction_exits_on_settled_tokens_soon_after_they_settle(settle_signals):
    e = exit_loops(settle_signals, "contraction", 1e-3, 32)
    k = SETTLE.flatten().numpy()
    s = k > 0
    assert (e[s] >= k[s]).all() and (e[s] <= k[s] + WINDOW).all()


def test_contraction_never_fires_on_a_cycle_whose_residuals_shrink_for_two_loops():
    """Residual ratios alone would call the uneven 3-cycle contracting at loop 3; the online phase
    (the DMD of r_1..r_t has a unit-modulus pair) keeps the criterion from firing."""
    import dataclasses

    from loopdyn.dynamics.exits import threshold_grid

    sig = loop_signals(cases.uneven_cycle(), probe(1, 4), 24)
    assert set(sig.phases) == {"cycle 3"}
    assert not sig.online_fixed[FIRST - 1:].any()
    for eps in threshold_grid("contraction"):
        assert (exit_loops(sig, "contraction", eps, 24) == 24).all()
    ungated = dataclasses.replace(sig, online_fixed=None, dmd_rate=None)
    assert (exit_loops(ungated, "contraction", 1.0, 24) == FIRST).all()  # what the ratios alone would do


# ---- overthinking: the loss rises after a known loop -----------------------------------------------

def test_best_depth_finds_overthinking_at_the_known_loop():
    t0 = torch.tensor([[3, 5, 6, 9, 4], [7, 2, 6, 8, 5]])
    idx = probe(2, 5, V=10, seed=1)
    targets = torch.full_like(idx, -100)
    targets[:, :-1] = idx[:, 1:]
    sig = loop_signals(cases.overthinking(t0, targets), idx, 32, targets=targets)
    d = best_depth(sig)
    scored = targets.flatten() >= 0
    assert d.tokens.tolist() == torch.nonzero(scored).flatten().tolist()
    assert d.best.tolist() == t0.flatten()[scored].tolist()
    assert set(d.reason) == {"overthinking"}
    assert (d.rise > 0).all()
    same = loop_signals(cases.overthinking(torch.full((2, 5), 6), targets), idx, 32, targets=targets)
    dd = best_depth(same)
    assert dd.probe_best == 6 and dd.interval == (6, 6)
    assert "best depth of the probe T = 6" in dd.summary()


def test_best_depth_reasons_on_settling_and_cycling_tokens(settle_signals):
    d = best_depth(settle_signals)
    period = PERIOD.flatten().numpy()[d.tokens]
    k = SETTLE.flatten().numpy()[d.tokens]
    for j, reason in enumerate(d.reason):
        if period[j]:
            assert reason == "cycling" and d.period[j] == period[j]
        else:
            assert reason in ("settled", "overthinking")
            if reason == "settled":
                assert d.best[j] <= k[j]
    lo, hi = d.interval
    assert 1 <= lo <= d.probe_best <= hi <= 32


# ---- calibration ------------------------------------------------------------------------------------

def test_pareto_front_and_budget_choice_by_brute_force():
    from loopdyn.dynamics.exits.calibrate import OperatingPoint

    rng = np.random.default_rng(0)
    pts = [OperatingPoint("kl", float(i), float(rng.uniform(1, 8)), 0.0, 1.0, float(rng.uniform(-0.01, 0.05)),
                          1.0, 0.0, 0, 0, False) for i in range(40)]
    front = pareto_front(pts)
    for p in pts:
        dominated = any(q.mean_loops <= p.mean_loops and q.loss_change <= p.loss_change and
                        (q.mean_loops, q.loss_change) != (p.mean_loops, p.loss_change) for q in pts)
        assert (p in front) == (not dominated)
    best = pick_for_budget(pts, 0.01)
    ok = [p for p in pts if p.loss_change <= 0.01]
    assert best.mean_loops == min(p.mean_loops for p in ok)
    assert pick_for_budget(pts, -1.0) is None


def test_calibration_table_and_defaults_on_the_contraction(tmp_path):
    model = cases.contraction(RATES)
    idx = probe(2, 4, V=16)
    report = exits(model, idx, max_loops=8, horizon=64, budget=0.01)
    cal = report.calibration
    assert set(cal.criteria) == set(HUGINN) | {"contraction"}  # no gate: no exit-gate
    assert set(cal.defaults) == set(cal.criteria)
    for name, p in cal.defaults.items():
        assert p.threshold == DEFAULTS[name] and p.is_default
        assert cal.default_exits[name].tolist() == exit_loops(report.signals, name, None, 8).tolist()
        c = cal.chosen[name]
        if c is not None:
            assert c.loss_change <= 0.01
            assert all(not (q.loss_change <= 0.01 and q.mean_loops < c.mean_loops) for q in cal.of(name))
    text = report.to_text()
    assert "contraction (default)" in text and "best depth of the probe" in text and "per-loop lens" in text
    record = json.loads(json.dumps(report.to_json()))
    assert record["calibration"]["budget_loops"] == 8 and record["horizon"] == 64
    assert len(record["lens"]["per_token"]["loss"]) == 64
    with pytest.raises(Exception):  # frozen results
        report.calibration.budget = 1.0


def test_exit_gate_criterion_is_the_audited_rule():
    from loopdyn.dynamics.exit_gate import exit_loops as gate_rule

    lam = torch.tensor([[0.1, 0.6, 0.95], [0.7, 0.2, 0.4]], dtype=torch.float64)  # (B=2, S=3) per-loop scale
    base = cases.contraction(RATES[:, :3])
    model = LoopAdapter(encode=base.encode, step=base.step, decode=base.decode, mean_loops=8,
                        exit_gate=lambda h, ctx: lam + 0 * h[..., 0])  # a constant gate per token
    sig = loop_signals(model, probe(2, 3), 24)
    assert sig.has_gate
    for q in (0.3, 0.5, 0.9, 1.0):
        got = exit_loops(sig, "exit-gate", q, 8)
        assert got.tolist() == gate_rule(sig.gate[:8], q).tolist()
    assert "exit-gate" in check_criteria(["all"], has_gate=True)


@given(st.lists(st.sampled_from(list(CRITERIA) + ["all", "huginn", "KL", "min_p-kl"]), min_size=1, max_size=4))
def test_criteria_names_are_checked(names):
    ok = all(n.lower().replace("_", "-") in CRITERIA + ("all", "huginn") for n in names)
    if ok:
        out = check_criteria(names, has_gate=True)
        assert len(out) == len(set(out)) and set(out) <= set(CRITERIA)
    else:
        with pytest.raises(DynamicsError, match="unknown exit criterion"):
            check_criteria(names, has_gate=True)


def test_bad_input_is_one_clear_error():
    model = cases.contraction(RATES)
    sig = loop_signals(model, probe(2, 4), 16)
    with pytest.raises(DynamicsError, match="budget"):
        exit_loops(sig, "kl", 1e-3, max_loops=17)
    with pytest.raises(DynamicsError, match="no exit_gate"):
        check_criteria(["exit-gate"], has_gate=False)
    with pytest.raises(DynamicsError, match="long run"):
        loop_signals(model, probe(2, 4), 1)
    with pytest.raises(DynamicsError, match="at least the loop budget"):
        exits(model, probe(2, 4), max_loops=10, horizon=8)
    diverging = cases.contraction(torch.full((2, 4), 1e200, dtype=torch.float64))
    with pytest.raises(DynamicsError, match="non-finite"):
        loop_signals(diverging, probe(2, 4), 16)
    assert math.isfinite(sig.loss[:, :3].sum())


@given(st.integers(0, 10_000), st.sampled_from([c for c in CRITERIA if c not in ("exit-gate", "none")]),
       st.floats(1e-6, 1.0), st.floats(1.0, 100.0), st.integers(1, 12))
def test_exit_loops_are_monotone_in_the_threshold_and_within_the_budget(seed, name, thr, factor, T):
    """A looser threshold never exits later; every exit is within 1..T (on random signals)."""
    from loopdyn.dynamics.exits import LoopSignals

    rng = np.random.default_rng(seed)
    H, N = 12, 7
    pos = lambda: rng.lognormal(-4, 3, (H, N))  # noqa: E731
    sig = LoopSignals(4, H, (1, N), pos(), pos(), pos(), 1 + pos(), pos(), pos(), pos(),
                      rng.integers(0, 3, (H, N)), pos(), rng.random((H, N)) < 0.5, pos(), np.full((H, N), np.nan),
                      tuple(["fixed point"] * N))
    if name == "argmax-stability":
        thr, loose = float(round(thr * 10)), float(round(thr * 10 / factor))
    else:
        loose = thr * factor
    tight_e = exit_loops(sig, name, thr, T)
    loose_e = exit_loops(sig, name, loose, T)
    assert ((1 <= tight_e) & (tight_e <= T)).all() and (loose_e <= tight_e).all()
    assert (exit_loops(sig, "none", None, T) == T).all()
