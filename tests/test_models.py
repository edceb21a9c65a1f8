"""Issue 2: the looped and fixed-depth models, injections, depth sampling and presets.

Ground truths: a manual encode → init_state → step × T → decode pipeline, each sequence run
alone, numpy float64 formulas for the injections, the closed-form LTI fixed point, the
Poisson distribution, and the official parameter counts (reference/paper-facts.md,
reference/parcae-checkpoint-format.md §6-7).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from loopdyn.models import ConfigError, InputError, LoopConfig, LoopedLM
from loopdyn.models.injection import AdditiveInjection, DiagonalInjection, LinearInjection

TINY = dict(block_size=64, d_mlp=128)


def tiny_config(**overrides) -> LoopConfig:
    return LoopConfig.preset("tiny", **{**TINY, **overrides})


@torch.no_grad()
def perturb(model: LoopedLM, seed: int = 0, scale: float = 0.5) -> LoopedLM:
    """Randomise every weight, in particular the zero-initialised output projections, so no
    block is the identity and the loop is genuinely nonlinear."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(("A_log", "dt_bias")):
            p.copy_(0.5 * noise)
        elif p.dim() == 1 or name.endswith("qk_bias"):  # gains and biases
            p.add_(0.1 * noise)
        elif name.startswith("value_embeds"):
            p.copy_(0.5 * noise)
        else:
            p.copy_(noise * scale / math.sqrt(p.shape[-1]))
    return model


def make_model(seed: int = 0, **overrides) -> LoopedLM:
    torch.manual_seed(seed)
    return perturb(LoopedLM(tiny_config(**overrides)), seed).eval()


def tokens(B=2, S=16, seed=0, vocab=256):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "diagonal": dict(),
    "diagonal-zoh-ds": dict(input_gain="zoh", d_state=32, n_state_heads=2, d_state_mlp=64, n_kv_heads=2),
    "linear-bias-untied": dict(injection="linear", bias=True, tie_embeddings=False, state_init="zero"),
    "additive-gated": dict(injection="additive", mlp="swiglu", state_init="normal"),
    "sandwich-layernorm": dict(block="sandwich", norm="layernorm", qk_bias=True, logit_softcap=5.0),
    "gpt": dict(injection="none"),
}


# ---- shapes and causality ----------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_and_causality(variant):
    model = make_model(**VARIANTS[variant])
    cfg = model.config
    idx = tokens(B=2, S=12)
    out = model(idx, targets=idx)
    assert out.logits.shape == (2, 12, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if cfg.looped:
        assert out.state.shape == out.prev_state.shape == (2, 12, cfg.d_state)
        assert out.n_loops.tolist() == [cfg.mean_loops] * 2
    else:
        assert out.state is None and out.n_loops is None
    cut = 7
    changed = idx.clone()
    changed[:, cut:] = (changed[:, cut:] + 17) % cfg.vocab_size
    other = model(changed).logits
    assert torch.equal(out.logits[:, :cut], other[:, :cut])
    assert not torch.allclose(out.logits[:, cut:], other[:, cut:])  # the future change is seen


def test_causality_with_many_loops():
    model = make_model()
    idx = tokens(B=1, S=20, seed=3)
    changed = idx.clone()
    changed[0, 19] = (changed[0, 19] + 1) % 256
    a, b = model(idx, n_loops=13).logits, model(changed, n_loops=13).logits
    assert torch.equal(a[:, :19], b[:, :19]) and not torch.equal(a[:, 19], b[:, 19])


# ---- step == one iteration of forward ---------------------------------------------------

@pytest.mark.parametrize("variant", ["diagonal", "linear-bias-untied", "additive-gated"])
def test_step_is_one_iteration_of_forward(variant):
    model = make_model(**VARIANTS[variant])
    idx = tokens(B=2, S=10, seed=1)
    T = 5
    with torch.no_grad():
        ctx = model.encode(idx)
        h = [model.init_state(ctx)]
        for _ in range(T):
            h.append(model.step(h[-1], ctx))
        manual = model.decode(h[-1], ctx)
        states, _ = model.unroll(idx, n_loops=T)
        out = model(idx, n_loops=T)
    assert len(states) == T + 1
    for a, b in zip(states, h):
        assert torch.equal(a, b)
    assert torch.equal(out.logits, manual)
    assert torch.equal(out.state, h[T]) and torch.equal(out.prev_state, h[T - 1])
    assert not torch.allclose(h[T], h[T - 1])  # the iteration does something
    with torch.no_grad():
        assert torch.equal(model(idx).logits, model(idx, n_loops=model.config.mean_loops).logits)


def test_state_tap_sees_h0_and_every_step():
    model = make_model()
    seen = []
    handle = model.state_tap.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        states, _ = model.unroll(tokens(), n_loops=3)
    handle.remove()
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen, states))


