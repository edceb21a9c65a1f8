"""injection_spectrum and the LTI surrogate against closed forms, dense numpy and simulation."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopdyn.dynamics import injection_spectrum, kreiss_constant, lti_fixed_point
from loopdyn.dynamics.lti import lyapunov_power_bound, power_norms, settle_loops_dense
from tests.helpers import small_loop_model


def make(injection="diagonal", d=16, **kw):
    return small_loop_model(injection, d=d, **kw)


def set_diagonal(model, a):
    """Make the diagonal injection's Ā = diag(a): Δ·exp(A_log) = −log a with A_log = 0."""
    rate = -np.log(np.asarray(a, dtype=np.float64))
    with torch.no_grad():
        model.injection.A_log.zero_()
        model.injection.dt_bias.copy_(torch.tensor(rate + np.log(-np.expm1(-rate)), dtype=torch.float32))


def set_linear(model, A):
    n = A.shape[0]
    with torch.no_grad():
        model.injection.W.weight[:, :n] = torch.tensor(A, dtype=torch.float32)


def simulate(part, e, loops):
    """LTI surrogate from h_0 = 0, in float64: states h_1..h_loops."""
    A = part.A.dense().double()
    Bx = part.B.apply(e.double() if part.B.dtype is None else e.to(part.B.dtype)).double()
    h = torch.zeros(*e.shape[:-1], A.shape[0], dtype=torch.float64)
    out = []
    for _ in range(loops):
        h = h @ A.T + Bx
        out.append(h)
    return out


# ---- diagonal: closed forms ------------------------------------------------------------------

@settings(max_examples=15)
@given(st.lists(st.floats(0.05, 0.95), min_size=16, max_size=16), st.sampled_from([1e-2, 1e-3]))
def test_diagonal_closed_forms_match_dense_and_simulation(a, tol):
    model = make()
    set_diagonal(model, a)
    a_true = model.injection.A_bar().detach().double().numpy()
    spec = injection_spectrum(model, horizon=40, tol=tol)
    assert spec.method == "closed-form"
    assert spec.spectral_radius == pytest.approx(np.abs(a_true).max(), rel=1e-12)
    assert spec.spectral_norm == pytest.approx(np.linalg.norm(np.diag(a_true), 2), rel=1e-12)
    np.testing.assert_allclose(np.sort(spec.eigenvalues.real), np.sort(a_true), rtol=1e-12)
    np.testing.assert_allclose(spec.transient, power_norms(np.diag(a_true), 40), rtol=1e-9)
    assert spec.kreiss_constant == 1.0 and spec.kreiss_bound >= spec.transient_max
    # settling: worst case over inputs (‖Āᵗ‖ ≤ tol), so a simulated input never takes longer
    e = torch.randn(2, 3, 16, dtype=torch.float64)
    part = model.injection.linear_part()
    states = simulate(part, e, spec.settle_loops + 2)
    h_star = lti_fixed_point(part, e)
    errs = [float((h - h_star).norm() / h_star.norm()) for h in states]
    assert errs[spec.settle_loops - 1] <= tol * (1 + 1e-9)


@pytest.mark.parametrize("a", [0.447, 0.9, 0.2])
def test_equal_diagonal_settles_exactly_when_the_closed_form_says(a):
    model = make()
    set_diagonal(model, [a] * 16)
    a32 = float(model.injection.A_bar()[0].detach())
    spec = injection_spectrum(model, horizon=8, tol=1e-3)
    assert spec.settle_loops == math.ceil(math.log(1e-3) / math.log(a32))
    e = torch.randn(1, 4, 16, dtype=torch.float64)
    part = model.injection.linear_part()
    h_star = lti_fixed_point(part, e)
    states = simulate(part, e, spec.settle_loops)
    errs = [float((h - h_star).norm() / h_star.norm()) for h in states]  # = a^t from zero
    first = next(t + 1 for t, x in enumerate(errs) if x <= 1e-3 * (1 + 1e-9))
    assert first == spec.settle_loops
    # fixed point: the simulation converges to it, and (I − Ā) h* = B̄e
    far = simulate(part, e, 400)[-1]
    torch.testing.assert_close(far, h_star, rtol=1e-9, atol=1e-12)


def test_parcae_init_values():
    spec = injection_spectrum(make(), horizon=16)
    assert spec.spectral_radius == pytest.approx(math.sqrt(1 / 5), rel=1e-6)  # paper-facts: Ā₀ = 0.447
    assert spec.fixed_point_gain == pytest.approx(0.8047 / (1 - 0.4472), rel=1e-3)  # h* ≈ 1.46 e
    assert spec.stable


