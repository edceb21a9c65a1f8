"""The one verdict vocabulary and rule table (dynamics/verdict.py), docs/design.md §4.

Pure predicates: properties over their whole input space (hypothesis). The loop verdict: the
invariants over random and constructed loops, against the forecast's own numbers, and the two
classes of issue 20 against the loop itself run to 256 loops.
"""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopdyn.dynamics import forecast
from loopdyn.dynamics import verdict as V
from loopdyn.models import LoopAdapter
from tests.forecast_cases import (D, H, LM_IDX, MU, T, Case, PreNormCore, affine_loop, fill, idx_of, linear_lm,
                                  nonnormal_distant, run_truth, with_spectrum)

rates = st.floats(-5, 5, allow_nan=False)
loops = st.integers(1, 300)


# ---- the vocabulary ----------------------------------------------------------------------------------

def test_verdicts_are_the_plain_strings_in_json_and_text():
    assert [v.value for v in V.Verdict] == ["stable", "marginal", "explosive"]
    assert [o.value for o in V.Outcome] == ["converged", "inconclusive", "residual explosion", "diverged"]
    assert [s.value for s in V.RunStatus] == ["ok", "warned", "failed"]
    assert json.dumps({"verdict": V.Verdict.EXPLOSIVE}) == '{"verdict": "explosive"}'
    assert f"{V.Outcome.RESIDUAL_EXPLOSION}" == "residual explosion" and V.Verdict.STABLE.upper() == "STABLE"
    assert V.Verdict.STABLE == "stable" and V.Verdict("marginal") is V.Verdict.MARGINAL
    assert [v.severity for v in V.Verdict] == [0, 1, 2]


def test_every_word_has_a_colour_and_the_criteria_come_from_the_table():
    assert {V.css_class(w) for w in ("stable", "converged", "ok")} == {"ok"}
    assert {V.css_class(w) for w in ("marginal", "inconclusive", "warned")} == {"wait"}
    assert {V.css_class(w) for w in ("explosive", "diverged", "residual explosion", "failed")} == {"bad"}
    assert V.css_class("") == "" and V.css_class("nonsense") == "" and V.colour("nonsense") is None
    assert V.colour("explosive") == V.COLOURS["bad"]
    c = V.criteria()
    assert list(c) == ["diverged", "residual explosion", "inconclusive", "converged"]
    assert f"+ {V.DIVERGE_MARGIN} nats" in c["diverged"] and f"> {V.EXPLOSION_RATIO:g}" in c["residual explosion"]
    assert f"fewer than {V.MIN_TREND_STEPS} steps" in c["inconclusive"] and c["converged"] == "otherwise"
    assert set(V.verdict_criteria()) == {"stable", "marginal", "explosive"}


# ---- pure predicates ---------------------------------------------------------------------------------

@given(rate=rates, crossing=st.none() | loops, burst=st.booleans(), band=st.floats(1e-4, 0.1))
def test_model_verdict_rule(rate, crossing, burst, band):
    v, reason = V.model_verdict(rate, crossing=crossing, burst=burst, band=band)
    assert isinstance(v, V.Verdict) and reason
    if crossing is not None:  # leaving the safe region: explosive unless it drifts out
        drift = not burst and -band <= rate <= band
        assert v == (V.Verdict.MARGINAL if drift else V.Verdict.EXPLOSIVE)
        assert f"loop {crossing}" in reason
    else:
        assert v == (V.Verdict.EXPLOSIVE if rate > band else V.Verdict.MARGINAL if rate >= -band else V.Verdict.STABLE)


@given(model=st.sampled_from(list(V.Verdict)), horizon=st.integers(1, 500), data=st.data(), settles=st.booleans(),
       radius=st.none() | st.floats(0.1, 2.0), past=st.booleans(), exit_=st.none() | loops)
def test_loop_verdict_never_contradicts_its_numbers(model, horizon, data, settles, radius, past, exit_):
    max_safe = data.draw(st.integers(0, horizon))
    v, reason = V.loop_verdict((model, "the model's reason"), horizon=horizon, max_safe_loops=max_safe,
                               settles=settles, large_state_radius=radius, leaves_past_horizon=past, lti_exit=exit_)
    assert reason
    if v == V.Verdict.STABLE:  # stable only when the forecast settles and stays safe through the horizon
        assert settles and max_safe == horizon and model == V.Verdict.STABLE
    if radius is not None and math.log(radius) > V.UNIT_BAND:  # ρ(Ā) > 1 behind a fading core
        assert v == V.Verdict.EXPLOSIVE
        if model != V.Verdict.EXPLOSIVE and exit_ is not None:
            assert f"loop {exit_}" in reason
    if model == V.Verdict.EXPLOSIVE and v != V.Verdict.EXPLOSIVE:  # only the saturating large-state case
        assert radius is not None and radius < 1 and past and v == V.Verdict.MARGINAL


@given(where=st.text(min_size=1, max_size=20))
def test_nonfinite_is_explosive(where):
    assert V.nonfinite_verdict(where)[0] == V.Verdict.EXPLOSIVE


