"""The LoopedModel protocol: any looped model, written without loopdyn's classes, is audited
through `LoopAdapter` exactly as loopdyn's own LoopedLM is.

Three model shapes are written here in plain PyTorch (nothing from loopdyn.models.layers or
LoopedLM):
  1. PlainPreNormLoop — embedding, prelude block, prelude norm, a diagonal (Parcae) or linear
     (Huginn/RDM) injection, pre-norm core blocks, readout, coda, tied head: the same maths as a
     LoopedLM, so the same weights give the same audit to float round-off;
  2. PlainAutonomousLoop — no injection at all, h_{t+1} = h_t + MLP(norm(h_t)) from h_0 = e;
  3. PlainRenormLoop — a loop that renormalises the state every step, h_{t+1} = RMSNorm(W h_t + e).
Shapes 2 and 3 have no LoopedLM twin; their audits are checked against dense Jacobians
(torch.autograd.functional.jacobian) and the loop itself.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loopdyn import dynamics
from loopdyn.models import LoopAdapter, LoopedModel, ProtocolError, validate
from loopdyn.models import protocol
from loopdyn.dynamics.loopmap import DynamicsError
from tests.helpers import small_loop_model

IDX = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


# ---- shape 1: a plain pre-norm looped transformer ----------------------------------------------

def rms(x, w=None, eps=1e-5):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else y * w


def rope(x, base=50000.0):
    """Rotate interleaved channel pairs of x (B, S, H, s) by position."""
    B, S, H, s = x.shape
    inv = 1.0 / (base ** (torch.arange(0, s, 2, dtype=torch.float32) / s))
    ang = torch.outer(torch.arange(S, dtype=torch.float32), inv)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)


class PlainBlock(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, mlp, bias=False), nn.Linear(mlp, d, bias=False)

    def forward(self, x):
        B, S, d = x.shape
        a = rms(x, self.n1)
        q, k, v = (m(a).view(B, S, self.heads, -1) for m in (self.q, self.k, self.v))
        q, k = (rms(rope(t), eps=torch.finfo(t.dtype).eps) for t in (q, k))  # weightless QK-norm
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, S, d))
        return x + self.proj(0.5 * torch.relu(self.fc(rms(x, self.n2))).square())


class PlainPreNormLoop(nn.Module):
    """e = norm(P(emb)); u = inject(h, e); h' = core(u); logits = head(norm(coda(C h)))."""

    def __init__(self, d=16, heads=2, n_core=2, kind="diagonal", n_loops=4, mlp=32, core_mlp=64):
        super().__init__()
        self.kind, self.n_loops = kind, n_loops
        self.wte = nn.Embedding(256, d)
        self.prelude, self.coda = PlainBlock(d, heads, mlp), PlainBlock(d, heads, mlp)
        self.core = nn.ModuleList(PlainBlock(d, heads, core_mlp) for _ in range(n_core))
        self.ln_prelude, self.ln_f = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.readout = nn.Linear(d, d, bias=False)
        if kind == "diagonal":
            self.A_log, self.dt_bias, self.B = (nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d)),
                                                nn.Parameter(torch.zeros(d, d)))
        else:
            self.W = nn.Linear(2 * d, d, bias=False)

    def A_bar(self):
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def embed(self, idx):
        return rms(self.prelude(self.wte(idx)), self.ln_prelude)

    def step(self, h, e):
        if self.kind == "diagonal":
            u = self.A_bar() * h + F.softplus(self.dt_bias) * (e @ self.B.T)
        else:
            u = self.W(torch.cat([h, e], -1))
        for blk in self.core:
            u = blk(u)
        return u

    def head(self, h):
        return rms(self.coda(self.readout(h)), self.ln_f) @ self.wte.weight.T

    def linear_part(self):
        d = self.wte.weight.shape[1]
        if self.kind == "diagonal":
            return self.A_bar().detach(), (F.softplus(self.dt_bias)[:, None] * self.B).detach()
        return self.W.weight[:, :d].detach(), self.W.weight[:, d:].detach()


