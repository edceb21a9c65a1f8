"""dynamics.exit_gate on constructed gates whose exit loops are known in closed form, against
convergence loops computed independently (float64 closed-form trajectories, plain loops)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from loopdyn.dynamics.exit_gate import converged_loops, exit_distribution, exit_gate_audit, exit_loops
from loopdyn.dynamics.loopmap import DynamicsError
from loopdyn.models import LoopAdapter

T = 10
D, V = 4, 9
# per token: contraction rate ρ, and the loop k at which the hard gate fires (T + 1 = never)
RHO = [0.9, 0.01, 0.5, 0.3, 0.95, 0.6]
FIRE = [1, T + 1, 4, 9, 2, 6]
S = len(RHO)
KL_TOL, RES_TOL = 1e-3, 1e-3


def contraction_model(gate: str = "hard", lam: float = 0.3):
    """x_t = x* + ρ^t (x_0 − x*) per token (float64). The hard gate is 1 exactly when
    ‖x − x*‖ < θ with θ = D₀·ρ^(k − ½), so it fires first at loop k (θ = 0: never); "const"
    returns λ."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, S, D, generator=g, dtype=torch.float64)
    xs = torch.randn(1, S, D, generator=g, dtype=torch.float64)
    W = 3 * torch.randn(V, D, generator=g, dtype=torch.float64)
    rho = torch.tensor(RHO, dtype=torch.float64)[None, :, None]
    d0 = torch.linalg.vector_norm(x0 - xs, dim=-1)
    fire = torch.tensor(FIRE, dtype=torch.float64)
    theta = torch.where(fire > T, 0.0, d0 * torch.tensor(RHO, dtype=torch.float64) ** (fire - 0.5))
    if gate == "hard":
        def exit_gate(h, ctx):
            return (torch.linalg.vector_norm(h - xs, dim=-1) < theta).to(torch.float64)
    else:
        def exit_gate(h, ctx):
            return torch.full(h.shape[:-1], lam, dtype=torch.float64)
    model = LoopAdapter(encode=lambda idx: x0, init_state=lambda e: e.clone(),
                        step=lambda h, e: xs + rho * (h - xs), decode=lambda h, e: h @ W.T,
                        exit_gate=exit_gate, mean_loops=T, state_norm_kind="none")
    return model, x0.numpy()[0], xs.numpy()[0], W.numpy()


IDX = torch.zeros(1, S, dtype=torch.long)


def ground_truth():
    """Closed-form trajectories, changes and convergence loops with plain Python loops."""
    _, x0, xs, W = contraction_model()
    exit_loop, conv = [], []
    for s in range(S):
        xt = [xs[s] + RHO[s] ** t * (x0[s] - xs[s]) for t in range(T + 1)]
        logits = [W @ x for x in xt]
        logp = [lg - np.log(np.exp(lg - lg.max()).sum()) - lg.max() for lg in logits]
        res = [np.linalg.norm(xt[t] - xt[t - 1]) / np.linalg.norm(xt[t]) for t in range(1, T + 1)]
        kl = [math.nan] + [float(np.sum(np.exp(logp[t]) * (logp[t] - logp[t - 1]))) for t in range(2, T + 1)]
        changing = [res[i] > RES_TOL or (i > 0 and kl[i] > KL_TOL) for i in range(T)]  # change into loop i+1
        last_big = max([i + 1 for i in range(1, T) if changing[i]], default=1)
        conv.append(0 if last_big == T else last_big)
        exit_loop.append(min(FIRE[s], T))
    return np.array(exit_loop), np.array(conv)


