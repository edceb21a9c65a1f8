"""Issue 22 part 2: the precision audit against ground truth.

* a loop whose only difference between bf16 and float32 is the rounding of Ā (diagonal decays
  of 0.9999, which bf16 stores as exactly 1.0): flagged, bf16 verdict `marginal`, float32 `stable`;
* linear maps with a known leading exponent (μ·Q, Q orthogonal: every eigenvalue has modulus μ,
  λ₁ = log μ exactly): the measured divergence rate matches λ₁ within 10 %;
* float32 against float64 on a contracting loop: the divergence stays at round-off (≤ u·κ);
* an exit-gate model (the spec-only Ouro reference adapter): the exit loops are compared.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from torch import nn

from loopdyn.dynamics.auditing import audit
from loopdyn.dynamics.precision import (audit_with_precision, combine_verdict, divergence_rate, parameters_in,
                                        precision_audit)
from loopdyn.models import LoopAdapter, LoopConfig, LoopedLM
from loopdyn.models.precision import precision


class Linear(nn.Module):
    def __init__(self, A, c, W):
        super().__init__()
        self.A, self.c, self.W = nn.Parameter(A), nn.Parameter(c), nn.Parameter(W)


def linear_loop(mu: float, n: int = 16, T: int = 40, seed: int = 0, contracting_to=None):
    """h_{t+1} = A h_t + c with A = μ·Q (Q orthogonal, λ₁ = log μ), or for `contracting_to` a
    fixed point h*: c = (I − A) h*; decode = W h."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = mu * Q
    h0 = torch.randn(n, generator=g, dtype=torch.float64)
    c = torch.zeros(n, dtype=torch.float64) if contracting_to is None else (torch.eye(n, dtype=torch.float64) - A) @ h0
    if contracting_to is not None:
        h0 = h0 + contracting_to * torch.randn(n, generator=g, dtype=torch.float64)  # start away from h*
    net = Linear(A.float(), c.float(), torch.randn(24, n, generator=g, dtype=torch.float64).float())
    return LoopAdapter(encode=lambda idx: torch.zeros(*idx.shape, n, dtype=net.A.dtype),
                       init_state=lambda e: (h0.to(e.dtype) + torch.arange(e.shape[1], dtype=e.dtype)[:, None])
                       .expand_as(e).clone(),
                       step=lambda h, e: h @ net.A.T + net.c, decode=lambda h, e: h @ net.W.T,
                       mean_loops=T, module=net)


IDX = torch.zeros(2, 4, dtype=torch.long)


@pytest.mark.parametrize("mu", [2.0, 1.5, 1.25])
@pytest.mark.parametrize("dtype", ["bf16", "float32"])
def test_divergence_rate_matches_the_leading_exponent(mu, dtype):
    T = 40
    r = precision_audit(linear_loop(mu, T=T), IDX, T, dtype)
    lam = math.log(mu)
    assert r.regime == "expanding" and r.lyapunov == pytest.approx(lam, rel=1e-6)  # the audit's own λ₁
    assert r.divergence_rate == pytest.approx(lam, rel=0.10), (r.divergence_rate, lam, r.fit_loops)
    assert r.reference == ("float32" if dtype == "bf16" else "float64")
    assert len(r.fit_loops) == 2 and r.fit_loops[1] - r.fit_loops[0] >= 2


def test_contracting_loop_float32_against_float64_stays_at_roundoff():
    T = 30
    rho = 0.5
    r = precision_audit(linear_loop(rho, T=T, contracting_to=1.0), IDX, T, "float32")
    assert r.reference == "float64" and r.regime == "contracting"
    u = 2.0 ** -24
    kappa = 1 / (1 - rho)
    assert r.predicted_plateau == pytest.approx(u / (1 - math.exp(r.lyapunov)))
    assert r.lyapunov == pytest.approx(math.log(rho), rel=1e-6)
    # round-off of every loop, forgotten at the contraction rate: never more than a few u·κ
    assert np.nanmax(r.divergence_max) <= 4 * u * kappa
    assert r.measured_plateau <= 4 * u * kappa
    assert np.all(r.argmax_changed == 0)
    assert np.nanmax(r.kl) < 1e-9


