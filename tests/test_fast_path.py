"""The fast paths compute the same functions as the plain path.

Ground truth: the plain path (`fast_paths(False)`: the fused SDPA kernel, the two-line RoPE,
the composite ReLU², the injection on every loop, the masked per-sequence loop), running each
sequence alone at its own depth, float64 gradcheck / gradgradcheck, and torch.func.jvp.
No test is timed.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.models.injection import make_injection
from loopdyn.models.kernels import (apply_rope, causal_attention, causal_sdpa, fast_linear, fast_paths,
                                    fast_paths_enabled, relu2)
from loopdyn.models.layers import rope_table

TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(seed: int = 0, perturb: float = 0.05, **overrides) -> LoopedLM:
    """A small looped model with nonzero output projections (the official init makes every
    block the identity, which would hide attention and MLP differences)."""
    torch.manual_seed(seed)
    kw = dict(d_model=32, n_heads=4, d_mlp=64, n_prelude=1, n_core=2, n_coda=1, mean_loops=6,
              backprop_loops=3)
    kw.update(overrides)
    model = LoopedLM(LoopConfig.preset("tiny", **kw))
    with torch.no_grad():
        for blk in [*model.prelude, *model.core, *model.coda]:
            blk.attn.c_proj.weight.normal_(0, perturb)
            blk.mlp.proj.weight.normal_(0, perturb)
    return model


def tokens(batch: int = 5, seq: int = 12, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_pass(model, idx, targets, fast: bool, seed: int = 7):
    """Loss, logits, state, prev_state, loops and parameter gradients of one training forward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # h_0 and the sampled depths come from the global RNG
    with fast_paths(fast):
        out = model(idx, targets)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_training(model, idx, seed=7):
    targets = torch.roll(idx, -1, dims=1)
    plain, g_plain = train_pass(model, idx, targets, fast=False, seed=seed)
    fast, g_fast = train_pass(model, idx, targets, fast=True, seed=seed)
    assert torch.equal(plain.n_loops, fast.n_loops)
    torch.testing.assert_close(fast.logits, plain.logits, **TOL)
    torch.testing.assert_close(fast.loss, plain.loss, **TOL)
    torch.testing.assert_close(fast.state, plain.state, **TOL)
    torch.testing.assert_close(fast.prev_state, plain.prev_state, **TOL)
    assert g_plain.keys() == g_fast.keys() and g_plain
    for name in g_plain:
        scale = max(float(g_plain[name].abs().max()), 1e-3)
        torch.testing.assert_close(g_fast[name], g_plain[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    return plain


def test_fast_paths_switch_restores_state():
    assert fast_paths_enabled()
    with fast_paths(False):
        assert not fast_paths_enabled()
        with fast_paths(True):
            assert fast_paths_enabled()
        assert not fast_paths_enabled()
    assert fast_paths_enabled()


# ---- whole model: fast vs plain ------------------------------------------------------------------

CONFIGS = [
    dict(),  # diagonal injection, value embeddings, relu2, prenorm
    dict(injection="linear", bias=True),
    dict(injection="additive", value_embeds=False),
    dict(n_kv_heads=2, n_core=1, value_embeds=False),  # GQA outside the core
    dict(block="sandwich", mlp="swiglu", norm="layernorm"),
    dict(d_state=16, n_state_heads=2, value_embeds=False, input_gain="zoh"),
    dict(injection="autonomous", value_embeds=False),  # no injection, the state renormalised each loop
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_eval_logits_match_plain_path(overrides):
    model = make_model(**overrides).eval()
    idx = tokens()
    with torch.no_grad():
        with fast_paths(False):
            plain = model(idx, n_loops=7)
        fast = model(idx, n_loops=7)
    torch.testing.assert_close(fast.logits, plain.logits, **TOL)
    torch.testing.assert_close(fast.state, plain.state, **TOL)
    torch.testing.assert_close(fast.prev_state, plain.prev_state, **TOL)


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_training_step_matches_plain_path(overrides):
    # Poisson depths per sequence: the fast path reorders the batch and steps only the active prefix
    model = make_model(**overrides)
    plain = assert_same_training(model, tokens(batch=6))
    assert len(set(plain.n_loops.tolist())) > 1, "the seed must give unequal depths to exercise the sorted loop"


def test_fixed_depth_training_matches_plain_path():
    model = make_model(depth_sampling="fixed")
    plain = assert_same_training(model, tokens())
    assert plain.n_loops.tolist() == [6] * 5


def test_training_gradients_match_plain_path_long_sequence():
    # S above the explicit-attention limit: the fused kernel in both paths, the loop still fast
    import loopdyn.models.kernels as kernels

    model = make_model(block_size=64)
    old = kernels.EXPLICIT_ATTENTION_MAX_LEN
    kernels.EXPLICIT_ATTENTION_MAX_LEN = 16
    try:
        assert_same_training(model, tokens(batch=3, seq=40))
    finally:
        kernels.EXPLICIT_ATTENTION_MAX_LEN = old


def test_each_sequence_equals_running_it_alone_at_its_depth():
    # independent of the plain path: the definition of per-sequence depth
    model = make_model()
    idx = tokens(batch=6)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        out = model(idx)
    loops = out.n_loops.tolist()
    assert len(set(loops)) > 1
    torch.manual_seed(3)  # replay the RNG: h_0 as the training pass drew it (before the depths)
    with torch.no_grad():
        h0_all = model.init_state(model.encode(idx))
    model.eval()
    for b, T in enumerate(loops):
        ctx = model.encode(idx[b:b + 1])
        h = prev = h0_all[b:b + 1]
        with torch.no_grad():
            for _ in range(T):
                prev, h = h, model.step(h, ctx)
            logits = model.decode(h, ctx)
        torch.testing.assert_close(out.state[b:b + 1], h, **TOL)
        torch.testing.assert_close(out.prev_state[b:b + 1], prev, **TOL)
        torch.testing.assert_close(out.logits[b:b + 1], logits, **TOL)


@settings(max_examples=12)
@given(depths=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=6))
def test_any_depth_pattern_matches_masked_loop(depths):
    # arbitrary (n_b, k_b), including k not nested with n (the fast path then falls back)
    model = make_model(mean_loops=4, backprop_loops=3)
    n = torch.tensor([d[0] for d in depths])
    k = torch.tensor([d[1] for d in depths])
    if int((n + k).max()) == 0:
        k[0] = 1
    model.sample_depths = lambda batch, generator=None: (n.clone(), k.clone())
    idx = tokens(batch=len(depths), seq=6)
    assert_same_training(model, idx)


def test_state_tap_sees_every_loop_in_both_paths():
    model = make_model()
    seen = []
    handle = model.state_tap.register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    idx = tokens(batch=6)
    counts = {}
    for fast in (False, True):
        seen.clear()
        train_pass(model, idx, idx, fast)
        counts[fast] = list(seen)
    handle.remove()
    n_calls = len(counts[False])
    assert len(counts[True]) == n_calls  # h_0 and one call per loop of the longest sequence
    assert all(b == 6 for b in counts[False])
    assert counts[True][0] == 6 and min(counts[True]) < 6  # held sequences are not stepped


# ---- pieces --------------------------------------------------------------------------------------

def test_complex_rope_is_bit_identical_to_two_line_formula():
    rope = rope_table(32, 16, 50000.0)
    x = torch.randn(3, 20, 4, 16)
    with fast_paths(False):
        plain = apply_rope(x, rope[:20])
    assert torch.equal(apply_rope(x, rope[:20]), plain)
    # a strided view (one third of a fused projection) is handled too
    wide = torch.randn(3, 20, 3 * 4 * 16)[..., 4 * 16: 8 * 16].unflatten(-1, (4, 16))
    with fast_paths(False):
        plain = apply_rope(wide, rope[:20])
    assert torch.equal(apply_rope(wide, rope[:20]), plain)
    # closed form for one pair: a rotation by t·base^0 = t radians
    x = torch.zeros(1, 5, 1, 16)
    x[..., 0] = 1.0
    out = apply_rope(x, rope[:5])
    t = torch.arange(5.0)
    torch.testing.assert_close(out[0, :, 0, 0], torch.cos(t))
    torch.testing.assert_close(out[0, :, 0, 1], torch.sin(t))


def reference_attention(q, k, v, scale):
    """Row by row: softmax over the allowed keys of q_i·k_j·scale."""
    S = q.shape[-2]
    out = torch.empty_like(q)
    for i in range(S):
        w = torch.softmax((q[..., i:i + 1, :] @ k[..., : i + 1, :].transpose(-1, -2)) * scale, dim=-1)
        out[..., i:i + 1, :] = w @ v[..., : i + 1, :]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_attention_matches_definition_and_fused_kernel(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=dtype) for _ in range(3))
    scale = 1 / math.sqrt(8)
    fast = causal_attention(q.requires_grad_(), k, v, scale).detach()  # a gradient is wanted: explicit
    q.requires_grad_(False)
    with torch.no_grad():  # no gradient: the fused kernel, the same numbers
        torch.testing.assert_close(causal_attention(q, k, v, scale), fast, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, reference_attention(q, k, v, scale), **tol)
    torch.testing.assert_close(fast, causal_sdpa(q, k, v, scale), **tol)


def test_explicit_attention_first_and_second_derivatives():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    f = lambda q, k, v: causal_attention(q, k, v, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_relu2_function_values_and_derivatives():
    x = torch.tensor([-2.0, -0.5, 0.25, 1.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(relu2(x), 0.5 * torch.clamp(x, min=0) ** 2)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(relu2, (xg,))
    assert torch.autograd.gradgradcheck(relu2, (xg,))
    # gradient bit-identical to the composite in float32
    x32 = torch.randn(1000, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    w = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    (g_fast,) = torch.autograd.grad(relu2(x32), x32, w)
    with fast_paths(False):
        (g_plain,) = torch.autograd.grad(relu2(x32), x32, w)
    assert torch.equal(g_fast, g_plain)
    with torch.no_grad():  # the in-place no-grad variant does not touch its input
        y = x32.detach().clone()
        out = relu2(y)
        assert torch.equal(y, x32.detach()) and torch.equal(out, 0.5 * torch.relu(y).square())


@pytest.mark.parametrize("kind", ["diagonal", "additive"])
def test_injection_split_equals_forward(kind):
    torch.manual_seed(0)
    inj = make_injection(kind, 8, 8, bias=True)
    inj.reset_parameters()
    with torch.no_grad():
        for p in inj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h, e = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    state_map, drive = inj.split(e)
    assert torch.equal(state_map(h) + drive, inj(h, e))  # bit for bit: step == one loop of forward


def test_forward_mode_derivative_of_the_step_on_the_fast_path():
    # torch.func.jvp through explicit attention, complex RoPE and ReLU²: equal to the plain path's
    # (math-kernel) J·v, and adjoint to the reverse-mode Jᵀ·w: ⟨w, J v⟩ = ⟨Jᵀ w, v⟩
    model = make_model(perturb=0.1).eval()
    idx = tokens(batch=2, seq=7)
    ctx = model.encode(idx)
    g = torch.Generator().manual_seed(4)
    h, v, w = (torch.randn(2, 7, 32, generator=g) for _ in range(3))
    with torch.no_grad():
        _, jv = torch.func.jvp(lambda x: model.step(x, ctx), (h,), (v,))
        with fast_paths(False):
            _, jv_plain = torch.func.jvp(lambda x: model.step(x, ctx), (h,), (v,))
    torch.testing.assert_close(jv, jv_plain, **TOL)
    x = h.clone().requires_grad_(True)
    (jtw,) = torch.autograd.grad(model.step(x, ctx), x, w)
    lhs, rhs = float((w * jv).sum()), float((jtw * v).sum())
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + abs(rhs))


def test_bfloat16_model_uses_fused_kernel_and_runs():
    model = make_model().to(torch.bfloat16).eval()
    idx = tokens(batch=2, seq=8)
    with torch.no_grad():
        fast = model(idx, n_loops=3).logits
        with fast_paths(False):
            plain = model(idx, n_loops=3).logits
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, plain, rtol=0.05, atol=0.05)


def test_cross_entropy_unchanged_by_reordering():
    # the sorted loop reorders sequences internally; the loss is over the original order
    model = make_model()
    idx = tokens(batch=6)
    targets = torch.roll(idx, -1, dims=1)
    out, _ = train_pass(model, idx, targets, fast=True)
    expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(out.loss, expected)


def test_rmsnorm_fused_no_grad_path_equals_definition():
    from loopdyn.models.layers import RMSNorm

    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(5))
    x = torch.randn(4, 9, 48, generator=torch.Generator().manual_seed(6)) * 3
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    with torch.no_grad():
        fast = norm(x)
        with fast_paths(False):
            plain = norm(x)
    torch.testing.assert_close(fast, expected, **TOL)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)


def test_relu2_mlp_no_grad_path_is_bit_identical():
    from loopdyn.models.layers import MLP

    torch.manual_seed(8)
    mlp = MLP(24, 96, "relu2")
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        fast = mlp(x)
        with fast_paths(False):
            plain = mlp(x)
    assert torch.equal(fast, plain)
    torch.testing.assert_close(fast, mlp.proj(0.5 * torch.relu(mlp.fc(x)) ** 2).detach())


def test_rmsnorm_function_gradients_match_definition():
    # closed-form backward of the fast RMS norm vs autograd through the definition (float64),
    # plus gradcheck / gradgradcheck, with and without a gain
    from loopdyn.models.kernels import fast_rms_norm

    g = torch.Generator().manual_seed(9)
    x = (torch.randn(3, 5, 12, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    w = torch.randn(12, generator=g, dtype=torch.float64).requires_grad_(True)
    up = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    for weight, eps in ((w, 1e-5), (None, None)):
        e = torch.finfo(torch.float64).eps if eps is None else eps
        inputs = (x,) if weight is None else (x, weight)
        ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + e) * (1 if weight is None else weight)
        fast = fast_rms_norm(x, weight, eps)
        assert fast.grad_fn is not None and "RMSNormFunction" in type(fast.grad_fn).__name__
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(fast, inputs, up), torch.autograd.grad(ref, inputs, up)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        f = (lambda x: fast_rms_norm(x, None, None)) if weight is None else (lambda x, w: fast_rms_norm(x, w, 1e-5))
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


def test_fused_qkv_falls_back_when_a_projection_is_hooked():
    # a hook on c_k must fire (the fused matmul would bypass it) and the numbers stay the same
    model = make_model().eval()
    idx = tokens()
    with torch.no_grad():
        with fast_paths(False):
            plain = model(idx, n_loops=3).logits
        fused = model(idx, n_loops=3).logits
        calls = []
        handle = model.core[0].attn.c_k.register_forward_hook(lambda m, i, o: calls.append(o.shape))
        try:
            hooked = model(idx, n_loops=3).logits
        finally:
            handle.remove()
    assert len(calls) == 3  # once per loop
    torch.testing.assert_close(fused, plain, **TOL)
    torch.testing.assert_close(hooked, plain, **TOL)


def test_fast_linear_values_and_gradients_match_f_linear():
    # oneDNN product (when this build has it) vs F.linear: values, first and second derivatives
    from loopdyn.models.kernels import fast_linear
    from loopdyn.models.layers import Linear

    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 7, 40, generator=g).requires_grad_(True)
    w = torch.randn(24, 40, generator=g).requires_grad_(True)
    b = torch.randn(24, generator=g).requires_grad_(True)
    up = torch.randn(3, 7, 24, generator=g)
    fast = fast_linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(torch.autograd.grad(fast, (x, w, b), up), torch.autograd.grad(ref, (x, w, b), up)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    # double backward (create_graph): d/dx of <up, d(fast)/dw ...> through the plain products
    (gw_fast,) = torch.autograd.grad(fast_linear(x, w, b), w, up, create_graph=True)
    (gw_ref,) = torch.autograd.grad(F.linear(x, w, b), w, up, create_graph=True)
    (gx_fast,) = torch.autograd.grad(gw_fast.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(gw_ref.square().sum(), x)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-4, atol=1e-3)
    # reverse over reverse, as an audit's Linearisation takes J·v: g(u) = Jᵀu recorded with
    # create_graph (its products on oneDNN again), then J·v = ∂⟨g(u), v⟩/∂u
    u = torch.zeros(3, 7, 24, requires_grad=True)
    v = torch.randn(3, 7, 40, generator=g)
    jv = {}
    for name, f in (("fast", fast_linear), ("ref", F.linear)):
        (gu,) = torch.autograd.grad(f(x, w, b), x, u, create_graph=True)
        (jv[name],) = torch.autograd.grad(gu, u, v)
    torch.testing.assert_close(jv["fast"], jv["ref"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(jv["ref"], F.linear(v, w), rtol=1e-5, atol=1e-4)  # J·v = W·v exactly
    x64 = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_linear, (x64, w64))  # float64: F.linear itself
    # the module: same keys as nn.Linear, hooks fire, and a hook does not change the numbers
    lin = Linear(40, 24)
    assert set(lin.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        plain_out = lin(x)
        seen = []
        h = lin.register_forward_hook(lambda m, i, o: seen.append(o))
        hooked_out = lin(x)
        h.remove()
    assert len(seen) == 1 and torch.equal(plain_out, hooked_out)


def _traced_targets(fn, *args):
    """The call_function targets of the graph torch.compile traces for fn (run as traced)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out, seen[0]


def test_code_traced_by_torch_compile_takes_the_plain_path_with_onednn_linear():
    """Under torch.compile the fast paths are off (inductor fuses the plain path itself) except
    the linear layers: inductor cannot lower oneDNN's own op with non-constant weights, so the
    traced graph calls the custom operator loopdyn::onednn_linear instead (F.linear without
    oneDNN, or with fast_paths(False))."""
    from loopdyn.models.kernels import _COMPILED_ONEDNN

    lin = torch.nn.Linear(8, 4)
    fn = lambda x: fast_linear(x, lin.weight, lin.bias) * (2.0 if fast_paths_enabled() else 3.0)  # noqa: E731
    x = torch.randn(5, 8)
    out, targets = _traced_targets(fn, x)
    torch.testing.assert_close(out, 3.0 * F.linear(x, lin.weight, lin.bias))
    assert fast_paths_enabled()  # eager code still takes them
    assert not any("mkldnn" in t for t in targets)
    assert any("loopdyn.onednn_linear" in t for t in targets) is (_COMPILED_ONEDNN is not None)
    with fast_paths(False):
        _, targets = _traced_targets(fn, x)
    assert not any("onednn" in t or "mkldnn" in t for t in targets) and any("linear" in t for t in targets)


@pytest.mark.skipif(not hasattr(torch.ops, "loopdyn") or not hasattr(torch.ops.loopdyn, "onednn_linear"),
                    reason="no oneDNN in this build")
def test_onednn_custom_operator_values_gradients_and_registration():
    """torch.library.opcheck (schema, fake tensor, autograd registration), then values and
    gradients through AOTAutograd (torch.compile's aot_eager backend) against F.linear."""
    op = torch.ops.loopdyn.onednn_linear.default
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    torch.library.opcheck(op, (x, w, b))
    torch.library.opcheck(op, (x, w, None))
    compiled = torch.compile(lambda x, w, b: (fast_linear(x, w, b) ** 2).sum(), backend="aot_eager", fullgraph=True)
    got = compiled(x, w, b)
    grads = torch.autograd.grad(got, (x, w, b))
    torch._dynamo.reset()
    want = (F.linear(x, w, b) ** 2).sum()
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, torch.autograd.grad(want, (x, w, b))):
        torch.testing.assert_close(a, e)


@pytest.mark.slow
def test_compiled_model_matches_eager():
    """torch.compile (inductor) of a whole model: same logits and gradients as eager (a minute)."""
    model = make_model(state_init="zero")  # inductor draws other random numbers than eager
    idx = tokens()
    ref = model(idx[:, :-1], idx[:, 1:], n_loops=4)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = torch.compile(model)(idx[:, :-1], idx[:, 1:], n_loops=4)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-3, atol=1e-5)
