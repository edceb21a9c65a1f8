"""Finite-time Lyapunov exponents of known linear maps.

With the official initialisation every core block is the identity (zero output projections),
so the loop is exactly h ↦ Ā h + B̄ e and its Jacobian is the constant I ⊗ Ā: the exponents
must converge to log|eigenvalues of Ā|, sorted, each repeated once per token.
"""
import math

import numpy as np
import pytest
import torch

from loopdyn.dynamics import lyapunov
from loopdyn.models import LoopConfig, LoopedLM


def linear_model(A):
    n = A.shape[0]
    torch.manual_seed(0)
    cfg = LoopConfig.preset("tiny", injection="linear", d_model=n, n_heads=2, d_mlp=2 * n,
                            value_embeds=False, state_init="zero")
    model = LoopedLM(cfg).eval()
    with torch.no_grad():
        model.injection.W.weight[:, :n] = torch.tensor(A, dtype=torch.float32)
    return model


def test_triangular_map_exponents_converge_to_log_moduli():
    n = 8
    lam = np.array([0.95, -0.8, 0.65, 0.5, 0.4, -0.3, 0.2, 0.1])
    A = np.diag(lam) + np.triu(np.random.default_rng(0).standard_normal((n, n)) * 0.1, 1)
    model = linear_model(A)
    A32 = model.injection.linear_part().A.dense().double().numpy()
    mu = np.linalg.eigvals(A32)
    expected = np.sort(np.log(np.abs(mu)))[::-1][:4]
    T = 150
    res = lyapunov(model, torch.tensor([[7]]), T, k=4)
    assert res.loops == T and res.exponents.shape == (4,)
    # For a constant map J = V M V⁻¹ the accumulated log-volumes differ from T·Σ log|μ_i| by
    # at most log κ(V) (change of basis) plus the log of the start's alignment with the
    # leading invariant subspaces (O(1) for a fixed random start): error ≤ (2 log κ(V) + 2)/T.
    V = np.linalg.eig(A32)[1]
    tol = (2 * math.log(np.linalg.cond(V)) + 2) / T
    assert tol < 0.05  # the check is meaningful: well below the gaps between exponents (≥ 0.2)
    np.testing.assert_allclose(res.exponents, expected, atol=tol)


def test_exponents_repeat_per_token_and_are_exact_for_a_diagonal_map():
    a = np.array([0.9, 0.6, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05])
    model = linear_model(np.diag(a))
    a32 = np.diag(model.injection.linear_part().A.dense().double().numpy())
    T = 100
    res = lyapunov(model, torch.tensor([[3, 4]]), T, k=4)  # two tokens
    expected = np.log([a32[0], a32[0], a32[1], a32[1]])
    # a normal map: the only error is the random start's alignment with the leading
    # eigenvectors, log(1/|det|)/T with an O(1) determinant for a fixed seed
    np.testing.assert_allclose(res.exponents, expected, atol=5 / T)


def test_parcae_init_gives_log_abar_from_the_first_loop():
    torch.manual_seed(0)
    model = LoopedLM(LoopConfig.preset("tiny", d_model=16, n_heads=2, d_mlp=32, value_embeds=False)).eval()
    a = float(model.injection.A_bar()[0].detach())  # Ā₀ = √(1/5) I
    res = lyapunov(model, torch.tensor([[1, 2, 3]]), 3, k=3)
    np.testing.assert_allclose(res.exponents, math.log(a), atol=1e-6)
    assert res.to_json() == {"exponents": [pytest.approx(math.log(a), abs=1e-6)] * 3, "loops": 3}


def test_nonfinite_state_stops_the_run():
    model = linear_model(np.eye(8) * 1e30)
    res = lyapunov(model, torch.tensor([[1]]), 10, k=2)
    assert res.loops < 10 and res.nonfinite
