"""The explosion forecast against what the loop really does when it is run to the horizon.

Each case measures T = 8 loops and forecasts H = 32; the ground truth is the loop run for
all 32 (and more) loops. Models: the official initialisation makes the core the identity
(exactly the LTI surrogate), a small perturbation of the output projections makes it a
contracting nonlinear core, sandwich blocks renormalise the state.
"""
import math

import numpy as np
import pytest
import torch

from loopdyn.dynamics import forecast, measure_trajectory
from tests.helpers import small_loop_model

T, H, N = 8, 32, 32
IDX = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def make(injection="linear", perturb=0.0, seed=0, **kw):
    return small_loop_model(injection, d=N, perturb=perturb, seed=seed, **kw)


def set_A(model, A, input_gains=None):
    with torch.no_grad():
        model.injection.W.weight[:, :N] = torch.tensor(A, dtype=torch.float32)
        if input_gains is not None:
            model.injection.W.weight[:, N:] = torch.diag(torch.tensor(input_gains, dtype=torch.float32))


def random_with_radius(rho, seed=0):
    G = np.random.default_rng(seed).standard_normal((N, N))
    return G * rho / np.abs(np.linalg.eigvals(G)).max()


def truth(model, loops=H):
    return measure_trajectory(model, IDX, loops)


def test_linear_injection_with_radius_1_3_is_explosive():
    model = make()
    set_A(model, random_with_radius(1.3))
    f = forecast(model, IDX, H, T)
    assert f.verdict == "explosive" and f.growth_rate > 0.1
    real = truth(model)
    # the core is the identity, the LTI evidence reproduces the measured loops exactly and is
    # used alone: the forecast beyond loop T is the real trajectory
    assert f.decided_by == "LTI"
    np.testing.assert_allclose(f.state_norm, real.state_norm[1:], rtol=1e-4)
    crossed = int(np.argmax(real.state_norm[1:] > f.safe_limit)) + 1
    assert T < f.max_safe_loops < H and f.max_safe_loops == crossed - 1


def test_dense_abar_with_radius_half_and_contracting_core_is_stable():
    model = make(perturb=0.02)
    set_A(model, random_with_radius(0.5, seed=3))
    f = forecast(model, IDX, H, T)
    assert f.verdict == "stable" and f.max_safe_loops == H
    real = truth(model)
    np.testing.assert_allclose(f.state_norm, real.state_norm[1:], rtol=1e-3)


def test_spectral_norm_above_one_alone_does_not_make_it_unstable():
    model = make(perturb=0.02)
    A = 0.5 * np.eye(N)
    A[np.arange(0, N, 2), np.arange(1, N, 2)] = 1.2  # 2 × 2 Jordan-like blocks: ‖Ā‖₂ ≈ 1.38, ρ = 0.5
    set_A(model, A)
    assert np.linalg.norm(A, 2) > 1.3 and np.abs(np.linalg.eigvals(A)).max() == pytest.approx(0.5)
    f = forecast(model, IDX, H, T)
    assert f.verdict == "stable"
    assert truth(model, 200).rel_residual[200] < 1e-5  # it really settles


def test_hidden_nonnormal_transient_is_caught_by_the_lti_evidence():
    """ρ(Ā) = 0.8, but a shift chain fed by a tiny input grows after the measured loops while a
    fast mode dominates (and decays) during them: the measured trajectory looks converging."""
    A = np.zeros((N, N))
    A[:16, :16] = 0.3 * np.eye(16)
    A[16:, 16:] = 0.8 * np.eye(16) + 1.5 * np.eye(16, k=1)
    model = make()
    set_A(model, A, input_gains=np.r_[np.ones(16), 1e-7 * np.ones(16)])
    f = forecast(model, IDX, H, T)
    real = truth(model)
    assert real.rel_residual[T] < real.rel_residual[T - 1]  # the measurement alone looks like settling
    assert real.state_norm[1:H + 1].max() > 100 * real.state_norm[T]  # yet it blows up by orders of magnitude
    assert f.verdict == "explosive" and f.decided_by == "LTI"
    crossed = int(np.argmax(real.state_norm[1:] > f.safe_limit)) + 1
    assert T < f.max_safe_loops < H and abs(crossed - 1 - f.max_safe_loops) <= 1