def test_step_works_under_torch_func():
    """jvp (forward AD) against J·v from double-backward autograd and finite differences;
    vjp against the adjoint identity <u, J v> = <Jᵀu, v>; vmap against a Python loop."""
    model = make_model()
    idx = tokens(B=2, S=6)
    with torch.no_grad():
        ctx = model.encode(idx)
        h = model.init_state(ctx) + 0.3 * torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(2))
    u = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    f = lambda x: model.step(x, ctx)  # noqa: E731
    out, jv = torch.func.jvp(f, (h,), (v,))
    torch.testing.assert_close(out, f(h).detach(), rtol=1e-5, atol=1e-6)  # math vs fused SDPA kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernel has no double backward
        _, jv_autograd = torch.autograd.functional.jvp(f, h, v)  # double backward, no forward AD
    torch.testing.assert_close(jv, jv_autograd, rtol=1e-4, atol=1e-5)
    eps = 1e-2
    with torch.no_grad():
        fd = (f(h + eps * v) - f(h - eps * v)) / (2 * eps)
    assert (jv - fd).norm() < 2e-2 * jv.norm()
    _, pullback = torch.func.vjp(f, h)
    (jtu,) = pullback(u)
    torch.testing.assert_close((u * jv).sum(), (jtu * v).sum(), rtol=1e-4, atol=1e-4)
    hs = torch.stack([h, h + 0.1 * v, h - 0.1 * u])
    batched = torch.func.vmap(f)(hs)
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(batched[i], f(hs[i]), rtol=1e-5, atol=1e-5)


def test_fixed_depth_model_has_no_loop():
    model = make_model(injection="none")
    assert not model.config.looped
    ctx = model.encode(tokens())
    with pytest.raises(ConfigError):
        model.init_state(ctx)
    with pytest.raises(ConfigError):
        model.step(ctx.e, ctx)


# ---- training-mode depth sampling ---------------------------------------------------------

DEPTHS = [1, 3, 6, 2]  # μ_bwd = 2: n = [0, 1, 4, 0], k = [1, 2, 2, 2]


def _fixed_depths(model, depths):
    total = torch.tensor(depths)
    k = total.clamp_max(model.config.backprop_loops)

    def sample(batch, generator=None):
        assert batch == len(depths)
        return total - k, k
    return sample


def test_sampled_depths_equal_running_each_sequence_alone(monkeypatch):
    model = make_model(state_init="zero")
    idx = tokens(B=len(DEPTHS), S=12, seed=2)
    monkeypatch.setattr(model, "sample_depths", _fixed_depths(model, DEPTHS))
    model.train()
    out = model(idx)
    model.eval()
    assert out.n_loops.tolist() == DEPTHS
    with torch.no_grad():
        for b, T in enumerate(DEPTHS):
            states, ctx = model.unroll(idx[b:b + 1], n_loops=T)
            alone = model.decode(states[-1], ctx)
            scale = alone.abs().max()
            assert (out.logits[b] - alone[0]).abs().max() <= 1e-5 * scale, b
            torch.testing.assert_close(out.state[b], states[-1][0], rtol=1e-5, atol=1e-5)
            # prev_state is h_{T-1} of that sequence, whatever the other sequences do
            torch.testing.assert_close(out.prev_state[b], states[-2][0], rtol=1e-5, atol=1e-5)