def test_hard_gate_exit_loops_and_convergence_against_closed_form():
    model, *_ = contraction_model()
    res = exit_gate_audit(model, IDX, T, threshold=0.5, kl_tol=KL_TOL, residual_tol=RES_TOL)
    exit_loop, conv = ground_truth()
    assert res.exit_loop[0].tolist() == exit_loop.tolist() == [1, 10, 4, 9, 2, 6]
    assert res.converged_loop[0].tolist() == conv.tolist()
    # the constructed mix: fast tokens that loop on, slow tokens that exit early, one that never settles
    changing = (exit_loop < T) & ((conv == 0) | (exit_loop < conv))
    after = (conv > 0) & (exit_loop > conv)
    assert res.exits_while_changing[0].tolist() == changing.tolist()
    assert res.loops_after_converged[0].tolist() == after.tolist()
    assert changing.sum() >= 2 and after.sum() >= 2
    c = res.counts()
    assert c["exit_while_changing"] == changing.sum() and c["loop_after_converged"] == after.sum()
    assert c["tokens"] == S and c["exit_at_last_loop"] == 1
    assert res.wasted_loops[0].tolist() == np.where(after, exit_loop - conv, 0).tolist()
    # the hard gate: p is one-hot at the exit loop (or at T for the token it never fires for)
    assert np.allclose(res.exit_probs.sum(0), 1.0)
    assert (res.exit_probs.argmax(0)[0] + 1).tolist() == exit_loop.tolist()
    js = res.to_json()
    json.dumps(js, allow_nan=False)
    assert sum(js["exit_histogram"]) == S and sum(js["converged_histogram"]) == S
    assert js["exit_histogram"][0] == 1 and js["kl_mean"][0] is None
    assert js["tokens_by_position"]["exit_loop"] == [exit_loop.tolist()]
    assert f"{changing.sum()} exit while still changing" in res.to_text()
    # an early exit costs KL(p_T ‖ p_e) > 0; exiting at T costs nothing
    assert res.exit_kl_to_final[0, 1] == 0.0 and res.exit_kl_to_final[0, 0] > KL_TOL


@pytest.mark.parametrize("lam,q", [(0.3, 0.5), (0.3, 0.9), (0.05, 0.9), (0.7, 0.99)])
def test_constant_gate_exits_where_the_geometric_tail_crosses_q(lam, q):
    """λ_t = λ: Σ_{j≤t} p_j = 1 − (1 − λ)^t for t < T, so e = ⌈log(1 − q)/log(1 − λ)⌉ (≤ T)."""
    model, *_ = contraction_model("const", lam)
    res = exit_gate_audit(model, IDX, T, threshold=q)
    want = min(T, math.ceil(math.log(1 - q) / math.log(1 - lam)))
    assert (res.exit_loop == want).all()


def test_threshold_one_exits_at_the_last_loop():
    """Ouro's released threshold 1.0: in exact arithmetic only the remainder at T reaches it."""
    model, *_ = contraction_model("const", 0.3)
    assert (exit_gate_audit(model, IDX, T, threshold=1.0).exit_loop == T).all()


@given(lam=st.floats(0.01, 0.99), q=st.floats(0.01, 0.99), n=st.integers(1, 12))
def test_exit_loops_property(lam, q, n):
    t_cross = math.log(1 - q) / math.log(1 - lam)
    assume(abs(t_cross - round(t_cross)) > 1e-6)
    got = exit_loops(np.full((n, 3), lam), q)
    assert (got == min(n, math.ceil(t_cross))).all()
    p = exit_distribution(np.full((n, 3), lam))
    assert np.allclose(p.sum(0), 1.0) and (p >= 0).all()


def test_converged_loops_by_hand():
    ch = np.array([[9.0, 9.0, 9.0, 9.0],    # loop 1
                   [0.0, 9.0, 9.0, 0.0],    # loop 2
                   [0.0, 0.0, 9.0, 9.0],    # loop 3
                   [0.0, 0.0, 0.0, 9.0]])   # loop 4 (= T)
    assert converged_loops(ch, 1.0).tolist() == [1, 2, 3, 0]
    assert converged_loops(np.full((4, 1), np.nan), 1.0).tolist() == [0]  # unknown changes are not small