def plain_twin(native) -> PlainPreNormLoop:
    """A PlainPreNormLoop holding the native LoopedLM's weights."""
    cfg = native.config
    plain = PlainPreNormLoop(cfg.d_model, cfg.n_heads, cfg.n_core, cfg.injection, cfg.mean_loops, cfg.d_mlp,
                             cfg.d_state_mlp)
    with torch.no_grad():
        plain.wte.weight.copy_(native.wte.weight)
        for p, n in [(plain.prelude, native.prelude[0]), (plain.coda, native.coda[0])] + \
                list(zip(plain.core, native.core)):
            p.n1.copy_(n.norm_1.weight), p.n2.copy_(n.norm_2.weight)
            for a, b in [(p.q, n.attn.c_q), (p.k, n.attn.c_k), (p.v, n.attn.c_v), (p.o, n.attn.c_proj),
                         (p.fc, n.mlp.fc), (p.proj, n.mlp.proj)]:
                a.weight.copy_(b.weight)
        plain.ln_prelude.copy_(native.ln_prelude.weight), plain.ln_f.copy_(native.ln_f.weight)
        plain.readout.weight.copy_(native.readout.weight)
        if cfg.injection == "diagonal":
            for name in ("A_log", "dt_bias", "B"):
                getattr(plain, name).copy_(getattr(native.injection, name))
        else:
            plain.W.weight.copy_(native.injection.W.weight)
    return plain.eval()


def adapt(plain: PlainPreNormLoop) -> LoopAdapter:
    return LoopAdapter.from_module(plain, embed="embed", core="step", head="head", mean_loops=plain.n_loops,
                                   linear_part=plain.linear_part)


@pytest.fixture(params=["diagonal", "linear"])
def pair(request):
    native = small_loop_model(request.param, perturb=0.3, seed=1)
    if request.param == "linear":
        with torch.no_grad():
            native.injection.W.weight.mul_(3.0)  # a loop with real dynamics (ρ(Ā) near 1)
    return native, adapt(plain_twin(native))


def close(a, b, rtol=1e-4, atol=1e-6):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