def _manual_truncated_loss(model, idx, T, k):
    """The loss of one batch run for T loops with gradients through the last k only."""
    ctx = model.encode(idx)
    h = model.init_state(ctx)
    with torch.no_grad():
        for _ in range(T - k):
            h = model.step(h, ctx)
    h = h.detach()
    for _ in range(k):
        h = model.step(h, ctx)
    logits = model.decode(h, ctx)
    return F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_gradients_flow_only_through_the_last_k_loops(monkeypatch):
    model = make_model(state_init="zero")
    idx = tokens(B=len(DEPTHS), S=10, seed=4)
    targets = idx.roll(-1, 1)
    monkeypatch.setattr(model, "sample_depths", _fixed_depths(model, DEPTHS))
    grad_states = []
    model.state_tap.register_forward_hook(lambda mod, inp, out: grad_states.append(out.requires_grad))
    model.train()
    model.zero_grad()
    model(idx, targets).loss.backward()
    got = _grads(model)
    assert sum(grad_states) == max(min(T, 2) for T in DEPTHS)  # only k_max loop outputs carry graphs

    # ground truth: each sequence alone, truncated by hand; the batch loss is their mean
    model.zero_grad()
    k = [min(T, model.config.backprop_loops) for T in DEPTHS]
    total = sum(_manual_truncated_loss(model, idx[b:b + 1], T, k[b]) for b, T in enumerate(DEPTHS)) / len(DEPTHS)
    total.backward()
    want = _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)

    # and it is not the full backprop gradient (so the comparison above can fail)
    model.zero_grad()
    full = sum(_manual_truncated_loss(model, idx[b:b + 1], T, T) for b, T in enumerate(DEPTHS)) / len(DEPTHS)
    full.backward()
    assert not torch.allclose(_grads(model)["injection.A_log"], want["injection.A_log"], rtol=1e-3)


def test_fixed_depth_sampling_in_training_truncates_too():
    model = make_model(state_init="zero", depth_sampling="fixed", mean_loops=5, backprop_loops=2)
    idx = tokens(B=2, S=8, seed=5)
    model.train()
    model.zero_grad()
    out = model(idx, idx.roll(-1, 1))
    assert out.n_loops.tolist() == [5, 5]
    out.loss.backward()
    got = _grads(model)
    model.zero_grad()
    _manual_truncated_loss(model, idx, 5, 2).backward()
    want = _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_depth_sampling_statistics():
    mu, mu_bwd, n_draws = 4, 2, 4000
    model = LoopedLM(tiny_config(mean_loops=mu, backprop_loops=mu_bwd))
    n, k = model.sample_depths(n_draws, generator=torch.Generator().manual_seed(0))
    total = (n + k).numpy()
    assert n.shape == k.shape == (n_draws,) and n.dtype == torch.long
    assert total.min() >= 1
    assert torch.equal(k, (n + k).clamp_max(mu_bwd)) and (n >= 0).all()
    # T = max(Poisson(μ), 1): E[T] = μ + P(X = 0); standard error sqrt(Var/n), Var ≤ μ
    expected_mean = mu + math.exp(-mu)
    assert abs(total.mean() - expected_mean) < 4 * math.sqrt(mu / n_draws)
    assert abs(total.mean() - mu) < 4 * math.sqrt(mu / n_draws) + math.exp(-mu)
    # the distribution, not only its mean: P(T = 1) = P(X ≤ 1), P(T = t) = P(X = t) for t ≥ 2
    pmf = {t: math.exp(-mu) * mu ** t / math.factorial(t) for t in range(12)}
    for t in (1, 2, 4, 7):
        p = pmf[0] + pmf[1] if t == 1 else pmf[t]
        assert abs((total == t).mean() - p) < 4 * math.sqrt(p * (1 - p) / n_draws), t
    fixed = LoopedLM(tiny_config(mean_loops=3, backprop_loops=2, depth_sampling="fixed"))
    n, k = fixed.sample_depths(5)
    assert n.tolist() == [1] * 5 and k.tolist() == [2] * 5


