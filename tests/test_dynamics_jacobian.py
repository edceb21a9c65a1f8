"""The matrix-free loop Jacobian against dense autograd Jacobians, finite differences and
forward-mode AD; its structure (block lower-triangular in tokens); the LTI part."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopdyn.dynamics import (Cost, LoopJacobian, loop_jacobian, lti_jacobian, lyapunov, per_token_spectra,
                      token_block, top_eigenvalues, top_singular_values)
from loopdyn.dynamics.loopmap import forward_jvp
from tests.helpers import small_loop_model

B, S, D = 2, 5, 16


def make(injection="diagonal", perturb=0.3, seed=0, d=D):
    return small_loop_model(injection, d=d, perturb=perturb, seed=seed)


@pytest.fixture(scope="module")
def setup():
    model = make()
    idx = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(1))
    ctx = model.encode(idx)
    with torch.no_grad():
        h = model.init_state(ctx)
        for _ in range(3):
            h = model.step(h, ctx)
    dense = torch.autograd.functional.jacobian(lambda x: model.step(x, ctx), h)
    dense = dense.reshape(h.numel(), h.numel()).double().numpy()
    return model, ctx, h, dense


def rel(a, b):
    return abs(a - b) / abs(b)


def test_matrix_free_singular_values_match_dense(setup):
    model, ctx, h, dense = setup
    ref = np.linalg.svd(dense, compute_uv=False)
    J = loop_jacobian(model, h, ctx)
    est = top_singular_values(J, k=3, method="svds", tol=1e-8)
    np.testing.assert_allclose(est.values, ref[:3], rtol=1e-4)
    assert est.matvecs > 0 and est.rmatvecs > 0
    gkl = top_singular_values(loop_jacobian(model, h, ctx), k=1, method="lanczos", steps=40)
    assert rel(gkl.values[0], ref[0]) < 1e-4
    assert gkl.values[0] <= ref[0] * (1 + 1e-5)  # Ritz values are lower bounds


def test_matrix_free_eigenvalues_match_dense(setup):
    model, ctx, h, dense = setup
    ev = np.linalg.eigvals(dense)
    ev = ev[np.argsort(-np.abs(ev))]
    est = top_eigenvalues(loop_jacobian(model, h, ctx), k=3, method="eigs", tol=1e-10)
    for lam in est.values:  # each matches a dense eigenvalue (pairs may come in either order)
        assert np.min(np.abs(ev[:4] - lam)) / np.abs(lam) < 1e-4
    assert rel(np.abs(est.values[0]), np.abs(ev[0])) < 1e-4
    adj = top_eigenvalues(loop_jacobian(model, h, ctx), k=1, method="eigs", adjoint=True, tol=1e-10)
    assert rel(np.abs(adj.values[0]), np.abs(ev[0])) < 1e-4


def test_matvec_matches_central_differences_and_forward_mode(setup):
    model, ctx, h, _ = setup
    g = torch.Generator().manual_seed(2)
    v = torch.randn(h.shape, generator=g)
    jv = loop_jacobian(model, h, ctx).apply(v).double()
    # independent route 1: forward-mode AD (torch.func.jvp)
    _, fwd = forward_jvp(model, ctx, h, v)
    torch.testing.assert_close(jv, fwd.double(), rtol=1e-5, atol=1e-5)
    # independent route 2: central differences on a float64 copy (its norms still round to
    # float32, so the step is 1e-2: truncation O(1e-4·curvature), round-off O(1e-7/1e-2))
    md = copy.deepcopy(model).double()
    ctxd = md.encode(ctx.idx)
    eps = 1e-2
    with torch.no_grad():
        fd = (md.step(h.double() + eps * v.double(), ctxd) - md.step(h.double() - eps * v.double(), ctxd)) / (2 * eps)
    assert float((fd - jv).norm() / jv.norm()) < 2e-4


@settings(max_examples=10)
@given(st.integers(0, 2 ** 31 - 1))
def test_adjoint_identity(setup, seed):
    model, ctx, h, _ = setup
    rng = np.random.default_rng(seed)
    v, w = rng.standard_normal(h.numel()), rng.standard_normal(h.numel())
    J = loop_jacobian(model, h, ctx)
    lhs, rhs = float(np.dot(J.matvec(v), w)), float(np.dot(v, J.rmatvec(w)))
    assert abs(lhs - rhs) <= 1e-5 * np.linalg.norm(J.matvec(v)) * np.linalg.norm(w)


def test_matmat_and_rmatmat_match_dense(setup):
    model, ctx, h, dense = setup
    X = np.random.default_rng(5).standard_normal((h.numel(), 3))
    J = loop_jacobian(model, h, ctx)
    np.testing.assert_allclose(J.matmat(X), dense @ X, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(J.H.matmat(X), dense.T @ X, rtol=1e-4, atol=1e-5)
    assert J.matvecs == 3 and J.rmatvecs == 3


def test_block_lower_triangular_and_per_token_blocks(setup):
    model, ctx, h, dense = setup
    blocks = dense.reshape(B, S, D, B, S, D)
    for b in range(B):
        for b2 in range(B):
            for s in range(S):
                for s2 in range(S):
                    if b != b2 or s2 > s:  # other sequences, and later tokens, never influence token s
                        assert np.abs(blocks[b, s, :, b2, s2, :]).max() == 0
    for tok in [(0, 0), (1, 3)]:
        np.testing.assert_allclose(token_block(model, h, ctx, tok), blocks[tok[0], tok[1], :, tok[0], tok[1], :],
                                   rtol=1e-4, atol=1e-6)
    # the eigenvalues of a block-triangular matrix are those of its diagonal blocks
    pts = per_token_spectra(model, h, ctx, tokens=[(b, s) for b in range(B) for s in range(S)])
    assert rel(pts.spectral_radius.max(), np.abs(np.linalg.eigvals(dense)).max()) < 1e-4
    assert pts.spectral_norm.max() <= np.linalg.norm(dense, 2) * (1 + 1e-5)
    op = loop_jacobian(model, h, ctx, token=(1, 3))
    assert op.shape == (D, D)
    v = np.random.default_rng(0).standard_normal(D)
    np.testing.assert_allclose(op.matvec(v), blocks[1, 3, :, 1, 3, :] @ v, rtol=1e-4, atol=1e-6)


def test_lti_part_is_the_whole_jacobian_at_official_init():
    model = make("linear", perturb=0.0)
    idx = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    ctx = model.encode(idx)
    with torch.no_grad():
        h = model.step(model.init_state(ctx), ctx)
    dense = torch.autograd.functional.jacobian(lambda x: model.step(x, ctx), h).reshape(h.numel(), -1).double().numpy()
    A = model.injection.linear_part().A.dense().double().numpy()
    np.testing.assert_allclose(dense, np.kron(np.eye(4), A), atol=1e-6)
    L = lti_jacobian(model, h.shape)
    X = np.random.default_rng(1).standard_normal((h.numel(), 2))
    np.testing.assert_allclose(L.matmat(X), dense @ X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.H.matmat(X), dense.T @ X, rtol=1e-5, atol=1e-6)
    J = loop_jacobian(model, h, ctx)
    assert rel(top_singular_values(J, 1, "svds").values[0], np.linalg.norm(A, 2)) < 1e-4


def test_analysis_never_reaches_monitor_hooks_or_parameter_grads(setup):
    model, ctx, h, _ = setup
    calls = []
    handles = [model.state_tap.register_forward_hook(lambda mod, inp, out: calls.append("tap")),
               model.core[0].attn.register_forward_pre_hook(lambda mod, args: calls.append("attn"))]
    try:
        J = loop_jacobian(model, h, ctx)
        J.matvec(np.ones(h.numel()))
        J.rmatvec(np.ones(h.numel()))
        J.matmat(np.ones((h.numel(), 2)))
        lyapunov(model, ctx.idx, 2, k=2)
        assert calls == []
        assert all(p.grad is None for p in model.parameters())
        with torch.no_grad():
            model.step(h, ctx)
        assert calls == ["attn", "tap"]  # the hooks are back in place
    finally:
        for handle in handles:
            handle.remove()


def test_products_are_counted():
    model = make(perturb=0.1)
    idx = torch.randint(0, 256, (1, 3))
    ctx = model.encode(idx)
    with torch.no_grad():
        h = model.step(model.init_state(ctx), ctx)
    cost = Cost()
    J = LoopJacobian(model, h, ctx, cost=cost)
    est = top_singular_values(J, 1, method="lanczos", steps=5)
    assert (est.matvecs, est.rmatvecs) == (5, 4)
    assert (cost.linearisations, cost.jvps, cost.vjps) == (1, 5, 4)


def test_linearisation_differentiates_the_state_only_and_restores_the_weights():
    """A linearisation records its graph with the weights frozen (no weight-gradient products in
    any J·v or Jᵀ·w), and gives them back as they were — also when the forward fails."""
    from loopdyn.dynamics.loopmap import Linearisation

    model = make()
    model.lm_head.weight.requires_grad_(False)  # a user's frozen weight stays frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    idx = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    ctx = model.encode(idx)
    h = model.init_state(ctx)
    lin = Linearisation(model, ctx, h)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    w = torch.randn_like(lin.output)
    with pytest.raises(RuntimeError):  # the weights are not part of the recorded graph
        torch.autograd.grad(lin._y, next(model.parameters()), w, retain_graph=True)
    fd = (model.step(h + 1e-3 * w, ctx) - model.step(h - 1e-3 * w, ctx)).detach() / 2e-3
    torch.testing.assert_close(lin.jvp(w), fd, rtol=2e-2, atol=2e-3)

    def broken(x):
        raise ValueError("boom")
    with pytest.raises(ValueError):
        Linearisation(model, ctx, h, fn=broken)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), m=st.integers(2, 12), steps=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_norm_lower_bound_is_golub_kahan_on_the_transpose_with_a_free_first_product(n, m, steps, seed):
    """norm_lower_bound on a linearised x ↦ A x (A: m × n): Ritz values ≤ the singular values of A
    (dense SVD), all of them once the run spans the space, the first product Aᵀw0 taken by the
    linearisation itself (steps − 1 products each way), and Jᵀw0 equal to Aᵀw0."""
    from loopdyn.dynamics.jacobian import norm_lower_bound
    from loopdyn.dynamics.loopmap import Linearisation

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    w0 = torch.randn(m, generator=g, dtype=torch.float64)
    cost = Cost()
    lin = Linearisation.of(lambda x: A @ x, torch.randn(n, generator=g, dtype=torch.float64), cost=cost, w0=w0)
    torch.testing.assert_close(lin.vjp0, A.T @ w0)
    s, u, n_t, n_j = norm_lower_bound(lin, steps)
    sv = np.linalg.svd(A.numpy(), compute_uv=False)
    assert np.all(s[: len(sv)] <= sv[: len(s)] * (1 + 1e-9) + 1e-12)
    assert (n_t, n_j) == (cost.sublayer_vjps, cost.sublayer_jvps) and n_t <= steps - 1 and n_j <= steps - 1
    assert u.shape == (m,)  # the top *left* Ritz vector: a warm start in the output space
    # enough steps to span the space: σ_max exactly
    full = Linearisation.of(lambda x: A @ x, torch.zeros(n, dtype=torch.float64), w0=w0)
    np.testing.assert_allclose(norm_lower_bound(full, max(m, n) + 1)[0][0], sv[0], rtol=1e-8)