def test_bf16_divergence_is_larger_than_float32_and_the_model_is_put_back():
    model = linear_loop(1.2, T=10)
    before = [p.detach().clone() for p in model.parameters()]
    r16 = precision_audit(model, IDX, 10, "bf16")
    r32 = precision_audit(model, IDX, 10, "float32")
    assert np.all(r16.divergence_median > 100 * r32.divergence_median)
    assert r16.divergence_median[0] == pytest.approx(2.0 ** -8, rel=1.0)  # bf16 round-off of h_1
    for p, q in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and torch.equal(p, q)


def parcae_with_near_one_decays(value: float = 0.9999) -> LoopedLM:
    """A tiny Parcae-style loop (identity core) whose Ā has `value` on a quarter of its channels
    and 0.5 elsewhere; those channels get no drive and start at 0 (state_init zero), so in float32
    they decay (nothing to decay), and the only difference bf16 makes is Ā rounding to 1.0."""
    torch.manual_seed(0)
    model = LoopedLM(LoopConfig.preset("tiny", mean_loops=6, state_init="zero")).eval()
    inj = model.injection
    with torch.no_grad():
        n = inj.A_log.numel()
        target = torch.full((n,), 0.5)
        target[: n // 4] = value
        delta = torch.nn.functional.softplus(inj.dt_bias)
        inj.A_log.copy_(torch.log(-torch.log(target) / delta))
        inj.B[: n // 4] = 0
    return model


def test_near_one_decay_is_flagged_and_marginal_in_bf16():
    """The injection is a contraction in float32 (ρ(Ā) = 0.9999 < 1: its LTI verdict is `stable`)
    and sits on the unit circle in bf16 (ρ = 1.0): flagged, and the verdict in bf16 is `marginal`
    for that reason. (The float32 audit's own verdict is `marginal` too: a decay of 0.9999/loop lies
    inside the forecast's unit band of 2e-3 nats/loop, as does every decay that bf16 rounds to 1,
    i.e. ≥ 1 − 2⁻⁹; the test asserts what each part says.)"""
    model = parcae_with_near_one_decays()
    with torch.no_grad():
        assert float(model.injection.A_bar().max()) == pytest.approx(0.9999, abs=1e-6)
        assert float(model.injection.A_bar().to(torch.bfloat16).max()) == 1.0  # bf16 stores it as 1.0
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    r32 = audit(model, idx, 6, 24, lyapunov_k=1)
    assert r32.injection.stable and r32.injection.spectral_radius == pytest.approx(0.9999, abs=1e-6)
    with parameters_in(model, torch.bfloat16):
        r16 = audit(model, idx, 6, 24, lyapunov_k=1)
        p = audit_with_precision(model, idx, r16, loops=6, horizon=24, dtype="bf16", audit_kwargs={"lyapunov_k": 1})
    assert not r16.injection.stable  # the bf16 injection is on the unit circle
    assert r16.precision is p
    n = model.injection.A_log.numel()
    assert len(p.flagged) == n // 4 and p.n_entries == n
    assert {e.index[0] for e in p.flagged} == set(range(n // 4))
    assert all(e.stored == pytest.approx(0.9999, abs=1e-6) and e.computed == 1.0 for e in p.flagged)
    assert p.rho_stored == pytest.approx(0.9999, abs=1e-6) and p.rho_computed == 1.0
    assert p.verdict == "marginal" and p.verdict_reference == r32.verdict
    assert "round to modulus ≥ 1" in p.reason
    assert "VERDICT in bfloat16: MARGINAL" in r16.to_text()
    js = json.loads(json.dumps(r16.to_json()))
    assert js["precision"]["n_flagged"] == n // 4 and js["precision"]["verdict"] == "marginal"
    assert js["precision"]["rho_computed"] == 1.0
    # a stable audit verdict in float32 next to the same rounding: bf16 says marginal, float32 stable
    q = precision_audit(model, idx, 6, "bf16", verdict="stable", verdict_reference="stable")
    assert (q.verdict, q.verdict_reference) == ("marginal", "stable")
    assert "VERDICT in bfloat16: MARGINAL (in float32: STABLE)" in q.to_text()
    # 0.99 stays below 1 in bf16 (the largest bf16 below 1 is 1 − 2⁻⁸): nothing is flagged
    ok = precision_audit(parcae_with_near_one_decays(0.99), idx, 6, "bf16", verdict="stable", verdict_reference="stable")
    assert ok.flagged == () and ok.rho_computed < 1 and ok.verdict == "stable"


def test_combine_verdict_table():
    assert combine_verdict("stable", 0.5, 0, "bfloat16")[0] == "stable"
    assert combine_verdict("stable", 1.0, 3, "bfloat16")[0] == "marginal"
    assert combine_verdict("marginal", 1.01, 3, "bfloat16")[0] == "explosive"
    assert combine_verdict("explosive", 0.5, 0, "bfloat16")[0] == "explosive"
    assert combine_verdict("stable", math.nan, 0, "bfloat16")[0] == "stable"


def test_divergence_rate_fit_window():
    t = np.arange(1, 31)
    absd = 1e-3 * np.exp(0.3 * t)
    rel = absd / 1.0
    rate, (a, b) = divergence_rate(absd, rel)
    assert rate == pytest.approx(0.3) and b == int(np.flatnonzero(rel < 0.1)[-1]) + 1
    assert math.isnan(divergence_rate(np.zeros(5), np.zeros(5))[0])


@given(lam=st.floats(0.02, 2.0), gamma=st.floats(0.0, 1.0), log_c=st.floats(-30, 0), n=st.integers(4, 60))
def test_divergence_rate_is_exact_for_a_power_law_prefactor(lam, gamma, log_c, n):
    """c·t^γ·e^{λt} (γ ∈ [0, 1]: first rounding dominant, quadrature, coherent) gives λ back exactly,
    where the plain slope of the log would overstate it by ≈ γ/t."""
    t = np.arange(1, n + 1)
    absd = np.exp(log_c + gamma * np.log(t) + lam * t)
    rate, (a, b) = divergence_rate(absd, np.zeros(n))
    assert (a, b) == (1, n)
    assert rate == pytest.approx(lam, rel=1e-6, abs=1e-9)


def test_mixed_precision_audit_keeps_a_float32_state():
    model = linear_loop(1.5, T=12)
    r = precision_audit(model, IDX, 12, "bf16-mixed")
    assert r.dtype == "bf16-mixed" and r.reference == "float32"
    # autocast rounds the product A·h to bf16; the state is float32
    assert 1e-4 < r.divergence_median[0] < 1e-2
    assert r.flagged == ()  # Ā itself stays float32 under autocast


def test_exit_gate_model_reports_changed_exit_loops(tmp_path):
    """Ouro (imported from a spec-only checkpoint, confident gates): the exit rule in bf16 arithmetic
    exits earlier than in float32 (spec §8.2), so the precision audit sees changed exit loops."""
    from loopdyn.models import load
    from tests import ouro_reference as ouro

    model = load(ouro.make_ouro_checkpoint(tmp_path, seed=6, gate_scale=4.0, gate_bias=3.0))
    idx = torch.tensor([[3, 17, 99, 5, 64, 1, 8, 42]])
    r = precision_audit(model, idx, 6, "bf16", exit_threshold=1.0)
    assert r.exit_changed is not None and r.exit_changed > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # put back


def test_audit_cli_precision_json_and_figure(tmp_path, capsys):
    from loopdyn.cli import main
    from loopdyn.models import save

    ck = save(parcae_with_near_one_decays(), tmp_path / "ck")
    js, plots = tmp_path / "a.json", tmp_path / "plots"
    code = main(["audit", str(ck), "--loops", "6", "--horizon", "24", "--seq-len", "12", "--no-progress", "--dtype",
                 "bf16", "--precision", "--lyapunov-k", "1", "--json", str(js), "--plots", str(plots), "--strict"])
    out, err = capsys.readouterr()
    assert code == 3, err  # --strict: the verdict in bf16 is marginal
    assert "precision audit: bfloat16 against float32" in out
    record = json.loads(js.read_text())
    data = record["precision"]
    assert data["verdict"] == "marginal" and data["n_flagged"] == 16 and data["rho_computed"] == 1.0
    from loopdyn.schemas import validate

    validate("audit", record)  # the JSON schema of the audit record knows the key
    assert (plots / "precision.png").read_bytes()[:4] == b"\x89PNG"