def test_eval_mode_is_deterministic_even_with_random_state_init():
    model = make_model(state_init="like-init")
    idx = tokens()
    assert torch.equal(model(idx).logits, model(idx).logits)


# ---- injections --------------------------------------------------------------------------

def _diag(d_state=8, d_model=8, input_gain="euler"):
    inj = DiagonalInjection(d_state, d_model, input_gain)
    inj.reset_parameters()
    return inj


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(A_log=hnp.arrays(np.float32, 6, elements=finite32), dt_bias=hnp.arrays(np.float32, 6, elements=finite32))
def test_diagonal_A_bar_is_stable_for_any_finite_parameters(A_log, dt_bias):
    for gain in ("euler", "zoh"):
        inj = _diag(6, 6, gain)
        with torch.no_grad():
            inj.A_log.copy_(torch.from_numpy(A_log))
            inj.dt_bias.copy_(torch.from_numpy(dt_bias))
        A = inj.A_bar()
        assert not torch.isnan(A).any()
        assert (A >= 0).all() and (A < 1).all()  # ρ(Ā) = max |Ā_ii| < 1
        assert inj.linear_part().A.diagonal.abs().max() < 1
        g = inj.input_gains()
        assert torch.isfinite(g).all() and (g >= 0).all(), (gain, g)


@pytest.mark.parametrize("kind", ["diagonal", "diagonal-zoh", "linear", "linear-bias", "additive"])
def test_linear_part_matches_the_forward(kind):
    torch.manual_seed(0)
    ds, d = (6, 10) if kind != "additive" else (8, 8)
    if kind.startswith("diagonal"):
        inj = _diag(ds, d, "zoh" if kind.endswith("zoh") else "euler")
        with torch.no_grad():
            inj.A_log.normal_(0, 0.7)
            inj.dt_bias.normal_(0, 0.7)
            inj.B.normal_()
    elif kind.startswith("linear"):
        inj = LinearInjection(ds, d, bias=kind.endswith("bias"))
        with torch.no_grad():
            inj.W.weight.normal_()
            if inj.W.bias is not None:
                inj.W.bias.normal_()
    else:
        inj = AdditiveInjection(ds, d)
    h, e = torch.randn(3, 5, ds), torch.randn(3, 5, d)
    lp = inj.linear_part()
    A, B = lp
    assert (A.n_out, A.n_in, B.n_out, B.n_in) == (ds, ds, ds, d)
    want = A.apply(h) + B.apply(e) + (0 if lp.bias is None else lp.bias)
    with torch.no_grad():
        got = inj(h, e)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = h @ A.dense().T + e @ B.dense().T + (0 if lp.bias is None else lp.bias)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    assert (lp.bias is not None) == (kind == "linear-bias")


def test_diagonal_A_bar_formula_in_float64():
    inj = _diag(16, 16).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        inj.A_log.copy_(torch.randn(16, generator=gen, dtype=torch.float64) * 2)
        inj.dt_bias.copy_(torch.randn(16, generator=gen, dtype=torch.float64) * 3)
    A_log, dt = inj.A_log.detach().numpy(), inj.dt_bias.detach().numpy()
    delta = np.log1p(np.exp(dt))
    want = np.exp(-delta * np.exp(A_log))
    np.testing.assert_allclose(inj.A_bar().detach().numpy(), want, rtol=1e-13)
    np.testing.assert_allclose(inj.linear_part().A.diagonal.numpy(), want, rtol=1e-13)
    B = inj.B.detach().numpy()
    np.testing.assert_allclose(inj.linear_part().B.matrix.numpy(), delta[:, None] * B, rtol=1e-13)


