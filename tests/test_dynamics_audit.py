"""dynamics.audit and dynamics.gain_graph: the docs/design.md §7 record, the per-loop Jacobian sweep
against dense Jacobians, and the gain graph against dense sublayer Jacobians."""
import json
import math
import re

import networkx as nx
import numpy as np
import pytest
import torch

from loopdyn.dynamics import DynamicsError, audit, gain_graph, gain_graph_json
from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.models.errors import InputError
from loopdyn.io import json_safe
from tests.helpers import small_loop_model

D = 16
SECTIONS = {
    "model": {"path", "format", "injection", "params", "d_state", "mean_loops"},
    "injection": {"spectral_norm", "spectral_radius", "eigenvalues", "transient_max", "kreiss_bound",
                  "settle_loops", "stable"},
    "trajectory": {"loops", "state_norm", "rel_residual"},
    "jacobian": {"loops", "spectral_norm", "spectral_radius", "method", "matvecs"},
    "lyapunov": {"exponents", "loops"},
    "forecast": {"verdict", "growth_rate", "max_safe_loops", "loops", "state_norm", "measured_loops", "evidence"},
    "gain_graph": {"nodes", "edges", "cycle_gain", "method"},  # method: how the gains were measured
}


def make(injection="diagonal", perturb=0.2, block="prenorm", seed=0):
    return small_loop_model(injection, d=D, perturb=perturb, seed=seed, block=block, mean_loops=4)


IDX = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3))


