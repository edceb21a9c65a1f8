"""dynamics.normalised on constructed normalised loops whose pre-norm growth, Jacobian through
the norm and limit sets are known in closed form, and on the spec-only Ouro reference loop
(pre-norm states from the reference, ‖J‖₂ against a dense autograd Jacobian)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loopdyn.dynamics.loopmap import DynamicsError
from loopdyn.dynamics.normalised import convergence, normalised_loop
from loopdyn.models import LoopAdapter

D, B, S = 6, 1, 3


def rms(x):
    """RMSNorm without ε or weight: ‖rms(x)‖ = √d exactly."""
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def rotation_blocks(angle, d=D):
    R = torch.zeros(d, d, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    for i in range(0, d, 2):
        R[i:i + 2, i:i + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return R


def norm_loop(M, a=1.0, loops=8, seed=0, pre=True, kind="post", normalise=True, h0=None):
    """h ↦ rms(a·M h) (pre-norm state a·M h), on B × S tokens of width D, float64, h_0 normalised."""
    M = M.to(torch.float64)
    if h0 is None:
        h0 = torch.randn(B, S, D, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    h0 = rms(h0)
    W = torch.randn(11, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    f = (lambda x: rms(x)) if normalise else (lambda x: x)
    kwargs = {"pre_norm_state": (lambda h, e: a * h @ M.T)} if pre else {}
    return LoopAdapter(encode=lambda idx: torch.zeros(B, S, D, dtype=torch.float64),
                       init_state=lambda e: h0.clone(), step=lambda h, e: f(a * h @ M.T),
                       decode=lambda h, e: h @ W.T, mean_loops=loops, state_norm_kind=kind, **kwargs)


IDX = torch.zeros(B, S, dtype=torch.long)


@pytest.mark.parametrize("a", [0.3, 1.0, 7.5])
def test_pre_norm_growth_is_the_gain_and_the_norm_absorbs_it(a):
    """h ↦ RMSNorm(a·R h), R orthogonal: ‖r_t‖/‖h_{t−1}‖ = ‖r_t‖/‖h_t‖ = a, ‖h_t‖ = √d, and
    J = (I − ĥĥᵀ)R through the norm has ‖J‖₂ = 1 whatever a is."""
    res = normalised_loop(norm_loop(orthogonal(D, 1), a), IDX, 6, jacobian_loops=None, jacobian_steps=B * S * D)
    assert np.allclose(res.step_growth, a, rtol=1e-12) and np.allclose(res.absorbed_gain, a, rtol=1e-12)
    assert np.allclose(res.token_step_growth, a, rtol=1e-12)
    assert np.allclose(res.post_norm, math.sqrt(D)) and np.allclose(res.pre_norm, a * math.sqrt(D))
    assert res.pre_norm_rate == pytest.approx(1.0, abs=1e-9) and res.mean_step_gain == pytest.approx(a)
    assert res.jacobian_loops == [1, 2, 3, 4, 5, 6]
    assert np.allclose(res.jacobian_norm, 1.0, atol=1e-8)
    # a generic rotation never settles: bounded but not converging
    assert res.convergence.counts()["not_converging"] == B * S and res.verdict == "marginal"
    js = res.to_json()
    json.dumps(js, allow_nan=False)
    assert js["step_growth"] == pytest.approx([a] * 6) and js["verdict"] == "marginal"
    assert f"{a:.3g}–{a:.3g}" in res.to_text() and "marginal" in res.to_text()


@pytest.mark.parametrize("R,period", [
    (torch.eye(D), 1), (-torch.eye(D), 2), (rotation_blocks(2 * math.pi / 3), 3), (rotation_blocks(math.pi / 2), 4),
])
def test_exact_fixed_points_and_cycles(R, period):
    res = normalised_loop(norm_loop(R, 2.0), IDX, 9, jacobian_steps=4)
    assert (res.convergence.period == period).all()
    c = res.to_json()["convergence"]
    if period == 1:
        assert c["fixed_point"] == B * S and res.verdict == "stable"
    else:
        assert c["cycle"][str(period)] == B * S and res.verdict == "marginal"
    # distances: ‖h_t − h_{t−p}‖ = 0 exactly for multiples of the period, not for smaller p
    for p in range(1, 5):
        d = np.asarray(res.cycle_distance[p - 1][p - 1:])
        assert (d < 1e-12).all() == (p % period == 0)
    assert np.isnan(res.cycle_distance[3][:3]).all()


def _spectral(evals, seed=3):
    Q = orthogonal(D, seed)
    return Q @ torch.diag(torch.tensor(evals, dtype=torch.float64)) @ Q.T, Q


def test_power_iteration_fixed_point_rate_and_jacobian():
    """h ↦ rms(M h), M = Q diag(2, 1.6, 0.1, …) Qᵀ, h_0 ∝ q₁ + c q₂ (c = 0.5, 1, 2 per token):
    h_t ∝ q₁ + c·0.8^t q₂, so the angle to the fixed point √d q₁ is atan(c·0.8^t) and the residual
    decays at rate 0.8; at the fixed point J = (I − q₁q₁ᵀ) M/2, so ‖J‖₂ = 0.8."""
    M, Q = _spectral([2.0, 1.6, 0.1, 0.05, 0.02, 0.01])
    c = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    h0 = (Q[:, 0][None, :] + c[:, None] * Q[:, 1][None, :])[None]

    def model(T):
        return norm_loop(M, loops=T, h0=h0)

    early = normalised_loop(model(16), IDX, 16, jacobian_loops=1)
    conv = early.convergence
    assert (conv.period == 0).all() and (conv.approaching == 1).all()  # still approaching after 16 loops
    assert np.allclose(conv.rate, 0.8, atol=0.01)
    t = np.arange(1, 17)
    dtheta = np.arctan(c.numpy()[:, None] * 0.8 ** (t - 1)) - np.arctan(c.numpy()[:, None] * 0.8 ** t)
    assert np.allclose(early.cycle_distance[0], (2 * np.sin(dtheta / 2)).mean(0), rtol=1e-9)
    assert early.verdict == "stable"  # approaching a fixed point counts as stable
    late = normalised_loop(model(80), IDX, 80, jacobian_loops=1, jacobian_steps=B * S * D)
    assert (late.convergence.period == 1).all() and late.verdict == "stable"
    assert late.jacobian_norm[-1] == pytest.approx(0.8, rel=1e-6)
    assert np.allclose(late.step_growth[-3:], 2.0, rtol=1e-9)  # ‖M h‖/‖h‖ → λ₁ on the attractor
    # the predicted loops to settle agree with running on (to one loop: ceil of a fitted rate)
    need = 16 + int(conv.settle_loops.max())
    assert (normalised_loop(model(need + 1), IDX, need + 1, jacobian_loops=1).convergence.period == 1).all()
    assert not (normalised_loop(model(need - 2), IDX, need - 2, jacobian_loops=1).convergence.period == 1).all()


def test_oscillating_approach_is_a_fixed_point_not_a_cycle():
    """M = Q diag(2, −1.6, …) Qᵀ: the state flips sides of q₁ each loop while it closes in at rate
    0.8, so ‖h_t − h_{t−2}‖ ≪ ‖h_t − h_{t−1}‖, yet the limit is a fixed point."""
    M, Q = _spectral([2.0, -1.6, 0.1, 0.05, 0.02, 0.01])
    h0 = (Q[:, 0] + 0.7 * Q[:, 1])[None, None].expand(B, S, D)
    res = normalised_loop(norm_loop(M, loops=16, h0=h0), IDX, 16, jacobian_loops=1)
    assert (res.convergence.approaching == 1).all() and np.allclose(res.convergence.rate, 0.8, atol=0.01)
    assert res.cycle_distance[1][-1] < 0.5 * res.cycle_distance[0][-1] and res.verdict == "stable"


def test_approach_to_a_two_cycle():
    M, _ = _spectral([-2.0, 1.0, 0.1, 0.05, 0.02, 0.01])
    res = normalised_loop(norm_loop(M, loops=8), IDX, 8, jacobian_loops=1)
    assert (res.convergence.period == 0).all() and (res.convergence.approaching == 2).all()
    assert res.to_json()["convergence"]["approaching"]["2"] == B * S and res.verdict == "marginal"
    res = normalised_loop(norm_loop(M, loops=40), IDX, 40, jacobian_loops=1)
    assert (res.convergence.period == 2).all()


def test_growth_without_a_norm_is_explosive():
    """A "pre" loop carrying an un-normalised state h ↦ 1.5·R h: the carried state is the pre-norm
    state (no pre_norm_state), its fitted growth rate is 1.5."""
    res = normalised_loop(norm_loop(orthogonal(D, 2), 1.5, pre=False, kind="pre", normalise=False), IDX, 8,
                          jacobian_loops=2, jacobian_steps=B * S * D)
    assert not res.has_pre_norm and res.pre_norm_rate == pytest.approx(1.5, rel=1e-9)
    assert np.allclose(res.absorbed_gain, 1.0)
    assert np.allclose(res.jacobian_norm, 1.5, rtol=1e-8)
    assert res.verdict == "explosive" and "1.5" in res.evidence


def test_zero_initial_state():
    """Huginn starts from h_0 = 0: the growth into loop 1 is undefined (NaN), not 1e300, and the
    absorbed gain is read from loop 2 on. h ↦ rms(a·R h + b): ‖r_t‖² = a²d + ‖b‖² + 2a⟨Rh, b⟩."""
    R, b = orthogonal(D, 4), torch.full((D,), 0.01, dtype=torch.float64)
    model = LoopAdapter(encode=lambda idx: torch.zeros(B, S, D, dtype=torch.float64),
                        step=lambda h, e: rms(3.0 * h @ R.T + b), pre_norm_state=lambda h, e: 3.0 * h @ R.T + b,
                        decode=lambda h, e: h, mean_loops=4, state_norm_kind="post")
    res = normalised_loop(model, IDX, 4, jacobian_loops=1)
    assert math.isnan(res.step_growth[0]) and np.allclose(res.step_growth[1:], 3.0, rtol=0.01)
    assert res.mean_step_gain == pytest.approx(3.0, rel=0.01)
    assert res.absorbed_gain[0] == pytest.approx(float(b.norm()) / math.sqrt(D))
    json.dumps(res.to_json(), allow_nan=False)


def test_non_finite_state_is_explosive():
    res = normalised_loop(norm_loop(torch.eye(D), float("inf")), IDX, 5)
    assert res.verdict == "explosive" and res.nonfinite_at == 1
    assert np.isnan(res.jacobian_norm).all()
    json.dumps(res.to_json(), allow_nan=False)


def test_reuses_measured_states():
    model = norm_loop(_spectral([2.0, 1.0, 0.1, 0.05, 0.02, 0.01])[0], loops=7)
    fresh = normalised_loop(model, IDX, 7)
    ctx = model.encode(IDX)
    h = [model.init_state(ctx)]
    for _ in range(7):
        h.append(model.step(h[-1], ctx))
    again = normalised_loop(model, loops=7, ctx=ctx, states=h)
    assert np.allclose(again.step_growth, fresh.step_growth) and again.verdict == fresh.verdict
    assert np.allclose(again.jacobian_norm, fresh.jacobian_norm)
    none = normalised_loop(model, loops=7, ctx=ctx, states=h, jacobian_loops=0)
    assert none.jacobian_loops == [] and none.cost.linearisations == 0 and none.verdict == fresh.verdict
    assert none.to_json()["jacobian"]["spectral_norm"] == []


def test_bad_input_one_line():
    with pytest.raises(DynamicsError, match="loops must be"):
        normalised_loop(norm_loop(torch.eye(D)), IDX, 0)
    with pytest.raises(DynamicsError, match="idx"):
        normalised_loop(norm_loop(torch.eye(D)))


def test_convergence_classifier_on_hand_made_sequences():
    """Token 0 fixed, token 1 a 3-cycle, token 2 approaching a fixed point at rate 0.8."""
    T = 12
    base = torch.tensor([1.0, 0.0])
    states = []
    for t in range(T + 1):
        ang = 2 * math.pi * t / 3
        h = torch.stack([base, torch.tensor([math.cos(ang), math.sin(ang)]),
                         torch.tensor([1.0, 0.8 ** t])])[None]
        states.append(h.to(torch.float64))
    conv, dist = convergence(states, tol=1e-3)
    assert conv.period.tolist() == [[1, 3, 0]] and conv.approaching[0, 2] == 1
    assert conv.rate[0, 2] == pytest.approx(0.8, rel=1e-2)  # relative to ‖h_t‖ → 1
    assert dist.shape == (4, T) and np.isnan(dist[2, :2]).all()


def ouro_reference_adapter(cfg, sd, L: int, split: bool = False):
    """The spec-only Ouro loop (tests/ouro_reference.py) as a LoopedModel on sequences of length
    L: h_0 = embedding, step = model.norm ∘ layers, pre-norm state = layers, gate σ(w·h + b)."""
    from tests import ouro_reference as ouro
    from tests.hf_layout_reference import rms_norm

    dims = ouro._dims(cfg)
    cos, sin = ouro.rope_cos_sin(cfg, L, sd["model.embed_tokens.weight"].dtype)  # activation dtype (§4)

    def stack(h):
        for i in range(dims.L):
            h = ouro._layer(h, sd, i, dims, cos, sin)
        return h

    gw, gb = sd["model.early_exit_gate.weight"][0], sd["model.early_exit_gate.bias"]
    return LoopAdapter(encode=lambda i: sd["model.embed_tokens.weight"][i], init_state=lambda e: e.clone(),
                       step=lambda h, e: rms_norm(stack(h), sd["model.norm.weight"], dims.eps),
                       pre_norm_state=lambda h, e: stack(h), decode=lambda h, e: h @ sd["lm_head.weight"].T,
                       renormalise=(lambda r, e: rms_norm(r, sd["model.norm.weight"], dims.eps)) if split else None,
                       exit_gate=lambda h, e: torch.sigmoid(h @ gw + gb), mean_loops=cfg["total_ut_steps"],
                       state_norm_kind="post")


def test_ouro_reference_loop_pre_norm_and_dense_jacobian(tmp_path):
    """The spec-only Ouro loop wrapped as a LoopedModel: pre-norm and post-norm states match the
    reference's, the norm absorbs a gain > 1, and ‖J‖₂ through the norm matches a dense autograd
    Jacobian."""
    from tests import ouro_reference as ouro

    cfg, sd = ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path, seed=2))
    idx = torch.tensor([[3, 17, 99, 5]])
    model = ouro_reference_adapter(cfg, sd, 4)
    ref = ouro.reference_forward((cfg, sd), idx, 5)
    res = normalised_loop(model, idx, 5, jacobian_loops=None, jacobian_steps=40)
    for t in range(5):
        want = torch.linalg.vector_norm(ref.pre_norm_states[t].double(), dim=-1).mean()
        assert res.pre_norm[t] == pytest.approx(float(want), rel=1e-5)
        want = torch.linalg.vector_norm(ref.states[t + 1].double(), dim=-1).mean()
        assert res.post_norm[t] == pytest.approx(float(want), rel=1e-5)
    assert (res.absorbed_gain > 1).all()
    h = ref.states[3].detach()
    J = torch.autograd.functional.jacobian(lambda x: model.step(x, None), h).reshape(h.numel(), h.numel())
    sigma = float(torch.linalg.matrix_norm(J.double(), 2))
    assert res.jacobian_norm[2] == pytest.approx(sigma, rel=1e-3)


def test_the_audit_reads_the_pre_norm_states_off_its_own_steps(tmp_path):
    """A model with `renormalise` (step = renormalise ∘ pre_norm_state) is linearised as that
    composition: the audit's normalised-loop figures are those of the model without it (which
    recomputes r_t = pre_norm_state(h_{t−1}) in T more passes), for T fewer steps; and they are
    the spec-only reference's pre-norm norms."""
    from loopdyn.dynamics.auditing import audit
    from tests import ouro_reference as ouro

    cfg, sd = ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path, seed=3))
    idx = torch.tensor([[3, 17, 99, 5, 42, 7]])
    T = 4
    split, plain = (audit(ouro_reference_adapter(cfg, sd, 6, split=s), idx, loops=T, horizon=8) for s in (True, False))
    assert plain.cost.steps - split.cost.steps == T
    a, b = split.normalised, plain.normalised
    np.testing.assert_allclose(a.pre_norm, b.pre_norm, rtol=1e-6)
    np.testing.assert_allclose(a.step_growth, b.step_growth, rtol=1e-6)
    np.testing.assert_allclose(a.absorbed_gain, b.absorbed_gain, rtol=1e-6)
    assert a.verdict == b.verdict and split.verdict == plain.verdict
    ref = ouro.reference_forward((cfg, sd), idx, T)
    for t in range(T):
        want = torch.linalg.vector_norm(ref.pre_norm_states[t].double(), dim=-1).mean()
        assert a.pre_norm[t] == pytest.approx(float(want), rel=1e-5)


def test_a_renormalise_that_is_not_the_steps_end_is_named():
    """step must be renormalise ∘ pre_norm_state: an adapter whose renormalise is something else
    is a ProtocolError that names it (the audit would otherwise analyse another map)."""
    from loopdyn.dynamics.auditing import audit
    from loopdyn.models.protocol import ProtocolError

    W = torch.eye(4) * 0.5
    model = LoopAdapter(encode=lambda i: torch.ones(*i.shape, 4), init_state=lambda e: e.clone(),
                        step=lambda h, e: torch.nn.functional.normalize(h @ W.T + e, dim=-1),
                        pre_norm_state=lambda h, e: h @ W.T + e, renormalise=lambda r, e: 2 * r,
                        decode=lambda h, e: h, mean_loops=3, state_norm_kind="post")
    with pytest.raises(ProtocolError, match="renormalise"):
        audit(model, torch.tensor([[1, 2, 3]]), loops=3, horizon=6)