def test_identity_is_marginal():
    spec = injection_spectrum(make("additive"), horizon=16)
    assert spec.spectral_radius == 1.0 and spec.spectral_norm == 1.0
    assert spec.settle_loops is None and not spec.stable
    assert spec.kreiss_constant == 1.0 and spec.transient_max == 1.0
    assert lti_fixed_point(make("additive").injection.linear_part(), torch.randn(1, 2, 16)) is None


# ---- dense: numpy, Kreiss ---------------------------------------------------------------------

def nonnormal(n=16, lam=0.8, c=1.2):
    return lam * np.eye(n) + c * np.eye(n, k=1)


def test_dense_matches_numpy():
    model = make("linear")
    rng = np.random.default_rng(1)
    A = rng.standard_normal((16, 16)) * 0.25
    set_linear(model, A)
    A32 = model.injection.linear_part().A.dense().double().numpy()
    spec = injection_spectrum(model, horizon=30)
    assert spec.method == "dense"
    ev = np.linalg.eigvals(A32)
    assert spec.spectral_radius == pytest.approx(np.abs(ev).max(), rel=1e-10)
    assert spec.spectral_norm == pytest.approx(np.linalg.norm(A32, 2), rel=1e-10)
    np.testing.assert_allclose(np.sort_complex(spec.eigenvalues), np.sort_complex(ev), rtol=1e-8, atol=1e-12)
    direct = [np.linalg.norm(np.linalg.matrix_power(A32, k), 2) for k in range(31)]
    np.testing.assert_allclose(spec.transient, direct, rtol=1e-9)


@pytest.mark.parametrize("A", [nonnormal(), nonnormal(12, 0.5, 3.0), np.diag(np.linspace(0.1, 0.9, 8)),
                               np.random.default_rng(2).standard_normal((10, 10)) * 0.2])
def test_kreiss_constant_sandwiches_the_power_bound(A):
    """Kreiss matrix theorem: K ≤ sup_k ‖Aᵏ‖ ≤ e·n·K (sup from a long simulation)."""
    sup = power_norms(A, 3000).max()
    K = kreiss_constant(A)
    n = A.shape[0]
    assert 1.0 <= K <= sup * (1 + 1e-6)
    assert sup <= math.e * n * K
    assert sup <= lyapunov_power_bound(A) * (1 + 1e-6)


def test_normal_matrix_has_kreiss_constant_one():
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    A = Q @ np.diag(np.linspace(-0.9, 0.9, 8)) @ Q.T
    assert kreiss_constant(A) == pytest.approx(1.0, abs=1e-6)


def test_kreiss_bound_at_least_measured_transient_for_a_large_transient():
    model = make("linear")
    set_linear(model, nonnormal(16, 0.8, 1.5))
    spec = injection_spectrum(model, horizon=64)
    A = model.injection.linear_part().A.dense().double().numpy()
    sup = power_norms(A, 4000).max()
    assert spec.spectral_radius < 1 and spec.transient_max > 1e4  # ρ < 1 with a huge transient
    assert spec.kreiss_bound >= 1 and spec.kreiss_bound >= spec.transient_max
    assert spec.kreiss_bound >= sup * (1 - 1e-6)  # a true upper bound, also past the horizon
    assert spec.transient_peak > 8


def test_unstable_dense_has_no_bound():
    model = make("linear")
    set_linear(model, 1.3 * np.eye(16))
    spec = injection_spectrum(model, horizon=10)
    assert not spec.stable and math.isinf(spec.kreiss_bound) and spec.settle_loops is None
    assert spec.transient_max == pytest.approx(1.3 ** 10, rel=1e-5)


def test_settle_loops_beyond_the_horizon_by_squaring_matches_a_scan():
    A = nonnormal(6, 0.9, 0.5)
    scan = power_norms(A, 600)
    first = int(np.nonzero(scan[1:] <= 1e-3)[0][0] + 1)
    assert settle_loops_dense(A, 1e-3, power_norms(A, 10)) == first


def test_matrix_free_path_agrees_with_dense():
    model = make("linear")
    rng = np.random.default_rng(4)
    set_linear(model, rng.standard_normal((16, 16)) * 0.25)
    dense = injection_spectrum(model, horizon=12)
    free = injection_spectrum(model, horizon=12, dense_limit=8)
    assert free.method == "matrix-free"
    assert free.spectral_norm == pytest.approx(dense.spectral_norm, rel=1e-6)
    assert free.spectral_radius == pytest.approx(dense.spectral_radius, rel=1e-6)
    assert np.all(free.transient <= dense.transient * (1 + 1e-9))  # a lower bound


def test_nonfinite_injection_is_reported_not_raised():
    model = make()
    with torch.no_grad():
        model.injection.A_log[3] = float("nan")
    spec = injection_spectrum(model)
    assert spec.method == "non-finite" and math.isnan(spec.spectral_radius)
    assert spec.to_json()["spectral_radius"] != spec.to_json()["spectral_radius"]  # NaN until json_safe