@pytest.mark.parametrize("a_log_scale,a_log_shift", [(1.0, 0.0), (1.0, -16.0)])
def test_exact_zoh_gain_and_fixed_point(a_log_scale, a_log_shift):
    """g = (1 − e^{−Δa})/a (→ Δ as a → 0), and the LTI loop h ← Ā h + g ⊙ B e converges to B e / a."""
    n = 8
    inj = _diag(n, n, "zoh").double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        inj.A_log.copy_(torch.randn(n, generator=gen, dtype=torch.float64) * a_log_scale + a_log_shift)
        inj.dt_bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
        inj.B.copy_(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = np.exp(inj.A_log.detach().numpy())
    delta = np.log1p(np.exp(inj.dt_bias.detach().numpy()))
    x = delta * a
    want = -np.expm1(-x) / a
    np.testing.assert_allclose(inj.input_gains().detach().numpy(), want, rtol=1e-10)
    if a_log_shift < -10:  # Δa ≪ 1: the exact gain is Δ (1 − Δa/2 + …)
        np.testing.assert_allclose(inj.input_gains().detach().numpy(), delta, rtol=1e-5)
        return
    e = torch.randn(n, generator=gen, dtype=torch.float64)
    h = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(20000):
            h, prev = inj(h, e), h
            if (h - prev).abs().max() < 1e-14:
                break
    Be = inj.B.detach().numpy() @ e.numpy()
    np.testing.assert_allclose(h.numpy(), Be / a, rtol=1e-9, atol=1e-9)


def test_official_initialisation():
    model = LoopedLM(tiny_config())
    inj = model.injection
    A, B = inj.linear_part()
    np.testing.assert_allclose(A.diagonal.numpy(), math.sqrt(1 / 5), rtol=1e-6)  # 0.4472
    np.testing.assert_allclose(B.matrix.numpy(), 0.8047190 * np.eye(64), atol=1e-6)
    assert abs(float(inj.dt_bias.detach()[0]) - 0.2119354) < 1e-6 and float(inj.A_log.detach().abs().max()) == 0
    e = torch.randn(64)
    fixed = torch.linalg.solve(torch.eye(64) - A.dense(), B.dense() @ e)  # (1 − Ā)⁻¹ B̄ e
    torch.testing.assert_close(fixed, 1.456 * e, rtol=1e-3, atol=1e-6)
    for blk in [*model.prelude, *model.core, *model.coda]:  # every block starts as the identity
        assert not blk.attn.c_proj.weight.detach().any() and not blk.mlp.proj.weight.detach().any()
    # B orthogonal (orthonormal rows) when ds ≠ d
    narrow = LoopedLM(tiny_config(d_state=32, n_state_heads=2, n_kv_heads=2)).injection.B.detach()
    torch.testing.assert_close(narrow @ narrow.T, torch.eye(32), rtol=0, atol=1e-5)


def test_additive_is_identity():
    model = make_model(injection="additive")
    A, B = model.injection.linear_part()
    assert A.kind == B.kind == "identity"
    assert torch.equal(A.dense(), torch.eye(64)) and torch.equal(B.dense(), torch.eye(64))
    h, e = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    assert torch.equal(model.injection(h, e), h + e)


def test_linear_blocks_follow_the_concat_order_state_first():
    ds, d = 32, 64
    model = make_model(injection="linear", bias=True, d_state=ds, n_state_heads=2, d_state_mlp=64, n_kv_heads=2)
    W, b = model.injection.W.weight.detach(), model.injection.W.bias.detach()
    A, B = model.injection.linear_part()
    assert A.matrix.shape == (ds, ds) and B.matrix.shape == (ds, d)
    assert torch.equal(A.matrix, W[:, :ds]) and torch.equal(B.matrix, W[:, ds:])
    h, e = torch.randn(4, ds), torch.randn(4, d)
    want = F.linear(torch.cat([h, e], -1), W, b)  # the state first in the concatenation
    torch.testing.assert_close(h @ A.matrix.T + e @ B.matrix.T + b, want)
    with torch.no_grad():
        torch.testing.assert_close(model.injection(h, e), want)
        model.injection.W.weight[:, :ds] = 0  # with Ā = 0 the output ignores h
        assert torch.equal(model.injection(h, e), model.injection(torch.randn(4, ds), e))


# ---- bad inputs to the model -------------------------------------------------------------

def test_bad_model_inputs():
    model = make_model()
    with pytest.raises(InputError, match="longer than the model supports"):
        model(tokens(S=65))
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(InputError, match="n_loops"):
            model(tokens(), n_loops=bad)
        with pytest.raises(InputError, match="n_loops"):
            model.unroll(tokens(), n_loops=bad)
    for bad_id in (-1, 256):
        idx = tokens()
        idx[1, 3] = bad_id
        with pytest.raises(InputError, match=r"\[0, 256\)"):
            model(idx)
    with pytest.raises(InputError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(model(tokens(), n_loops=0).state, model.init_state(model.encode(tokens())))


@pytest.mark.parametrize("change", [dict(injection="diag"), dict(d_model=63), dict(n_core=0),
                                    dict(mean_loops=0), dict(mean_loops="4"), dict(backprop_loops=1.5),
                                    dict(injection="additive", d_state=32, n_state_heads=2),
                                    dict(d_state=48, n_state_heads=4), dict(norm_eps="x")])
def test_bad_configs_raise_config_error(change):
    with pytest.raises(ConfigError):
        tiny_config(**change)


# ---- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("parcae-140m", 144_323_136), ("parcae-370m", 388_003_328),
                                         ("parcae-770m", 776_655_680), ("parcae-1.3b", 1_338_591_744)])