def plain(obj):
    """Only JSON types (after json_safe) — numbers are plain floats/ints."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(plain(v) for v in obj)
    return obj is None or type(obj) in (str, int, float, bool)


def test_json_has_exactly_the_design_fields():
    report = audit(make(), IDX, loops=4, horizon=12)
    js = json_safe(report.to_json())
    # docs/design.md §7 plus `skipped` (what the model's protocol members did not allow; empty here)
    assert set(js) == set(SECTIONS) | {"verdict", "skipped", "normalised", "exit_gate", "phases", "precision"} and js["skipped"] == []
    assert js["normalised"] is None and js["exit_gate"] is None  # a pre-norm loop without an exit gate
    for name, keys in SECTIONS.items():
        assert set(js[name]) == keys, name
    assert plain(js)
    json.dumps(js, allow_nan=False)
    assert js["verdict"] == js["forecast"]["verdict"] in ("stable", "marginal", "explosive")
    assert js["trajectory"]["loops"] == [1, 2, 3, 4] and js["forecast"]["loops"] == list(range(1, 13))
    assert js["forecast"]["state_norm"][:4] == js["trajectory"]["state_norm"]
    assert js["model"]["format"] == "loopdyn" and js["model"]["path"] is None and js["model"]["d_state"] == D
    assert all(len(p) == 2 for p in js["injection"]["eigenvalues"])
    assert js["lyapunov"]["loops"] == 4 and len(js["lyapunov"]["exponents"]) == 4
    edges = js["gain_graph"]["edges"]
    assert all(len(e) == 3 and e[0] in js["gain_graph"]["nodes"] for e in edges)
    # T + 1: one per measured state; the forecast reuses the sweep's linearisations at h_T and h_(T−w)
    assert report.jacobian.matvecs > 0 and report.cost.linearisations == 5


def dense_jacobian(model, ctx, h):
    J = torch.autograd.functional.jacobian(lambda x: model.step(x, ctx), h)
    return J.reshape(h.numel(), h.numel()).double().numpy()


def test_sweep_estimates_against_dense_jacobians():
    model = make()
    report = audit(model, IDX, loops=4, horizon=8, jacobian_steps=12, arnoldi_steps=40, krylov_dim=40)
    ctx = model.encode(IDX)
    with torch.no_grad():
        states = [model.init_state(ctx)]
        for _ in range(4):
            states.append(model.step(states[-1], ctx))
    for t, sig, rho in zip(report.jacobian.loops, report.jacobian.spectral_norm, report.jacobian.spectral_radius):
        Jd = dense_jacobian(model, ctx, states[t])
        s_true = np.linalg.norm(Jd, 2)
        assert sig <= s_true * (1 + 1e-5)  # Golub–Kahan Ritz values are lower bounds
        assert sig == pytest.approx(s_true, rel=1e-4)
        assert rho == pytest.approx(np.abs(np.linalg.eigvals(Jd)).max(), rel=1e-3)


def test_default_budget_gives_lower_bounds_and_rough_radii():
    model = make()
    report = audit(model, IDX, loops=4, horizon=8)
    ctx = model.encode(IDX)
    with torch.no_grad():
        h = model.init_state(ctx)
        for _ in range(4):
            h = model.step(h, ctx)
    Jd = dense_jacobian(model, ctx, h)
    assert report.jacobian.spectral_norm[-1] <= np.linalg.norm(Jd, 2) * (1 + 1e-5)
    assert report.jacobian.spectral_norm[-1] >= 0.7 * np.linalg.norm(Jd, 2)


def sublayer_inputs(model, h, ctx):
    """The inputs of each core sublayer at state h, and the sublayer increment functions."""
    out = []
    with torch.no_grad():
        x = model.injection(h, ctx.e)
    for blk in model.core:
        fa = lambda z, blk=blk: blk.attn(blk.norm_1(z), ctx.rope, None)
        out.append((x, fa))
        with torch.no_grad():
            x = x + fa(x)
        fm = lambda z, blk=blk: blk.mlp(blk.norm_2(z))
        out.append((x, fm))
        with torch.no_grad():
            x = x + fm(x)
    return out


def test_gain_graph_edges_are_sublayer_jacobian_norms():
    model = make()
    ctx = model.encode(IDX)
    with torch.no_grad():
        h = model.init_state(ctx)
        for _ in range(3):
            h = model.step(h, ctx)
    G = gain_graph(model, h=h, ctx=ctx, steps=30)
    assert isinstance(G, nx.DiGraph)
    local = [(u, v, d["gain"]) for u, v, d in G.edges(data=True) if d["kind"] == "local_lipschitz"]
    assert [v for _, v, _ in local] == ["core.0.attn", "core.0.mlp", "core.1.attn", "core.1.mlp"]
    for (x, fn), (_, _, gain) in zip(sublayer_inputs(model, h, ctx), local):
        Jd = torch.autograd.functional.jacobian(fn, x).reshape(x.numel(), x.numel()).double().numpy()
        assert gain == pytest.approx(np.linalg.norm(Jd, 2), rel=1e-4)
    a_norm = float(model.injection.A_bar().detach().abs().max())
    expected = a_norm * np.prod([1 + g for _, _, g in local])
    assert G.graph["cycle_gain"] == pytest.approx(expected, rel=1e-9)
    assert G["h"]["Ā"]["gain"] == pytest.approx(a_norm)
    assert G["h"]["C"]["gain"] == pytest.approx(np.linalg.norm(model.readout.weight.detach().double().numpy(), 2))
    cycle = nx.find_cycle(G, "h")
    assert cycle[0][0] == "h" and cycle[-1][1] == "h"  # the loop closes
    js = gain_graph_json(G)
    assert js["cycle_gain"] == G.graph["cycle_gain"] and len(js["edges"]) == G.number_of_edges()


def test_gain_graph_at_official_init_is_the_injection_alone():
    model = make(perturb=0.0)
    G = gain_graph(model, IDX)
    a = float(model.injection.A_bar().detach()[0])
    assert G.graph["cycle_gain"] == pytest.approx(a, rel=1e-6) and G.graph["small_gain"]


def test_sandwich_blocks_have_no_skip_edges():
    G = gain_graph(make(block="sandwich"), IDX)
    assert not G.has_edge("u", "core.0.attn+res")
    assert G.has_edge("u", "core.0.attn") and G.graph["cycle_gain"] > 0


def test_audit_verdicts_follow_the_state():
    lin = make("linear", perturb=0.0)
    with torch.no_grad():
        lin.injection.W.weight[:, :D] = 1.3 * torch.eye(D)
    assert audit(lin, IDX, loops=4, horizon=16).verdict == "explosive"
    assert audit(make("diagonal"), IDX, loops=4, horizon=16).verdict == "stable"
    assert audit(make("additive", perturb=0.0), IDX, loops=4, horizon=16).verdict == "marginal"


def test_nonfinite_weights_are_a_verdict_not_a_crash():
    model = make()
    with torch.no_grad():
        model.core[1].attn.c_q.weight[0, 0] = float("inf")
    report = audit(model, IDX, loops=4, horizon=8)
    js = json_safe(report.to_json())
    assert js["verdict"] == "explosive" and js["forecast"]["evidence"][0].startswith("non-finite")
    json.dumps(js, allow_nan=False)
    assert "VERDICT: EXPLOSIVE" in report.to_text()


@pytest.mark.parametrize("kw", [dict(loops=0), dict(loops=10 ** 6), dict(loops=4, horizon=2), dict(loops=2.5)])
def test_bad_loop_counts_are_input_errors(kw):
    with pytest.raises(InputError):
        audit(make(), IDX, **kw)


def test_fixed_depth_model_has_no_loop():
    model = LoopedLM(LoopConfig.preset("gpt-tiny", d_model=D, n_heads=2, d_mlp=2 * D, value_embeds=False))
    with pytest.raises(DynamicsError, match="no loop"):
        audit(model, IDX)


def test_probe_longer_than_the_context_is_an_input_error():
    model = make()
    with pytest.raises(InputError, match="longer"):
        audit(model, torch.zeros(1, model.config.block_size + 1, dtype=torch.long), loops=2)


def test_text_report_names_the_deciding_evidence():
    report = audit(make(), IDX, loops=4, horizon=12)
    text = report.to_text()
    assert f"decided by {report.forecast.decided_by}" in text and "‖Ā‖₂" in text
    assert math.isfinite(report.gain.graph["cycle_gain"])


def test_audit_in_training_mode_leaves_the_global_rng_and_mode_alone():
    torch.manual_seed(0)
    model = LoopedLM(LoopConfig.preset("tiny", d_model=D, n_heads=2, d_mlp=2 * D, value_embeds=False,
                                       state_init="like-init")).train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    audit(model, IDX, loops=3, horizon=6)
    assert torch.equal(torch.rand(3), expected) and model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("steps", [1, 3, 6, 9])
def test_the_head_of_an_arnoldi_run_is_the_shorter_run(steps):
    """KrylovResult.head(m) of a 10-step run is, exactly, the m-step run from the same vector
    (the audit reads ρ(J_t) from the head of the run it hands to the forecast)."""
    from loopdyn.dynamics.forecasting import krylov_at
    from loopdyn.dynamics.loopmap import Linearisation

    model = make()
    ctx = model.encode(IDX)
    with torch.no_grad():
        h1 = model.step(model.init_state(ctx), ctx)
        h2 = model.step(h1, ctx)
    lin = Linearisation(model, ctx, h2)
    r = (h2 - h1).double()
    head, short = krylov_at(lin, h2, r, 10).head(steps), krylov_at(lin, h2, r, steps)
    assert head.H.shape == short.H.shape == (steps, steps) and head.exact is short.exact is False
    assert np.array_equal(head.H, short.H) and np.array_equal(head.Hbar, short.Hbar)
    assert np.array_equal(head.ritz, short.ritz) and np.array_equal(head.c, short.c) and head.beta == short.beta
    assert len(head.basis) == len(short.basis) == steps + 1
    assert all(torch.equal(a, b) for a, b in zip(head.basis, short.basis))
    assert torch.equal(head.first_image(), short.first_image())


@pytest.mark.parametrize("spectra_everywhere", [True, False])
def test_the_forecast_reuses_the_sweeps_arnoldi_runs_without_changing_a_number(spectra_everywhere):
    """The audit hands its Arnoldi runs at T and T − w and its Jacobian subspace at T (made in the
    sweep, so no recorded graph outlives its loop) to the forecast: the forecast is the one it
    computes on its own, number for number, without linearising or multiplying anything."""
    from loopdyn.dynamics import forecasting as fc
    from loopdyn.dynamics.auditing import _jacobian_loops, _sweep
    from loopdyn.dynamics.loopmap import Cost
    from loopdyn.dynamics.trajectory import encode_probe, trajectory_of

    model, T, H = make(perturb=0.4), 4, 16
    keep = set(fc.forecast_loops(T))
    assert len(keep) == 2  # T and T − w
    cost = Cost()
    ctx = encode_probe(model, IDX)
    # spectra at every loop, or at loop T only (then T − w gets the forecast's run all the same)
    loops = _jacobian_loops(T, None) if spectra_everywhere else [T]
    states, (_, _, krylovs, sub_T, _, _) = _sweep(model, ctx, T, 2, 3, 3, 5, loops, cost, lambda *a: None, keep=keep)
    traj = trajectory_of(states, ctx, T)
    assert set(krylovs) == keep and all(k.H.shape[1] == 5 for k in krylovs.values())
    assert (sub_T.n, sub_T.from_r) == (5 + 2 * 4, 5)  # the Krylov run and two 4-step random starts
    runs = {}
    for given in (True, False):
        before = (cost.jvps, cost.linearisations)
        f = fc.forecast_from(model, traj, None, H, krylovs=krylovs if given else None, krylov_dim=5, cost=cost,
                             subspace=sub_T if given else None)
        js = json_safe(f.to_json())
        # the evidence counts the products this call made; every other word and number is the same
        js["evidence"] = [re.sub(r"\(\d+ products\)", "(n products)", e) for e in js["evidence"]]
        runs["given" if given else "own"] = (js, cost.jvps - before[0], cost.linearisations - before[1])
    assert runs["given"][0] == runs["own"][0]
    assert runs["given"][1:] == (0, 0)
    assert runs["own"][1:] == (2 * 5 + 2 * 4, 2)  # two krylov_dim-step runs, the random starts at T only


def test_the_audit_measures_the_loop_through_its_linearisations():
    """The audit's states are the outputs of its linearisations (recorded, math attention): the
    same trajectory as the plain loop, to float32 round-off, and the same probe losses."""
    from loopdyn.dynamics.trajectory import measure_trajectory

    model = make(perturb=0.4)
    report = audit(model, IDX, loops=4, horizon=8)
    plain = measure_trajectory(model, IDX, 4)
    np.testing.assert_allclose(report.trajectory.state_norm, plain.state_norm, rtol=1e-5)
    np.testing.assert_allclose(report.trajectory.rel_residual[1:], plain.rel_residual[1:], rtol=1e-4)
    losses = [float(model(IDX[:, :-1], IDX[:, 1:], n_loops=t).loss) for t in range(1, 9)]
    np.testing.assert_allclose(report.forecast.overthinking.loss, losses, rtol=1e-5)