def test_plain_twin_is_the_same_function(pair):
    native, adapted = pair
    assert isinstance(adapted, LoopedModel)
    validate(adapted, IDX)
    with torch.no_grad():
        ref = native(IDX, n_loops=5).logits
        got = adapted(IDX, n_loops=5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_adapter_audit_equals_native_audit(pair):
    native, adapted = pair
    a = dynamics.audit(native, IDX, loops=4, horizon=12)
    b = dynamics.audit(adapted, IDX, loops=4, horizon=12)
    ja, jb = a.to_json(), b.to_json()
    for key in ("spectral_norm", "spectral_radius", "transient_max", "settle_loops"):
        assert close(ja["injection"][key] or math.nan, jb["injection"][key] or math.nan), key
    assert close(ja["trajectory"]["state_norm"], jb["trajectory"]["state_norm"], rtol=1e-5)
    assert close(ja["jacobian"]["spectral_norm"], jb["jacobian"]["spectral_norm"])
    assert close(ja["jacobian"]["spectral_radius"], jb["jacobian"]["spectral_radius"])
    assert close(ja["lyapunov"]["exponents"], jb["lyapunov"]["exponents"], atol=1e-5)
    assert close(ja["forecast"]["state_norm"], jb["forecast"]["state_norm"], rtol=1e-3)
    assert ja["verdict"] == jb["verdict"] and ja["forecast"]["max_safe_loops"] == jb["forecast"]["max_safe_loops"]
    # the adapter has no sublayers(): the gain graph says it measured the whole step instead
    assert jb["gain_graph"]["method"].startswith("no sublayers") and any("gain graph" in s for s in jb["skipped"])
    assert jb["model"]["format"] == "adapter" and ja["model"]["format"] == "loopdyn"


def test_adapter_lyapunov_and_jacobian_equal_native(pair):
    native, adapted = pair
    la = dynamics.lyapunov(native, IDX, n_loops=3, k=3)
    lb = dynamics.lyapunov(adapted, IDX, n_loops=3, k=3)
    assert close(la.exponents, lb.exponents, atol=1e-5)
    sa, ctx_a = native.unroll(IDX, 3)
    ctx_b = adapted.encode(IDX)
    Ja = dynamics.loop_jacobian(native, sa[3], ctx_a)
    Jb = dynamics.loop_jacobian(adapted, sa[3], ctx_b)
    v = np.random.default_rng(0).standard_normal(Ja.shape[1])
    assert close(Ja.matvec(v), Jb.matvec(v), rtol=1e-4, atol=1e-5)


# ---- shapes 2 and 3: no LoopedLM twin; ground truth from dense Jacobians -----------------------

class PlainAutonomousLoop(nn.Module):
    """h_0 = e (the embeddings), h_{t+1} = h_t + MLP(norm(h_t)): no injection at all."""

    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(256, d)
        self.fc, self.proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        with torch.no_grad():
            self.proj.weight.mul_(0.3)
        self.out = nn.Linear(d, 256)


class PlainRenormLoop(nn.Module):
    """h_{t+1} = RMSNorm(W h_t + e): the state is renormalised every step; W = a·Q (Q orthogonal),
    so the pre-norm state grows by exactly a per loop for e = 0."""

    def __init__(self, d=8, a=1.5):
        super().__init__()
        torch.manual_seed(6)
        self.emb = nn.Embedding(256, d)
        Q, _ = torch.linalg.qr(torch.randn(d, d))
        self.W = nn.Parameter(a * Q)
        self.out = nn.Linear(d, 256)


def autonomous_adapter():
    m = PlainAutonomousLoop().eval()

    def step(h, ctx):
        return h + m.proj(torch.tanh(m.fc(rms(h))))
    return LoopAdapter(encode=m.emb, init_state=lambda e: e.clone(), step=step, decode=lambda h, e: m.out(h),
                       mean_loops=4, module=m)


def renorm_adapter():
    m = PlainRenormLoop().eval()
    return LoopAdapter(encode=lambda idx: 0.1 * m.emb(idx), init_state=lambda e: torch.ones_like(e),
                       step=lambda h, e: rms(h @ m.W.T + e), decode=lambda h, e: m.out(h),
                       mean_loops=4, module=m, state_norm_kind="post",
                       pre_norm_state=lambda h, e: h @ m.W.T + e)


def dense_jacobian(adapter, h, ctx):
    J = torch.autograd.functional.jacobian(lambda x: adapter.step(x, ctx), h)
    n = h.numel()
    return J.reshape(n, n).double().numpy()


@pytest.mark.parametrize("make", [autonomous_adapter, renorm_adapter])
def test_audit_of_models_without_an_lti_part(make):
    model = make()
    validate(model, IDX)
    rep = dynamics.audit(model, IDX, loops=4, horizon=12)
    js = rep.to_json()
    # no injection: the LTI part is reported as skipped, not invented
    assert js["injection"]["spectral_radius"] is None and "no LTI part" in js["injection"]["skipped"]
    assert any(s.startswith("injection spectrum") for s in js["skipped"])
    assert js["model"]["injection"] == "none (autonomous)"
    # the measured trajectory is the loop itself
    with torch.no_grad():
        ctx = model.encode(IDX)
        h = model.init_state(ctx)
        norms = []
        for _ in range(4):
            h = model.step(h, ctx)
            norms.append(float(torch.linalg.vector_norm(h, dim=-1).mean()))
    assert close(js["trajectory"]["state_norm"], norms, rtol=1e-6)
    # σ_max(J_T) is a lower bound from a few Lanczos steps: never above the dense one, and close to it
    with torch.no_grad():
        states = [model.init_state(ctx)]
        for _ in range(4):
            states.append(model.step(states[-1], ctx))
    sig = np.linalg.svd(dense_jacobian(model, states[4], ctx), compute_uv=False)[0]
    est = js["jacobian"]["spectral_norm"][-1]
    assert est <= sig * (1 + 1e-4) and est >= 0.9 * sig
    # the whole-step gain edge of the gain graph is that same σ_max
    assert js["gain_graph"]["method"].startswith("no sublayers")
    assert js["verdict"] in ("stable", "marginal", "explosive")
    assert "none" in rep.to_text()


def test_lyapunov_of_renormalised_loop_matches_dense_qr():
    model = renorm_adapter()
    idx = IDX[:1, :3]
    res = dynamics.lyapunov(model, idx, n_loops=5, k=3)
    # ground truth: the leading finite-time exponent is log σ₁(J_5 ⋯ J_1)/5 of the dense product
    # (QR re-orthonormalisation from random vectors converges to it from below)
    with torch.no_grad():
        ctx = model.encode(idx)
        h = model.init_state(ctx)
    Jprod = np.eye(h.numel())
    for _ in range(5):
        Jprod = dense_jacobian(model, h, ctx) @ Jprod
        with torch.no_grad():
            h = model.step(h, ctx)
    truth = np.log(np.linalg.svd(Jprod, compute_uv=False)[0]) / 5
    assert truth - 0.15 <= res.exponents[0] <= truth + 1e-6


# ---- bad members get a clear error naming the member ------------------------------------------

def good_parts():
    m = PlainAutonomousLoop().eval()
    return dict(encode=m.emb, init_state=lambda e: e.clone(), step=lambda h, e: h + 0.1 * torch.tanh(h),
                decode=lambda h, e: m.out(h), mean_loops=3, module=m)


@pytest.mark.parametrize("change, member", [
    (dict(step=lambda h: h), "step"),                                        # wrong signature
    (dict(step=lambda h, e: h[..., :4]), "shape"),                           # wrong shape
    (dict(step=lambda h, e: h + torch.randn_like(h)), "not a pure function"),  # draws random numbers
    (dict(decode=lambda h, e: h.sum(-1)), "decode"),                          # wrong logits shape
    (dict(linear_part=lambda: (torch.ones(3), torch.ones(3, 8))), "linear_part"),  # Ā of the wrong size
])
def test_bad_members_are_named(change, member):
    model = LoopAdapter(**{**good_parts(), **change})
    with pytest.raises(ProtocolError, match=member):
        validate(model, IDX)
    if member not in ("linear_part", "decode"):  # the audit never decodes
        with pytest.raises((ProtocolError, DynamicsError), match=member):
            dynamics.audit(model, IDX, loops=2)


def test_adapter_arguments_are_checked():
    with pytest.raises(ProtocolError, match="mean_loops"):
        LoopAdapter(**{**good_parts(), "mean_loops": 0})
    with pytest.raises(ProtocolError, match="encode must be callable"):
        LoopAdapter(**{**good_parts(), "encode": 3})
    with pytest.raises(ProtocolError, match="state_norm_kind"):
        LoopAdapter(**good_parts(), state_norm_kind="sometimes")


def test_non_looped_models_are_refused_with_one_line():
    with pytest.raises(DynamicsError, match="not a LoopedModel"):
        dynamics.audit(nn.Linear(3, 3), IDX)
    from loopdyn.models import LoopConfig, LoopedLM
    gpt = LoopedLM(LoopConfig.preset("tiny", injection="none", value_embeds=False)).eval()
    assert not protocol.is_looped(gpt)
    with pytest.raises(DynamicsError, match="has no loop"):
        dynamics.audit(gpt, IDX)


def test_find_looped_model_looks_inside_wrappers():
    native = small_loop_model("diagonal")

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = native
    assert protocol.find_looped_model(Wrapper()) is native
    assert protocol.find_looped_model(nn.Linear(2, 2)) is None


def test_sublayers_compose_to_the_step():
    for block in ("prenorm", "sandwich"):
        native = small_loop_model("linear", perturb=0.2, block=block)
        ctx = native.encode(IDX)
        h = torch.randn(*ctx.e.shape, generator=torch.Generator().manual_seed(0))
        x = h
        with torch.no_grad():
            for s in native.sublayers(ctx):
                x = x + s.fn(x) if s.kind == "residual" else s.fn(x)
            torch.testing.assert_close(x, native.step(h, ctx), rtol=1e-6, atol=1e-6)


# ---- the command line on a user's own model ------------------------------------------------------

USER_FILE = '''
import torch
from loopdyn.models import LoopAdapter

def build():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(256, 8)
    W = 1.2 * torch.eye(8)                      # ρ(Ā) = 1.2 > 1: explosive
    return LoopAdapter(encode=emb, step=lambda h, e: h @ W.T + e, decode=lambda h, e: h @ emb.weight.T,
                       mean_loops=3, linear_part=lambda: (W, torch.eye(8)), module=emb)
'''


def test_cli_audits_a_user_factory(tmp_path, capsys):
    import json

    from loopdyn.cli import main

    src = tmp_path / "my_model.py"
    src.write_text(USER_FILE)
    out_json = tmp_path / "a.json"
    code = main(["audit", f"{src}:build", "--json", str(out_json), "--seq-len", "8", "--no-progress", "--strict"])
    out, err = capsys.readouterr()
    assert code == 3, err  # --strict and not stable
    js = json.loads(out_json.read_text())
    assert js["model"]["format"] == "adapter" and abs(js["injection"]["spectral_radius"] - 1.2) < 1e-6
    assert js["verdict"] == "explosive"
    code = main(["audit", f"{src}:nothing", "--no-progress"])
    assert code == 1 and "has no function nothing" in capsys.readouterr().err


def test_one_audit_is_one_pass_through_the_loop():
    """encode once, one unroll, one linearisation per measured state h_0..h_T; nothing else runs
    the whole step (the gain graph linearises single sublayers, counted separately)."""
    native = small_loop_model("linear", perturb=0.2)
    calls = {"encode": 0, "step": 0}
    model = LoopAdapter(encode=lambda idx: (calls.__setitem__("encode", calls["encode"] + 1), native.encode(idx))[1],
                        step=lambda h, ctx: (calls.__setitem__("step", calls["step"] + 1), native.step(h, ctx))[1],
                        decode=native.decode, mean_loops=4, linear_part=native.linear_part,
                        sublayers=native.sublayers, init_state=native.init_state, module=native)
    T, H = 4, 16
    rep = dynamics.audit(model, IDX, loops=T, horizon=H)
    assert calls["encode"] == 1
    # the loop runs once: each measured state h_0..h_T is linearised exactly once and the
    # linearisation's output is the next state (the one at h_T gives h_{T+1}); plain steps continue
    # from h_{T+1} to the horizon for the probe's loss past the trained depth. Besides: one plain
    # step at h_0 (the protocol's checks, and F is pure), and the forecast's two large-state probes
    # (the step at 10× and 1000× the state). The forecast reuses the sweep's linearisations at h_T
    # and h_{T−w} instead of recording them again.
    assert rep.cost.linearisations == T + 1 and rep.cost.steps == 1 + (H - T - 1) + 2
    # every call of step is one of those: the plain steps + one recorded forward per linearisation
    assert calls["step"] == rep.cost.steps + rep.cost.linearisations


def test_random_init_state_never_consumes_the_training_rng():
    """An analysis of a model whose init_state draws from the global RNG (and takes no generator)
    leaves the global random stream exactly where it was, and is itself deterministic."""
    parts = good_parts()
    model = LoopAdapter(**{**parts, "init_state": lambda e: torch.randn_like(e)})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = dynamics.audit(model, IDX, loops=2, horizon=4).to_json()
    b = dynamics.audit(model, IDX, loops=2, horizon=4).to_json()
    assert torch.equal(torch.rand(3), expected)
    assert a["trajectory"]["state_norm"] == b["trajectory"]["state_norm"]