@given(state=st.floats(1e-3, 1e3), factor=st.floats(1.5, 100), rate=st.floats(1e-3, 1.0), start=st.integers(1, 64))
def test_lti_exit_loop_is_the_first_loop_past_the_limit(state, factor, rate, start):
    limit = factor * state
    t = V.lti_exit_loop(state, limit, rate, start)
    j = t - start
    assert state * math.exp(rate * j) > limit * (1 - 1e-9)
    assert j == 1 or state * math.exp(rate * (j - 1)) <= limit * (1 + 1e-9)
    assert V.lti_exit_loop(state, limit, 0.0, start) is None


@given(nonfinite=st.none() | st.integers(1, 50), rate=st.floats(0.5, 1.5), fixed=st.booleans(),
       cyc=st.integers(0, 5), notc=st.integers(0, 5))
def test_normalised_verdict_rule(nonfinite, rate, fixed, cyc, notc):
    v, _ = V.normalised_verdict(nonfinite_at=nonfinite, pre_norm_rate=rate, all_fixed=fixed, cycles=cyc,
                                not_converging=notc, n_tokens=10)
    if nonfinite is not None or rate > 1 + V.PRE_NORM_RATE_TOL:
        assert v == V.Verdict.EXPLOSIVE
    else:
        assert v == (V.Verdict.STABLE if fixed else V.Verdict.MARGINAL)


@given(failed=st.lists(st.text(min_size=1, max_size=5), max_size=3),
       warned=st.lists(st.text(min_size=1, max_size=5), max_size=3))
def test_run_status_rule(failed, warned):
    status, reasons = V.run_status(failed, warned)
    assert status == (V.RunStatus.FAILED if failed else V.RunStatus.WARNED if warned else V.RunStatus.OK)
    assert reasons == failed + warned
    assert V.run_line(status, reasons).startswith(f"run {status.value}: ")


def test_audit_verdict_follows_the_normalised_loop_unless_broken():
    f = (V.Verdict.STABLE, "")
    assert V.audit_verdict(f)[0] == V.Verdict.STABLE
    assert V.audit_verdict(f, (V.Verdict.EXPLOSIVE, "pre-norm growth"))[0] == V.Verdict.EXPLOSIVE
    assert V.audit_verdict((V.Verdict.EXPLOSIVE, ""), (V.Verdict.STABLE, "x"), broken=True)[0] == V.Verdict.EXPLOSIVE


# ---- the loop verdict on loops: invariants -----------------------------------------------------------

def check_invariants(f, where=""):
    """The forecast's verdict never contradicts its own numbers (docs/design.md §4)."""
    H_ = f.horizon
    if f.verdict == "stable":
        assert f.max_safe_loops == H_ and f.settle_loops is not None, where
    if f.max_safe_loops < H_:
        assert f.verdict != "stable", where
    s = np.asarray(f.state_norm)
    out = np.nonzero(~np.isfinite(s[f.trained_depth:]) | (s[f.trained_depth:] > f.safe_limit))[0]
    if out.size:  # its own curve leaves the safe region: explosive, or a drift that names the loop
        t = int(out[0]) + f.trained_depth + 1
        assert f.verdict == "explosive" or ("drifts" in f.evidence[0] and f"loop {t}" in f.evidence[0]), \
            (where, f.verdict, f.evidence[0])
    if f.large_state is not None and f.large_state.forbids_stable:
        assert f.verdict == "explosive", where


def random_loop(seed, radius, normal, core_gain):
    rng = np.random.default_rng(seed)
    A = with_spectrum(fill([radius, 0.5 * radius]), rng, normal=normal)
    return affine_loop(A, core=None if core_gain == 0 else PreNormCore(D, core_gain, seed), seed=seed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), radius=st.floats(0.6, 1.1), normal=st.booleans(),
       core_gain=st.sampled_from([0.0, 0.1, 0.5, 2.0]))
def test_invariants_on_random_loops(seed, radius, normal, core_gain):
    model = random_loop(seed, radius, normal, core_gain)
    check_invariants(forecast(model, torch.zeros(1, 4, dtype=torch.long), H, T, lyapunov_k=0), (seed, radius))


@pytest.mark.parametrize("name", ["nonnormal_peak_after", "nonnormal_peak_after_core", "nonnormal_distant_fixed_point",
                                  "nonnormal_distant_fixed_point_core", "additive_drift", "prenorm_rho_1.03",
                                  "parcae_slow_0.99", "limit_cycle_period_3"])
def test_invariants_on_constructed_loops(name):
    from tests.forecast_cases import CASES

    case = CASES[name]
    check_invariants(forecast(case.build(), idx_of(case), H, T, lyapunov_k=0), name)