def test_official_presets_match_the_official_parameter_counts(name, params):
    cfg = LoopConfig.preset(name)
    with torch.device("meta"):
        model = LoopedLM(cfg)
    assert model.num_params() == params
    assert (cfg.mean_loops, cfg.backprop_loops, cfg.vocab_size, cfg.block_size) == (8, 4, 32768, 2048)
    assert cfg.tie_embeddings and cfg.injection == "diagonal" and cfg.prelude_norm


@pytest.mark.parametrize("name,layers", [("gpt-140m", 6), ("gpt-370m", 12), ("gpt-770m", 18), ("gpt-1.3b", 24),
                                         ("gpt-tiny", 4), ("gpt-small", 6)])
def test_gpt_presets_build(name, layers):
    cfg = LoopConfig.preset(name)
    with torch.device("meta"):
        model = LoopedLM(cfg)
    assert not cfg.looped and len(model.prelude) == layers and len(model.core) == len(model.coda) == 0
    assert model.injection is None and model.readout is None


def test_fixed_depth_twin_layer_counts():
    cfg = LoopConfig.preset("tiny")  # P/R/C = 1/2/1, μ_rec = 4
    flops, params = cfg.fixed_depth_twin("flops"), cfg.fixed_depth_twin("params")
    assert (flops.n_prelude, flops.n_core, flops.n_coda) == (1 + 2 * 4 + 1, 0, 0)
    assert (params.n_prelude, params.n_core, params.n_coda) == (4, 0, 0)
    assert not flops.looped and flops.d_model == cfg.d_model and flops.effective_depth == 10
    big = LoopConfig.preset("parcae-140m").fixed_depth_twin("params")
    with torch.device("meta"):
        assert LoopedLM(big).num_params() == LoopedLM(LoopConfig.preset("gpt-140m")).num_params()
    with pytest.raises(ConfigError):
        cfg.fixed_depth_twin("tokens")
    with pytest.raises(ConfigError):
        LoopConfig.preset("no-such-preset")
