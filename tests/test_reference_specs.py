"""Self-checks of the spec-only references tests/huginn_reference.py and tests/ouro_reference.py
(independent of loopdyn): key sets and published parameter counts, file layouts, closed-form
forward cases (zero weights, identity adapters), norms, RoPE conventions, GQA, exit maths."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests import huginn_reference as hug
from tests import ouro_reference as ouro
from tests.hf_layout_reference import LAYOUTS, rms_norm

IDX = torch.tensor([[3, 17, 99, 5, 64, 1], [0, 127, 8, 8, 42, 77]])


def _rms(x):
    return x.pow(2).mean(-1).sqrt()


# ------------------------------------------------------------------------------ Huginn configs

def test_raven_config_spellings_and_untied_flag():
    c = hug.raven_config()
    assert c["model_type"] == "huginn_raven" and c["n_embd"] == 32 and c["n_heads"] == 4
    assert c["num_key_value_heads"] == 4 and c["head_dim"] == 8 and c["n_layers"] == 4
    assert "tie_word_embeddings" not in c and c["torch_dtype"] == "float32"
    h = hug.raven_config(spelling="hf", dtype_key="dtype", tie_embeddings=False)
    assert h["hidden_size"] == 32 and h["num_attention_heads"] == 4 and h["num_hidden_layers"] == 4
    assert "n_embd" not in h and h["tie_word_embeddings"] is False and "dtype" in h
    assert hug.cfg_get(h, "n_embd") == 32
    assert c["init_values"]["std"] == pytest.approx(math.sqrt(2 / 160))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        hug.raven_config(num_key_value_heads=2)
    with pytest.raises(KeyError):
        hug.raven_config(not_a_key=1)


def test_huginn_0125_parameter_count_closed_form():
    cfg = hug.raven_config(**hug.HUGINN_0125)
    d, I, V = 5280, 17920, 65536
    block = 4 * d + 3 * d * d + 2 * 55 * 96 + d * d + 2 * I * d + I * d
    expected = V * d + 8 * block + 2 * d * d + d
    assert hug.parameter_count(cfg) == expected
    assert 3.5e9 < expected < 3.6e9  # "3.5B" (§2: ≈ 3.56B)
    shapes = hug.state_dict_shapes(cfg)
    assert shapes["transformer.core_block.3.attn.Wqkv.weight"] == (15840, 5280)
    assert shapes["transformer.prelude.0.attn.qk_bias"] == (2, 1, 55, 96)
    assert shapes["freqs_cis"] == (1, 4096, 1, 48, 2) and "lm_head.weight" not in shapes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tied", [True, False])
def test_huginn_layouts_round_trip(tmp_path, layout, tied):
    d = hug.make_huginn_checkpoint(tmp_path, layout=layout, tie_embeddings=tied, bias=not tied)
    cfg, sd = hug.load_checkpoint(d)
    want = hug.random_state_dict(cfg)
    assert set(sd) == set(want) and ("lm_head.weight" in sd) == (not tied)
    assert ("transformer.adapter.bias" in sd) == (not tied)
    assert all(torch.equal(sd[k], want[k]) for k in want)
    assert json.loads((d / "config.json").read_text()) == cfg


def test_huginn_bf16_checkpoint(tmp_path):
    d = hug.make_huginn_checkpoint(tmp_path, dtype=torch.bfloat16)
    cfg, sd = hug.load_checkpoint(d)
    assert cfg["torch_dtype"] == "bfloat16" and sd["transformer.wte.weight"].dtype == torch.bfloat16
    assert sd["freqs_cis"].dtype == torch.float32
    out = hug.reference_forward(d, IDX, 2)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    out16 = hug.reference_forward(d, IDX, 2, dtype=torch.bfloat16)
    assert out16.logits.dtype == torch.float32  # upcast after the matmul (§3.6)
    assert out16.states[-1].dtype == torch.bfloat16
    rel = (out16.logits - out.logits).norm() / out.logits.norm()
    assert 1e-4 < rel < 0.1  # bf16 rounding, not a different model


# ------------------------------------------------------------------------------ Huginn forward

@pytest.fixture(scope="module")
def huginn(tmp_path_factory):
    d = hug.make_huginn_checkpoint(tmp_path_factory.mktemp("huginn"), seed=1)
    return hug.load_checkpoint(d)


def test_huginn_shapes_determinism_and_norms(huginn):
    cfg, sd = huginn
    h0 = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    out = hug.reference_forward(huginn, IDX, 5, h0)
    assert out.logits.shape == (2, 6, 128) and len(out.states) == 6 and len(out.pre_norm_states) == 5
    assert len(out.logits_per_loop) == 6 and torch.equal(out.logits_per_loop[-1], out.logits)
    assert torch.equal(out.states[0], h0)
    again = hug.reference_forward(huginn, IDX, 5, h0)
    assert torch.equal(again.logits, out.logits)
    w4 = sd["transformer.core_block.1.norm_4.weight"]
    for s, r in zip(out.states[1:], out.pre_norm_states):
        assert torch.allclose(_rms(s / w4), torch.ones(2, 6), atol=1e-4)  # s_t = N₄(r_t)
        assert torch.allclose(s, rms_norm(r, w4, 1e-6))
    # the loop moves the logits: a parity test against it can fail
    assert (out.logits_per_loop[1] - out.logits_per_loop[5]).abs().max() > 1e-2
    # truncation: T loops = the first T of a longer run
    short = hug.reference_forward(huginn, IDX, 3, h0)
    assert torch.allclose(short.logits, out.logits_per_loop[3], atol=1e-6)
    zero = hug.reference_forward(huginn, IDX, 0)
    assert torch.equal(zero.states[0], torch.zeros(2, 6, 32))
    assert torch.allclose(zero.latent, torch.zeros(2, 6, 32))  # ln_f(0) = 0


def test_huginn_causal(huginn):
    a = hug.reference_forward(huginn, IDX, 3).logits
    idx = IDX.clone()
    idx[:, 4] = 11
    b = hug.reference_forward(huginn, idx, 3).logits
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:])


def _zero_core(sd, prefix="transformer.core_block."):
    sd = dict(sd)
    for k in sd:
        if k.startswith(prefix) and (k.endswith("Wqkv.weight") or k.endswith("proj.weight")
                                     or k.endswith("fc.weight")):
            sd[k] = torch.zeros_like(sd[k])
    return sd


def test_huginn_closed_form_zero_core_and_adapter_columns(tmp_path):
    cfg, sd = hug.load_checkpoint(hug.make_huginn_checkpoint(tmp_path, bias=True, seed=3))
    sd = _zero_core(sd)  # each core block becomes x ↦ N₄(N₂(x))
    eps = 1e-6

    def core(x):
        for j in range(2):
            p = f"transformer.core_block.{j}."
            x = rms_norm(rms_norm(x, sd[p + "norm_2.weight"], eps), sd[p + "norm_4.weight"], eps)
        return x

    h0 = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    W = sd["transformer.adapter.weight"].clone()
    bias = sd["transformer.adapter.bias"]
    # state columns = identity, prelude columns = 0: s₁ = Core(h0 + b), s₂ = Core(s₁ + b)
    sd["transformer.adapter.weight"] = torch.cat([torch.eye(32), torch.zeros(32, 32)], 1)
    out = hug.reference_forward((cfg, sd), IDX, 2, h0)
    assert torch.allclose(out.states[1], core(h0 + bias), atol=1e-5)
    assert torch.allclose(out.states[2], core(out.states[1] + bias), atol=1e-5)
    # state columns = 0: s_t = Core(B e + b) for every t ≥ 1 (a fixed point after one step)
    sd["transformer.adapter.weight"] = torch.cat([torch.zeros(32, 32), W[:, 32:]], 1)
    out = hug.reference_forward((cfg, sd), IDX, 3, h0)
    want = core(out.e @ W[:, 32:].T + bias)
    for s in out.states[1:]:
        assert torch.allclose(s, want, atol=1e-5)


def test_huginn_embedding_scale_and_tied_head(tmp_path):
    """Zero prelude and coda: e = N₄(N₂(√d·wte[x])), logits = ln_f(N₄N₂(ln_f(s_T)))·wteᵀ."""
    cfg, sd = hug.load_checkpoint(hug.make_huginn_checkpoint(tmp_path, seed=4))
    sd = _zero_core(_zero_core(sd, "transformer.prelude."), "transformer.coda.")
    eps = 1e-6
    p, c = "transformer.prelude.0.", "transformer.coda.0."

    def nn_(x, q):
        return rms_norm(rms_norm(x, sd[q + "norm_2.weight"], eps), sd[q + "norm_4.weight"], eps)

    out = hug.reference_forward((cfg, sd), IDX, 2)
    e = nn_(math.sqrt(32) * sd["transformer.wte.weight"][IDX], p)
    assert torch.allclose(out.e, e, atol=1e-5)
    lnf = sd["transformer.ln_f.weight"]
    y = rms_norm(nn_(rms_norm(out.states[-1], lnf, eps), c), lnf, eps)
    assert torch.allclose(out.logits, y @ sd["transformer.wte.weight"].T, atol=1e-4)


def test_huginn_rope_is_interleaved_and_relative():
    cfg = hug.raven_config(n_embd=8, n_heads=4)  # hd = 2: one pair, θ₀ = 1
    table = hug.rope_table(cfg)
    x = torch.zeros(1, 3, 1, 2)
    x[..., 0] = 1.0
    y = hug.apply_rope(x, table[:, :3])
    for pos in range(3):
        assert torch.allclose(y[0, pos, 0], torch.tensor([math.cos(pos), math.sin(pos)]), atol=1e-6)
    cfg = hug.raven_config()
    table = hug.rope_table(cfg)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def dot(m, n):
        qm = hug.apply_rope(q.view(1, 1, 1, 8), table[:, m:m + 1])
        kn = hug.apply_rope(k.view(1, 1, 1, 8), table[:, n:n + 1])
        return float((qm * kn).sum())

    assert dot(5, 2) == pytest.approx(dot(9, 6), abs=1e-5) and dot(5, 2) != pytest.approx(dot(5, 3))


def test_official_random_state_statistics():
    s = hug.official_random_state((64, 64, 64), 64, seed=0)
    assert float(s.std()) == pytest.approx(0.628, abs=0.005)  # §3.3 measured
    assert float(s.abs().max()) <= 3 * math.sqrt(2 / 320) * 8 + 1e-6
    assert torch.equal(s, hug.official_random_state((64, 64, 64), 64, seed=0))


def test_huginn_strict_keys(huginn):
    cfg, sd = huginn
    bad = dict(sd)
    bad.pop("transformer.ln_f.weight")
    with pytest.raises(KeyError, match="ln_f"):
        hug.reference_forward((cfg, bad), IDX, 1)
    bad = dict(sd, extra=torch.zeros(1))
    with pytest.raises(KeyError, match="extra"):
        hug.reference_forward((cfg, bad), IDX, 1)


# --------------------------------------------------------------------------------------- Ouro

def test_ouro_config_and_published_counts():
    c = ouro.ouro_config()
    assert list(c) == sorted(c) and c["model_type"] == "ouro" and "head_dim" not in c
    assert c["layer_types"] == ["full_attention"] * 2 and c["tie_word_embeddings"] is False
    assert ouro.ouro_config(head_dim=16)["head_dim"] == 16
    for sizes, L, approx in ((ouro.OURO_1_4B, 24, 1.43e9), (ouro.OURO_2_6B, 48, 2.67e9)):
        d, I, V = 2048, 5632, 49152
        expected = 2 * V * d + L * (4 * d * d + 3 * I * d + 4 * d) + d + d + 1
        n = ouro.parameter_count(ouro.ouro_config(**sizes))
        assert n == expected and n == pytest.approx(approx, rel=0.005)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ouro_layouts_round_trip(tmp_path, layout):
    d = ouro.make_ouro_checkpoint(tmp_path, layout=layout, head_dim=16)
    cfg, sd = ouro.load_checkpoint(d)
    want = ouro.random_state_dict(cfg)
    assert set(sd) == set(want) and "lm_head.weight" in sd
    assert sd["model.layers.1.self_attn.q_proj.weight"].shape == (64, 32)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (32, 32)
    assert all(torch.equal(sd[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def ouro_ckpt(tmp_path_factory):
    return ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path_factory.mktemp("ouro"), seed=2))


def test_ouro_shapes_norms_and_truncation(ouro_ckpt):
    cfg, sd = ouro_ckpt
    out = ouro.reference_forward(ouro_ckpt, IDX, 6)
    assert len(out.states) == 7 and len(out.pre_norm_states) == 6 and len(out.logits_per_loop) == 6
    assert out.gate_probs.shape == (6, 2, 6) and out.exit_step.shape == (2, 6)
    w = sd["model.norm.weight"]
    for s, r in zip(out.states[1:], out.pre_norm_states):
        assert torch.allclose(_rms(s / w), torch.ones(2, 6), atol=1e-4)
        assert torch.allclose(s, rms_norm(r, w, 1e-6))
        assert (_rms(r) > 1.5 * _rms(s)).all()  # the residual stream grows; the norm hides it
    short = ouro.reference_forward(ouro_ckpt, IDX, 3)
    for t in range(3):
        assert torch.allclose(short.logits_per_loop[t], out.logits_per_loop[t], atol=1e-6)
        assert torch.allclose(short.gate_probs[t], out.gate_probs[t])
    assert (out.logits_per_loop[0] - out.logits_per_loop[5]).abs().max() > 1e-2
    assert torch.equal(ouro.reference_forward(ouro_ckpt, IDX, 6).logits, out.logits)
    # the gate reads h_t: λ_t = σ(w·h_t + b)
    g = out.states[3] @ sd["model.early_exit_gate.weight"][0] + sd["model.early_exit_gate.bias"]
    assert torch.allclose(out.gate_probs[2], torch.sigmoid(g), atol=1e-6)
    # weighted logits = Σ p_t logits_t; threshold 1.0 with unsaturated gates → last loop
    assert torch.allclose(out.weighted_logits,
                          sum(p[..., None] * l for p, l in zip(out.exit_probs, out.logits_per_loop)),
                          atol=1e-5)
    assert torch.allclose(out.exit_probs.sum(0), torch.ones(2, 6), atol=1e-6)


def test_ouro_closed_form_zero_layers(ouro_ckpt):
    """All projections zero: Stack(h) = h (N(0) = 0), so h_{t+1} = N_final(h_t)."""
    cfg, sd = ouro_ckpt
    sd = {k: (torch.zeros_like(v) if "proj" in k else v) for k, v in sd.items()}
    out = ouro.reference_forward((cfg, sd), IDX, 3)
    h, w = sd["model.embed_tokens.weight"][IDX], sd["model.norm.weight"]
    for t in range(3):
        h = rms_norm(h, w, 1e-6)
        assert torch.allclose(out.states[t + 1], h, atol=1e-6)
        assert torch.allclose(out.logits_per_loop[t], h @ sd["lm_head.weight"].T, atol=1e-5)


def test_ouro_gqa_equals_duplicated_mha(tmp_path):
    """KV heads repeated H/KV times (kv head j serves query heads j·rep … j·rep+rep−1)."""
    cfg, sd = ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path, seed=5, num_key_value_heads=2))
    cfg4 = dict(cfg, num_key_value_heads=4)
    sd4 = dict(sd)
    for i in range(2):
        for n in ("k_proj", "v_proj"):
            k = f"model.layers.{i}.self_attn.{n}.weight"
            sd4[k] = sd[k].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    a = ouro.reference_forward((cfg, sd), IDX, 2)
    b = ouro.reference_forward((cfg4, sd4), IDX, 2)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    sd4w = dict(sd4)  # the other grouping (repeat) must differ, so the test can fail
    for i in range(2):
        for n in ("k_proj", "v_proj"):
            k = f"model.layers.{i}.self_attn.{n}.weight"
            sd4w[k] = sd[k].view(2, 8, 32).repeat(2, 1, 1).reshape(32, 32)
    c = ouro.reference_forward((cfg4, sd4w), IDX, 2)
    assert not torch.allclose(a.logits, c.logits, atol=1e-3)


def test_ouro_rope_half_split():
    cfg = ouro.ouro_config(hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                           rope_theta=10000.0)  # hd = 4: pairs (0, 2) and (1, 3)
    cos, sin = ouro.rope_cos_sin(cfg, 3, torch.float32)
    assert torch.allclose(cos[2], torch.cos(torch.tensor([2.0, 0.02, 2.0, 0.02])), atol=1e-6)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0])
    y = x * cos[2] + ouro._rotate_half(x) * sin[2]
    assert torch.allclose(y, torch.tensor([math.cos(2), 0.0, math.sin(2), 0.0]), atol=1e-6)


def test_ouro_exit_distribution_closed_form():
    lam = torch.full((5, 3), 0.3, dtype=torch.float64)
    p = ouro.exit_distribution(lam)
    for t in range(4):
        assert torch.allclose(p[t], torch.full((3,), 0.3 * 0.7 ** t, dtype=torch.float64))
    assert torch.allclose(p[4], torch.full((3,), 0.7 ** 4, dtype=torch.float64))
    assert torch.allclose(p.sum(0), torch.ones(3, dtype=torch.float64))
    p = torch.tensor([[0.1, 0.6, 0.0], [0.5, 0.2, 0.1], [0.4, 0.2, 0.9]])
    assert ouro.threshold_exit_step(p, 0.55).tolist() == [1, 0, 2]
    assert ouro.threshold_exit_step(p, 2.0).tolist() == [2, 2, 2]


def test_ouro_saturating_gate_exits_early(tmp_path):
    """§8.2: confident gates make fp32 cumsum reach exactly 1.0 before the last loop."""
    cfg, sd = ouro.load_checkpoint(ouro.make_ouro_checkpoint(tmp_path, seed=6, gate_bias=8.0))
    out = ouro.reference_forward((cfg, sd), IDX, 6)
    assert (out.exit_step < 5).all()
    chosen = torch.stack(out.logits_per_loop)[out.exit_step, torch.arange(2)[:, None], torch.arange(6)]
    assert torch.allclose(out.threshold_logits, chosen)


def test_ouro_causal(ouro_ckpt):
    a = ouro.reference_forward(ouro_ckpt, IDX, 2).logits
    idx = IDX.clone()
    idx[:, 3] = 9
    b = ouro.reference_forward(ouro_ckpt, idx, 2).logits
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, 3:], b[:, 3:])
