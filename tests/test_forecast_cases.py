"""The forecast against the loop itself on constructed cases by class (tests/forecast_cases.py).

Truth: the loop run to 4× the horizon by plain `model.step` calls, labelled with the docs/design.md §4
meanings. Required on every case: the verdict is right; for every non-explosive case the predicted
‖h‖ at 4T and 8T is within 2× of the real one; `max_safe_loops` is never at or past the first truly
unsafe loop.
"""
import math

import numpy as np
import pytest

from loopdyn.dynamics import forecast
from tests.forecast_cases import CASES, H, T, idx_of, run_truth


@pytest.fixture(scope="module", params=sorted(CASES))
def outcome(request):
    case = CASES[request.param]
    model = case.build()
    idx = idx_of(case)
    return case, run_truth(model, idx, case), forecast(model, idx, H, T)


def test_verdict_is_right(outcome):
    case, truth, f = outcome
    assert f.verdict == truth.verdict, f"{case.name}: {f.evidence[0]}"


def test_predicted_norm_within_2x_for_non_explosive_cases(outcome):
    case, truth, f = outcome
    if truth.verdict == "explosive":
        pytest.skip("explosive: the norm is not required")
    for t in (4 * T, 8 * T):
        ratio = f.state_norm[t - 1] / truth.norms[t]
        assert 0.5 <= ratio <= 2.0, f"{case.name}: ‖h_{t}‖ predicted/true = {ratio:.3g}"


def test_max_safe_loops_is_never_too_high(outcome):
    case, truth, f = outcome
    if truth.first_unsafe is not None:
        assert f.max_safe_loops < truth.first_unsafe
    assert 0 <= f.max_safe_loops <= H


def test_one_model_decides_and_reproduces_the_past_when_one_can(outcome):
    case, truth, f = outcome
    pick = next(m for m in f.models if m.name == f.decided_by)
    # the forecast curve and rate are the deciding model's own
    np.testing.assert_allclose(f.state_norm[T:], pick.state_norm[1: H - T + 1])
    assert f.growth_rate == pick.rate or (math.isnan(f.growth_rate) and math.isnan(pick.rate))
    good = [m for m in f.models if m.checked and m.hindcast_error <= 0.5]
    if good and pick.name != "measured":
        assert pick.checked and pick.hindcast_error <= 0.5


@pytest.mark.parametrize("settle_tol", [1e-2, 1e-4])
def test_slow_parcae_is_stable_with_the_loops_to_settle(settle_tol):
    """docs/design.md §4: a Parcae loop with ρ(Ā) = 0.99 is stable (not marginal), and the report says how
    long it takes to settle: the loop after which the relative residual ‖r_t‖/‖h_t‖ stays ≤ settle_tol,
    checked against the loop itself (at 1e-4 that is past the horizon: extrapolated)."""
    case = CASES["parcae_slow_0.99"]
    model = case.build()
    f = forecast(model, idx_of(case), H, T, settle_tol=settle_tol)
    assert f.verdict == "stable" and f"by loop {f.settle_loops}" in f.evidence[0]
    import torch
    with torch.no_grad():
        ctx = model.encode(idx_of(case))
        h = model.init_state(ctx)
        rel = [math.inf]
        for _ in range(2000):
            nxt = model.step(h, ctx)
            rel.append(float((nxt - h).norm() / nxt.norm()))
            h = nxt
    rel = np.array(rel)
    true_settle = int(np.nonzero(rel > settle_tol)[0][-1]) + 1
    assert abs(f.settle_loops - true_settle) <= max(2, 0.05 * true_settle)
    if settle_tol == 1e-4:
        assert true_settle > H  # the extrapolated case


def test_large_state_limit_forbids_stable_for_rho_above_one():
    case = CASES["prenorm_rho_1.03"]
    f = forecast(case.build(), idx_of(case), H, T)
    assert f.large_state is not None and f.large_state.limit_is_lti and f.large_state.forbids_stable
    assert f.verdict != "stable"


def test_random_starts_find_a_mode_r_T_misses():
    """No LTI part declared, the unstable mode fed 1e-9 of the input: the Jacobian model's random
    starts find |λ| = 1.1 (the loop's true eigenvalue) and decide."""
    case = CASES["invisible_mode_no_lti_part"]
    f = forecast(case.build(), idx_of(case), H, T)
    jac = next(m for m in f.models if m.name == "Jacobian")
    assert np.abs(jac.eigenvalues).max() == pytest.approx(1.1, rel=1e-3)
    assert f.verdict == "explosive" and f.decided_by == "Jacobian"
    assert all(m.name != "LTI" for m in f.models)
    assert any("no LTI part" in e for e in f.evidence)


from hypothesis import given, settings, strategies as st  # noqa: E402

from tests.forecast_cases import affine_loop, fill, with_spectrum  # noqa: E402


@settings(max_examples=15)
@given(rho=st.floats(0.3, 1.3), theta=st.floats(0.0, math.pi), seed=st.integers(0, 1000))
def test_lti_verdict_follows_the_spectral_radius(rho, theta, seed):
    """An affine loop h ← Āh + e with a leading mode ρe^{iθ} (closed-form truth): ρ < 0.99 is stable,
    ρ > 1.01 explosive; the forecast norm at 8T matches the loop's own within 2× when not explosive."""
    if abs(rho - 1) < 0.01:
        return
    lead = complex(rho * math.cos(theta), rho * math.sin(theta)) if 0.05 < theta < math.pi - 0.05 else \
        (rho if theta <= 0.05 else -rho)
    model = affine_loop(with_spectrum(fill([lead], rest=min(0.3, 0.9 * rho)), np.random.default_rng(seed)))
    f = forecast(model, idx_of(CASES["lti_rho_0.97"]), H, T)
    assert f.verdict == ("stable" if rho < 1 else "explosive")
    if rho < 1:
        truth = run_truth(model, idx_of(CASES["lti_rho_0.97"]), CASES["lti_rho_0.97"], loops=H)
        assert 0.5 <= f.state_norm[H - 1] / truth.norms[H] <= 2