@settings(max_examples=8, deadline=None)
@given(at=st.integers(1, T), kind=st.sampled_from(["nan", "inf"]))
def test_nonfinite_states_are_explosive(at, kind):
    bad = float(kind)
    A = torch.tensor(with_spectrum(fill([0.5]), np.random.default_rng(at)))

    def step(h, e):  # channel 0 counts the loops (h_0 = 0); the state h_at is non-finite
        out = h @ A.T + e
        out = torch.cat([h[..., :1] + 1, out[..., 1:]], -1)
        return out + bad if bool((out[..., 0] > at - 0.5).any()) else out

    model = LoopAdapter(encode=lambda idx: torch.ones(1, 4, D, dtype=torch.float64), step=step,
                        decode=lambda h, e: h, mean_loops=MU, init_state=lambda e: torch.zeros_like(e))
    f = forecast(model, torch.zeros(1, 4, dtype=torch.long), H, T, lyapunov_k=0)
    assert f.verdict == "explosive" and f.decided_by == "non-finite"


def test_a_drift_out_of_the_safe_region_stays_marginal_and_names_the_loop():
    """Ā = I (additive, a mode on the unit circle): linear drift; with the horizon past the loop it leaves
    the safe region (‖h_t‖ grows like t), the verdict stays marginal and the report says where it leaves."""
    model = affine_loop(np.eye(D))
    f = forecast(model, torch.zeros(1, 4, dtype=torch.long), 128, T, lyapunov_k=0)
    truth = run_truth(model, torch.zeros(1, 4, dtype=torch.long), Case("x", "", lambda: model))
    assert f.verdict == "marginal" and f.max_safe_loops < 128
    assert truth.first_unsafe is not None and f.max_safe_loops < truth.first_unsafe <= 128
    leaves = int(np.argmax(np.asarray(f.state_norm) > f.safe_limit)) + 1  # the forecast's own crossing
    assert leaves == truth.first_unsafe and f.max_safe_loops < leaves
    assert f"drifts past 10× the state at the trained depth (‖h_8‖) at loop {leaves}" in f.evidence[0]
    check_invariants(f)


# ---- issue 20's two classes, against the loop run to 256 loops ---------------------------------------

@pytest.mark.parametrize("core", [None, 0.2], ids=["no-core", "pre-norm-core"])
def test_a_transient_to_a_distant_fixed_point_is_explosive(core):
    """A non-normal Ā whose transient carries the state to a distant fixed point (≈ 25× the state at the
    trained depth), with and without a pre-norm core: today's rule called it marginal with max_safe_loops
    short of the horizon. The real loop leaves the safe region within the horizon and settles outside it."""
    case = Case("x", "", lambda: nonnormal_distant(core=None if core is None else PreNormCore(D, core, 11)))
    model = case.build()
    idx = idx_of(case)
    truth = run_truth(model, idx, case)
    # the class: a bounded transient (it converges) to 20–30× ‖h_μ‖, out of the safe region within H
    assert 20 <= truth.norms[256] / truth.norms[MU] <= 30
    assert truth.resid[256] <= 1e-2 * truth.resid[T] and truth.first_unsafe <= H
    assert np.nanmax(truth.resid[T + 1: truth.first_unsafe + 1]) <= 2 * truth.resid[T]  # no burst
    f = forecast(model, idx, H, T)
    assert f.verdict == "explosive", f.evidence[0]
    assert f.max_safe_loops < truth.first_unsafe
    assert "bounded transient" in " ".join(f.evidence)


@pytest.mark.parametrize("seed", [1, 2])
def test_rho_above_one_behind_a_pre_norm_core_is_explosive_and_the_norm_is_right(seed):
    """A linear Ā with ρ = 1.05 behind a pre-norm core that holds the measured state: today's rule
    called it marginal with ‖h_64‖ far too low. The real loop grows geometrically (‖h_256‖ > 1e6)."""
    case = Case("x", "", lambda: linear_lm(1.05, 0.15, seed=seed), large_state_unstable=True, idx=LM_IDX)
    model = case.build()
    truth = run_truth(model, LM_IDX, case)
    assert truth.norms[256] > 1e6 and truth.norms[256] / truth.norms[128] > 10  # geometric growth
    f = forecast(model, LM_IDX, H, T)
    assert f.verdict == "explosive", f.evidence[0]
    assert f.large_state.forbids_stable
    ratio = f.state_norm[H - 1] / truth.norms[H]
    assert 0.5 <= ratio <= 2.0, f"‖h_64‖ predicted/true = {ratio:.3g}"
    # it leaves the safe region within the horizon, and the forecast says so (the loop is only a bound on the
    # LTI rate from h_T: the real loop, pushed by the core, leaves earlier — at 48 for both seeds)
    assert truth.first_unsafe <= H and f.max_safe_loops < H


def test_the_forecast_stages_return_frozen_results():
    """No stage mutates another's result: the models, the large-state record and the forecast are frozen."""
    from dataclasses import FrozenInstanceError

    f = forecast(affine_loop(with_spectrum(fill([0.9]), np.random.default_rng(0))), torch.zeros(1, 4, dtype=torch.long),
                 H, T, lyapunov_k=0)
    for obj, name in ((f, "verdict"), (f.models[0], "verdict"), (f.large_state, "limit_is_lti")):
        with pytest.raises(FrozenInstanceError):
            setattr(obj, name, None)
    assert all(m.verdict in ("stable", "marginal", "explosive") for m in f.models)  # judged copies
