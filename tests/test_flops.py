"""Tests for loopdyn.scaling.flops: FLOP counts against torch.utils.flop_counter, parameter counts
against the built models, and hand-computed figures for the tiny preset.

Ground truths:
- FlopCounterMode counts every matmul the model really runs (forward and autograd backward).
  On the CPU the fused SDPA kernel is not in its registry, so attention runs under the math
  backend, whose QK^T and AV are plain bmm calls over the full S x S square: the "dense"
  attention term. With depth_sampling="fixed" the training count is deterministic, so the
  comparison is exact (integers, no tolerance).
- Parameter counts: LoopedLM(...).num_params() and the parameters of the modules that run in
  each loop, and a fixed-depth twin with as many blocks as the unrolled model.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from loopdyn.scaling import flops
from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.models.errors import InputError
from loopdyn.models.kernels import fast_paths

B, S = 2, 16


def measured_flops(model, idx, *, train: bool, n_loops=None) -> int:
    """Total FLOPs FlopCounterMode sees for one forward (eval) or forward+backward (train), on
    the plain path (the architecture as the official code computes it: the injection's B̄e on
    every loop; the fast path computes it once per forward)."""
    with fast_paths(False), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        if train:
            model.train()
            model(idx, idx).loss.backward()
        else:
            model.eval()
            with torch.no_grad():
                model(idx, n_loops=n_loops)
    return counter.get_total_flops()


def perturbed(config, seed=0):
    torch.manual_seed(seed)
    return LoopedLM(config)


CONFIGS = {
    "tiny": LoopConfig.preset("tiny", depth_sampling="fixed"),
    # every other code path that changes a matmul: linear injection, gated MLP, grouped KV
    # heads in prelude/coda, an untied head, biases (not counted: addmm's bias add is no matmul),
    # a wider state than the outer stream, sandwich blocks, value embeddings elsewhere
    "variant": LoopConfig.preset("tiny", injection="linear", mlp="swiglu", n_kv_heads=2,
                                 tie_embeddings=False, bias=True, d_state=96, n_state_heads=6,
                                 value_embeds=False, block="sandwich", n_prelude=2, n_core=3,
                                 n_coda=2, mean_loops=5, backprop_loops=2, depth_sampling="fixed"),
    "additive": LoopConfig.preset("tiny", injection="additive", mean_loops=3, backprop_loops=3,
                                  depth_sampling="fixed", norm="layernorm", qk_bias=True),
}


# -- hand-computed figures for the tiny preset ----------------------------------------------

def test_tiny_hand_counts():
    cfg = LoopConfig.preset("tiny")  # d 64, MLP 256, vocab 256, 1/2/1 blocks, mu 4, bwd 2
    d, m, V = 64, 256, 256
    block_mm = 4 * d * d + 2 * d * m  # c_q, c_k, c_v, c_proj, fc, proj = 49152
    gate = 32 * 4  # value-embedding gate (core.0 and coda.0 have one) = 128
    mm = flops.stage_params(cfg, "matmul")
    assert (mm.prelude, mm.loop, mm.readout, mm.coda, mm.head, mm.embeddings) == (
        block_mm, d * d + 2 * block_mm + gate, d * d, block_mm + gate, V * d, 0)
    assert mm.loop == 102528 and mm.once == 49152 + 4096 + 49280 + 16384

    block_all = block_mm + 2 * d  # + two RMSNorm gains = 49280
    injection = d * d + 2 * d  # B, A_log, dt_bias = 4224
    total_1 = (V * d  # token embedding (tied head)
               + block_all + d  # prelude + prelude norm
               + injection + 2 * block_all + gate  # one loop
               + d * d  # readout
               + block_all + gate + d  # coda + final norm
               + 2 * V * d)  # two value-embedding tables
    assert total_1 == 254976
    per_loop = injection + 2 * block_all + gate
    assert flops.unrolled_params(cfg, 1) == total_1
    assert flops.unrolled_params(cfg) == total_1 + 3 * per_loop == 563712
    assert flops.unrolled_params(cfg, embeddings=False) == 563712 - 3 * V * d

    # training at the mean: n = 2 loops without gradients, k = 2 with
    c = flops.training_flops(cfg, tokens=1000)
    n1, n2 = 2 * mm.loop, mm.once + 2 * mm.loop
    assert (c.n_hat_no_grad, c.n_hat_grad) == (n1, n2) == (205056, 323968)
    assert c.total == (2 * 205056 + 6 * 323968) * 1000
    # attention: 1 + 2·4 + 1 = 10 layers; forward dense 4·S·d per token per layer
    a = flops.training_flops(cfg, tokens=1, attention="dense", seq_len=S)
    assert a.attention_flops == 4 * S * d * (2 * 2 + 3 * (1 + 2 * 2 + 1))
    causal = flops.forward_flops(cfg, 1, loops=4, attention="causal", seq_len=S)
    assert causal.attention_flops == 2 * (S + 1) * d * 10


# -- against torch.utils.flop_counter --------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_flops_match_flop_counter(name):
    cfg = CONFIGS[name]
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    for loops in (1, 3, 7):
        measured = measured_flops(model, idx, train=False, n_loops=loops)
        predicted = flops.forward_flops(cfg, B * S, loops, attention="dense", seq_len=S)
        assert predicted.total == measured, (name, loops)
        # the parameter-only rule is exactly the mm part (attention shows up as bmm)
        params_only = flops.forward_flops(cfg, B * S, loops)
        assert params_only.total == predicted.parameter_flops < measured
        assert params_only.total == 2 * flops.stage_params(cfg, "matmul").unrolled(loops) * B * S


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_flops_match_flop_counter_with_truncated_backprop(name):
    cfg = CONFIGS[name]
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(2))
    measured = measured_flops(model, idx, train=True)
    predicted = flops.training_flops(cfg, B * S, attention="dense", seq_len=S)
    n, k = predicted.loops_no_grad, predicted.loops_grad
    assert (n, k) == (cfg.mean_loops - min(cfg.mean_loops, cfg.backprop_loops),
                      min(cfg.mean_loops, cfg.backprop_loops))
    assert predicted.total == measured
    # and the split matters: counting every loop with backprop (6N) overshoots
    all_grad = flops.training_flops(cfg, B * S, n_no_grad=0, n_grad=n + k, attention="dense", seq_len=S)
    if n:
        assert all_grad.total > measured


def test_fixed_depth_model_flops_match_flop_counter():
    cfg = LoopConfig.preset("gpt-tiny")
    model = perturbed(cfg)
    idx = torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(3))
    assert flops.training_flops(cfg, B * S, attention="dense", seq_len=S).total == \
        measured_flops(model, idx, train=True)
    assert flops.forward_flops(cfg, B * S, attention="dense", seq_len=S).total == \
        measured_flops(model, idx, train=False)


def test_causal_attention_term_counts_allowed_pairs():
    # Σ_{i=1..S} i query-key pairs, 2 matmuls, 2 FLOPs per multiply-add over w channels
    w, s = 48, 10
    pairs = sum(range(1, s + 1))
    assert flops.attention_flops_per_layer(w, s, "causal") * s == 2 * 2 * w * pairs
    assert flops.attention_flops_per_layer(w, s, "dense") * s == 2 * 2 * w * s * s


# -- parameter counts against the models ------------------------------------------------------

def loop_module_params(model) -> int:
    """Parameters of the modules one loop iteration runs (injection + core), from the model."""
    return sum(p.numel() for p in model.injection.parameters()) + \
        sum(p.numel() for p in model.core.parameters())


@settings(max_examples=40)
@given(st.data())
def test_unrolled_params_match_built_models(data):
    injection = data.draw(st.sampled_from(["diagonal", "linear", "additive", "none"]))
    heads = data.draw(st.sampled_from([2, 4]))
    cfg = dict(
        d_model=64, n_heads=heads, n_kv_heads=data.draw(st.sampled_from([1, heads])),
        d_mlp=data.draw(st.sampled_from([96, 128])),
        mlp=data.draw(st.sampled_from(["relu2", "swiglu", "geglu", "gelu"])),
        norm=data.draw(st.sampled_from(["rmsnorm", "layernorm"])),
        block=data.draw(st.sampled_from(["prenorm", "sandwich"])),
        bias=data.draw(st.booleans()), qk_bias=data.draw(st.booleans()),
        tie_embeddings=data.draw(st.booleans()),
        value_embeds=data.draw(st.booleans()),
        prelude_norm=data.draw(st.booleans()),
        n_prelude=data.draw(st.integers(0, 3)), n_core=data.draw(st.integers(1, 3)),
        n_coda=data.draw(st.integers(0, 3)),
        mean_loops=data.draw(st.integers(1, 6)), injection=injection,
    )
    if injection == "none":
        cfg["n_core"] = 0
    if cfg["value_embeds"]:
        cfg["n_kv_heads"] = heads  # a core value embedding needs full-width values
    if injection in ("diagonal", "linear") and not cfg["value_embeds"] and heads == 4:
        cfg.update(d_state=96, n_state_heads=6)  # a wider state (same head size)
    config = LoopConfig(**cfg)
    with torch.device("meta"):
        model = LoopedLM(config)
    if not config.looped:
        assert flops.unrolled_params(config) == model.num_params()
        assert flops.unrolled_params(config, embeddings=False) == model.num_params(exclude_embeddings=True)
        return
    loops = data.draw(st.integers(1, 9))
    extra = (loops - 1) * loop_module_params(model)
    assert flops.unrolled_params(config, 1) == model.num_params()
    assert flops.unrolled_params(config, loops) == model.num_params() + extra
    assert flops.unrolled_params(config, loops, embeddings=False) == \
        model.num_params(exclude_embeddings=True) + extra
    # matmul parameters per stage against the weights of the model's Linear layers
    mm = flops.stage_params(config, "matmul")
    linear = lambda mods: sum(m.weight.numel() for mod in mods for m in mod.modules()  # noqa: E731
                              if isinstance(m, torch.nn.Linear))
    inj = model.injection.B.numel() if injection == "diagonal" else linear([model.injection])
    assert mm.loop == inj + linear(model.core)
    assert (mm.prelude, mm.coda, mm.readout) == (linear(model.prelude), linear(model.coda),
                                                 model.readout.weight.numel())
    assert mm.head == model.lm_head.weight.numel()


def test_unrolled_params_against_a_fixed_depth_twin():
    # The FLOP-matched twin stacks P + R·mu + C blocks, the blocks of the unrolled model, without
    # the loop's own parts: prelude norm, mu injections, readout. (No value embeddings: their
    # layout depends on the block count.)
    for mu in (1, 4, 7):
        cfg = LoopConfig.preset("tiny", value_embeds=False, mean_loops=mu)
        twin = cfg.fixed_depth_twin("flops")
        assert twin.n_prelude == 1 + 2 * mu + 1
        with torch.device("meta"):
            n_twin = LoopedLM(twin).num_params()
        d = cfg.d_model
        loop_only = d + mu * (d * d + 2 * d) + d * d  # ln_prelude, mu·(B, A_log, dt_bias), C
        assert flops.unrolled_params(cfg, mu) == n_twin + loop_only


def test_paper_presets_scale_as_expected():
    cfg = LoopConfig.preset("parcae-140m")
    with torch.device("meta"):
        model = LoopedLM(cfg)
    n1 = flops.unrolled_params(cfg, 1)
    assert n1 == model.num_params()
    assert 140e6 < n1 < 150e6  # the preset's name counts embeddings
    mm = flops.stage_params(cfg, "matmul")
    # the training rule at mu 8, bwd 4 against 6·N for the unrolled matmul parameters
    c = flops.training_flops(cfg, 1.0)
    assert c.per_token == 2 * 4 * mm.loop + 6 * (mm.once + 4 * mm.loop)
    assert c.per_token < 6 * mm.unrolled(8)


# -- loop counts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mu,bwd", [(4, 2), (8, 4), (3, 5), (1, 1)])
def test_expected_loops_match_sampled_depths(mu, bwd):
    cfg = LoopConfig.preset("tiny", mean_loops=mu, backprop_loops=bwd)
    n_exp, k_exp = flops.training_loops(cfg, "expected")
    assert n_exp + k_exp == pytest.approx(mu + math.exp(-mu), rel=1e-12)
    torch.manual_seed(0)
    n, k = LoopedLM(cfg).sample_depths(200_000)
    # standard errors ≤ sqrt(mu/2e5) ≈ 0.0063 for mu = 8: 5 sigma
    assert float(n.double().mean()) == pytest.approx(n_exp, abs=0.035)
    assert float(k.double().mean()) == pytest.approx(k_exp, abs=0.035)
    assert flops.training_loops(cfg, "mean") == (mu - min(mu, bwd), min(mu, bwd))
    fixed = cfg.replace(depth_sampling="fixed")
    assert flops.training_loops(fixed, "expected") == flops.training_loops(fixed, "mean")


def test_bad_inputs():
    cfg = LoopConfig.preset("tiny")
    with pytest.raises(InputError, match="loops"):
        flops.unrolled_params(cfg, -1)
    with pytest.raises(InputError, match="fixed-depth"):
        flops.unrolled_params(LoopConfig.preset("gpt-tiny"), 3)
    with pytest.raises(InputError, match="both"):
        flops.training_flops(cfg, 1, n_no_grad=2)
    with pytest.raises(InputError, match="seq_len"):
        flops.training_flops(cfg, 1, attention="causal")
    with pytest.raises(InputError, match="attention"):
        flops.forward_flops(cfg, 1, attention="flash", seq_len=8)
    with pytest.raises(InputError, match="tokens"):
        flops.training_flops(cfg, float("nan"))
    with pytest.raises(InputError, match="depth"):
        flops.training_loops(cfg, "median")
    assert np.isfinite(flops.training_flops(cfg, 1, n_no_grad=1.5, n_grad=2.0).total)