def test_plot_exit_gate_draws_every_token():
    model, *_ = contraction_model()
    res = exit_gate_audit(model, IDX, T, threshold=0.5, kl_tol=KL_TOL, residual_tol=RES_TOL)
    from types import SimpleNamespace

    from loopdyn.plots.audit import plot_exit_gate

    fig, caption = plot_exit_gate(SimpleNamespace(exit_gate=res))
    ax = fig.axes[0]
    assert sum(len(line.get_xdata()) for line in ax.lines if line.get_label().endswith(")")) == S
    assert f"{res.counts()['exit_while_changing']} exit while still changing" in caption
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"({res.counts()['exit_while_changing']})" in t and "changing" in t for t in labels)
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_bad_inputs_one_line():
    model, *_ = contraction_model()
    plain = LoopAdapter(encode=lambda idx: torch.zeros(1, S, D), step=lambda h, e: h, decode=lambda h, e: h,
                        mean_loops=3)
    with pytest.raises(DynamicsError, match="no exit_gate"):
        exit_gate_audit(plain, IDX)
    with pytest.raises(DynamicsError, match="threshold"):
        exit_gate_audit(model, IDX, threshold=0.0)
    with pytest.raises(DynamicsError, match="loops"):
        exit_gate_audit(model, IDX, loops=0)
    wrong = LoopAdapter(encode=lambda idx: torch.zeros(1, S, D), step=lambda h, e: h, decode=lambda h, e: h,
                        exit_gate=lambda h, e: torch.full((1, S), 2.0), mean_loops=3)
    with pytest.raises(DynamicsError, match=r"\[0, 1\]"):
        exit_gate_audit(wrong, IDX)


@pytest.mark.parametrize("q", [0.5, 0.9])
def test_ouro_reference_gate_exit_loops(tmp_path, q):
    """On the spec-only Ouro loop with confident gates, the audit's exit loops (float64 from λ)
    equal the reference's threshold rule (float32, spec §3.5) for thresholds away from 1."""
    from tests import ouro_reference as ouro
    from tests.test_dynamics_normalised import ouro_reference_adapter

    cfg, sd = ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path, seed=6, gate_scale=4.0))
    idx = torch.tensor([[3, 17, 99, 5, 64, 1, 8, 42]])
    ref = ouro.reference_forward((cfg, sd), idx, 6, threshold=q)
    res = exit_gate_audit(ouro_reference_adapter(cfg, sd, 8), idx, 6, threshold=q)
    assert np.allclose(res.gate, ref.gate_probs.double().numpy(), atol=1e-6)
    assert (res.exit_loop == ref.exit_step.numpy() + 1).all()
    assert len(set(res.exit_loop.ravel().tolist())) >= 3  # the gate spreads exits over loops


def test_bfloat16_rule_exits_confident_gates_early():
    """Spec §8.2: in bfloat16 the cumulative sum rounds to 1.0 once the remaining mass is below
    ≈ 2⁻⁹, so threshold 1.0 exits a confident token early; in float64 it runs to T."""
    lam = np.full((6, 2), 0.99)
    lam[:, 1] = 0.5
    assert exit_loops(lam, 1.0).tolist() == [6, 6]
    assert exit_loops(lam, 1.0, torch.bfloat16).tolist() == [2, 6]
    p16 = exit_distribution(lam, torch.bfloat16)
    assert np.allclose(p16.sum(0), 1.0, atol=1e-2) and not np.allclose(p16, exit_distribution(lam), atol=1e-4)


def test_bfloat16_rule_matches_the_reference_in_bfloat16(tmp_path):
    """On the spec-only Ouro loop run in bfloat16, the audit's bf16 rule picks the reference's exit
    loop (gate, products and cumulative sum in bf16, spec §3.5) token for token, at threshold 1.0."""
    from tests import ouro_reference as ouro
    from tests.test_dynamics_normalised import ouro_reference_adapter

    cfg, sd = ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path, seed=6, gate_scale=4.0, gate_bias=3.0))
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    idx = torch.tensor([[3, 17, 99, 5, 64, 1, 8, 42]])
    ref = ouro.reference_forward((cfg, sd16), idx, 6, threshold=1.0, dtype=torch.bfloat16)
    res = exit_gate_audit(ouro_reference_adapter(cfg, sd16, 8), idx, 6, threshold=1.0, gate_dtype=torch.bfloat16)
    assert (res.exit_loop == ref.exit_step.numpy() + 1).all()
    assert (res.exit_loop < 6).sum() >= 4  # early exits at the released threshold
    assert res.to_json()["gate_dtype"] == "bfloat16"