def test_additive_injection_is_marginal():
    model = make("additive")
    f = forecast(model, IDX, 48, T)
    assert f.verdict == "marginal" and abs(f.growth_rate) < f.marginal_rate
    real = truth(model, 48)
    np.testing.assert_allclose(f.state_norm, real.state_norm[1:], rtol=1e-4)  # linear growth, predicted
    # h_t = t·e drifts past 10× the state at the trained depth μ (docs/design.md §4), not geometrically: marginal
    mu = model.mean_loops
    assert f.max_safe_loops in (10 * mu - 1, 10 * mu)  # h_{10μ} = 10·h_μ up to round-off


@pytest.mark.parametrize("perturb", [0.02, 0.3])
def test_additive_with_a_perturbed_core_stays_marginal(perturb):
    """With a real core the Jacobian at h_T can have ρ > 1 (the core's sublayers act like 1/‖h‖ on a
    still small state); frozen, it would predict exponential growth. The pre-norm rescaling
    lets the core fade as the state grows, as it does in the real loop."""
    model = make("additive", perturb=perturb)
    f = forecast(model, IDX, H, T)
    assert f.verdict == "marginal"
    np.testing.assert_allclose(f.state_norm, truth(model).state_norm[1:], rtol=0.1)


def test_parcae_diagonal_is_stable_and_the_forecast_matches_the_run():
    model = make("diagonal", perturb=0.05)
    f = forecast(model, IDX, H, T)
    assert f.verdict == "stable"
    np.testing.assert_allclose(f.state_norm, truth(model).state_norm[1:], rtol=1e-3)


def test_renormalising_core_bounds_an_unstable_injection():
    """Sandwich blocks end with a norm: even ρ(Ā) = 1.3 cannot blow the state up, and the LTI
    evidence must not be trusted when it does not explain the measured residuals."""
    model = make(perturb=0.05, block="sandwich")
    set_A(model, random_with_radius(1.3))
    f = forecast(model, IDX, H, T)
    real = truth(model, 100)
    assert real.state_norm[1:].max() < 2 * real.state_norm[1]
    assert f.verdict != "explosive"
    lti = next(m for m in f.models if m.name == "LTI")
    assert not lti.used


def test_measured_only_when_the_horizon_equals_the_measured_loops():
    f = forecast(make("diagonal", perturb=0.05), IDX, T, T)
    assert f.horizon == T and len(f.state_norm) == T and f.verdict in ("stable", "marginal")


def test_nonfinite_weights_and_overflow_are_explosive_not_errors():
    model = make("diagonal")
    with torch.no_grad():
        model.core[0].mlp.proj.weight[0, 0] = float("nan")
    f = forecast(model, IDX, H, T)
    assert f.verdict == "explosive" and f.decided_by == "non-finite" and f.evidence[0].startswith("non-finite")
    model = make()
    set_A(model, np.zeros((N, N)), input_gains=np.full(N, 3e38))  # overflows at the first loop
    f = forecast(model, IDX, H, T)
    assert f.verdict == "explosive" and f.max_safe_loops == 0
    assert "loop 1" in f.evidence[0]
    js = f.to_json()
    assert js["max_safe_loops"] == 0 and math.isnan(js["state_norm"][0])


def test_json_record_has_the_design_fields():
    f = forecast(make("diagonal"), IDX, 12, 4)
    js = f.to_json()
    assert set(js) == {"verdict", "growth_rate", "max_safe_loops", "loops", "state_norm", "measured_loops", "evidence"}
    assert js["loops"] == list(range(1, 13)) and len(js["state_norm"]) == 12 and js["measured_loops"] == 4
    assert all(isinstance(x, float) for x in js["state_norm"]) and isinstance(js["evidence"][0], str)


@pytest.mark.parametrize("bad", [(0, 4), (8, 4)])
def test_bad_loop_counts(bad):
    with pytest.raises(ValueError):
        forecast(make("diagonal"), IDX, bad[1], bad[0])


def test_an_empty_jacobian_subspace_keeps_the_states_shape():
    """No Krylov step and no random state: the subspace is empty, (0, *state shape), with no product made."""
    from loopdyn.dynamics.forecasting import jacobian_subspace

    r = torch.randn(2, 5, 8)
    sub = jacobian_subspace(None, r, steps=0, n_random=0)
    assert sub.V.shape == (0, 2, 5, 8) and sub.JV.shape == (0, 2, 5, 8)
    assert sub.H.shape == (0, 0) and sub.products == 0
