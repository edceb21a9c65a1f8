"""Self-checks of tests/parcae_reference.py against the spec
(/work/shared/reference/parcae-checkpoint-format.md). Independent of our library."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests import parcae_reference as ref

SMALL = ref.OFFICIAL_PARCAE_SIZES["parcae-small-140m"]


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny matmuls are far faster single-threaded, especially on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- configs (§1.1)

SPEC_PARCAE_KEY_ORDER = """name, hf_config, block_size, n_embd, intermediate_size, num_attention_heads,
num_key_value_heads, vocab_size, padding_multiple, padded_vocab_size, rope_settings,
use_abacus, randomize_positions_from, block_class_name, norm_class_name, attn_impl, norm_eps,
mlp_class_name, nonlin_name, bias, qk_bias, init_strategy, init_orthogonal,
skip_initialization, mup_model_scaling_factor, use_fused_head, debias_attention,
center_attention, clip_qkv, qk_norm, logit_softcap, activation_checkpoint_impl, simple_ops,
strategy, injection_type, n_layers_in_recurrent_block, n_layers_in_prelude,
n_layers_in_coda, state_init, recurrent_embedding_dimension,
recurrent_intermediation_embedding_dimension, recurrent_num_attention_heads, prelude_norm,
sampling_scheme, mean_recurrence, mean_backprop_depth, lockstep_n, lockstep_k,
curriculum_target, recurrent_iteration_method, tie_embeddings, model_class_name,
_is_recurrent_block_config, _class_name"""


def test_parcae_config_key_order_and_defaults():
    cfg = ref.official_parcae_config()
    assert list(cfg) == [k.strip() for k in SPEC_PARCAE_KEY_ORDER.split(",")]
    assert cfg["_class_name"] == "ParcaeConfig"
    assert cfg["padded_vocab_size"] == 128 and cfg["vocab_size"] == 96
    assert cfg["rope_settings"] == {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000}
    assert cfg["recurrent_embedding_dimension"] == 64
    assert cfg["recurrent_intermediation_embedding_dimension"] == 256
    assert cfg["recurrent_num_attention_heads"] is None
    assert cfg["state_init"] == "zero" and cfg["injection_type"] == "diagonal"
    json.dumps(cfg)  # JSON-serialisable


def test_config_overrides():
    cfg = ref.official_parcae_config(n_embd=128, vocab_size=200, rope_settings={"rope_base": 10000})
    assert cfg["padded_vocab_size"] == 256
    assert cfg["recurrent_embedding_dimension"] == 128
    assert cfg["rope_settings"] == {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 10000}
    with pytest.raises(KeyError):
        ref.official_parcae_config(not_a_key=1)


def test_gpt_config_keys():
    cfg = ref.official_gpt_config()
    assert cfg["_class_name"] == "GPTConfig" and list(cfg)[-1] == "_class_name"
    assert "n_layer" in cfg and "tie_embeddings" in cfg
    for parcae_only in ("injection_type", "mean_recurrence", "prelude_norm", "state_init",
                        "recurrent_embedding_dimension", "n_layers_in_coda"):
        assert parcae_only not in cfg
    assert cfg["use_fused_head"] == "pytorch"


# ------------------------------------------------------------------- key sets and counts (§3)

@pytest.mark.parametrize("name,keys,params", [
    ("parcae-small-140m", 63, 144_323_136),
    ("parcae-medium-370m", 117, 388_003_328),
    ("parcae-large-770m", 171, 776_655_680),
    ("parcae-xlarge-1_3b", 225, 1_338_591_744),
])
def test_official_key_and_parameter_counts(name, keys, params):
    cfg = ref.official_parcae_config(**ref.OFFICIAL_PARCAE_SIZES[name])
    assert len(ref.state_dict_shapes(cfg)) == keys
    assert ref.unique_parameter_count(cfg) == params


def test_small_worked_example():
    cfg = ref.official_parcae_config(**SMALL)
    shapes = ref.state_dict_shapes(cfg)
    keys = list(shapes)
    assert keys[0] == "freqs_cis" and keys[1] == "transformer.wte.weight"
    assert keys[-1] == "lm_head.weight"
    assert shapes["freqs_cis"] == (1, 2048, 1, 64, 2)
    gates = [k for k in keys if "ve_gate" in k]
    assert gates == ["transformer.prelude.1.attn.ve_gate.weight",
                     "transformer.core_block.1.attn.ve_gate.weight",
                     "transformer.coda.1.attn.ve_gate.weight"]
    assert all(shapes[g] == (6, 32) for g in gates)
    assert [k for k in keys if k.startswith("value_embeds")] == [
        f"value_embeds.{k}.weight" for k in (1, 3, 5)]
    assert shapes["value_embeds.1.weight"] == (32768, 768)
    assert shapes["transformer.adapter.B"] == (768, 768)
    assert shapes["transformer.C.weight"] == (768, 768)
    assert keys.index("transformer.ln_prelude.weight") == keys.index("transformer.ln_f.weight") + 1
    dv = ref.derived(cfg)
    assert dv.L == 8 and dv.N == 6 and dv.V == 32768 and dv.hd == 128
    assert dv.gate_layer_ids == (1, 3, 19)
    assert [(b.prefix, b.table_key) for b in dv.blocks if b.live] == [
        ("transformer.prelude.1.", 1), ("transformer.core_block.1.", 3), ("transformer.coda.1.", 5)]


def test_odd_layer_example():
    cfg = ref.official_parcae_config(n_layers_in_prelude=2, n_layers_in_recurrent_block=1,
                                     n_layers_in_coda=2, mean_recurrence=8, mean_backprop_depth=4)
    dv = ref.derived(cfg)
    assert dv.value_embed_keys == (0, 2, 4)
    coda_ids = [b.layer_id for b in dv.blocks if b.stage == "coda"]
    assert coda_ids == [10, 11]
    assert [b.prefix for b in dv.blocks if b.live] == ["transformer.coda.1."]
    assert [b.prefix for b in dv.blocks if b.has_gate] == [
        "transformer.prelude.1.", "transformer.coda.1."]


def test_gpt_key_set():
    cfg = ref.official_gpt_config(n_layer=3)
    keys = list(ref.state_dict_shapes(cfg))
    assert keys[:2] == ["freqs_cis", "transformer.wte.weight"]
    assert any(k.startswith("transformer.h.2.") for k in keys)
    assert [k for k in keys if "ve_gate" in k] == [
        "transformer.h.0.attn.ve_gate.weight", "transformer.h.2.attn.ve_gate.weight"]
    assert [k for k in keys if k.startswith("value_embeds")] == [
        "value_embeds.0.weight", "value_embeds.2.weight"]
    assert keys[-3:] == ["value_embeds.0.weight", "value_embeds.2.weight", "lm_head.weight"]
    assert not any("adapter" in k or "ln_prelude" in k for k in keys)
    assert ref.state_dict_shapes(ref.official_gpt_config(tie_embeddings=False))[
        "lm_head.weight"] == (64, 128)  # Triton head for non-empty use_fused_head (§7.3)
    assert ref.state_dict_shapes(ref.official_gpt_config(tie_embeddings=False, use_fused_head=""))[
        "lm_head.weight"] == (128, 64)


VARIANTS = {
    "default": {},
    "linear_bias_untied": dict(injection_type="linear", bias=True, tie_embeddings=False),
    "add_qkbias": dict(injection_type="add", qk_bias=True),
    "gqa_ds": dict(num_key_value_heads=2, recurrent_embedding_dimension=32,
                   recurrent_num_attention_heads=2, recurrent_intermediation_embedding_dimension=96),
    "layernorm_gated": dict(norm_class_name="LayerNorm", mlp_class_name="GatedMLP",
                            nonlin_name="GELU", logit_softcap=3.0),
    "odd_linear_ds": dict(n_layers_in_prelude=2, n_layers_in_recurrent_block=1,
                          n_layers_in_coda=2, mean_recurrence=8, mean_backprop_depth=4,
                          injection_type="linear", recurrent_embedding_dimension=48,
                          recurrent_num_attention_heads=3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_state_dict_matches_shapes_and_forward_runs(variant):
    cfg = ref.official_parcae_config(**VARIANTS[variant])
    shapes = ref.state_dict_shapes(cfg)
    sd = ref.random_official_state_dict(cfg, seed=1)
    assert list(sd) == list(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(shapes)
    assert all(v.dtype == torch.float32 for v in sd.values())
    for k, v in sd.items():
        if k != "freqs_cis":
            assert v.abs().sum() > 0, k  # everything randomised, incl. output projections
    if cfg["tie_embeddings"]:
        assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    else:
        assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    logits = ref.official_forward(cfg, sd, ids, 3)
    assert logits.shape == (2, 12, 128) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    if cfg["logit_softcap"]:
        assert logits.abs().max() < cfg["logit_softcap"]


def test_variant_specific_keys():
    s = ref.state_dict_shapes(ref.official_parcae_config(**VARIANTS["linear_bias_untied"]))
    assert s["transformer.adapter.adapter.weight"] == (64, 128)
    assert "transformer.adapter.adapter.bias" in s and "transformer.C.bias" in s
    assert "transformer.prelude.0.attn.c_q.bias" in s and "transformer.coda.1.mlp.proj.bias" in s
    assert not any(k.endswith("ve_gate.bias") for k in s)
    s = ref.state_dict_shapes(ref.official_parcae_config(**VARIANTS["add_qkbias"]))
    assert not any("adapter" in k for k in s)
    assert s["transformer.prelude.0.attn.qk_bias"] == (2, 1, 4, 16)
    s = ref.state_dict_shapes(ref.official_parcae_config(**VARIANTS["gqa_ds"]))
    assert s["transformer.prelude.0.attn.c_k.weight"] == (32, 64)
    assert s["transformer.core_block.0.attn.c_k.weight"] == (32, 32)  # core kv heads = Hs
    assert s["transformer.core_block.1.attn.ve_gate.weight"] == (2, 32)
    assert s["transformer.core_block.0.mlp.fc.weight"] == (96, 32)
    assert s["transformer.adapter.B"] == (32, 64) and s["transformer.C.weight"] == (64, 32)
    assert s["value_embeds.1.weight"] == (128, 32)
    s = ref.state_dict_shapes(ref.official_parcae_config(**VARIANTS["layernorm_gated"]))
    assert s["transformer.prelude.0.norm_1.bias"] == (64,)
    assert s["transformer.prelude.0.mlp.fc.weight"] == (512, 64)
    assert "transformer.ln_f.bias" not in s  # ln_f / ln_prelude are RMSNorms (§3, §4.7)


def test_gpt_forward():
    for overrides in ({}, dict(tie_embeddings=False), dict(num_key_value_heads=2)):
        cfg = ref.official_gpt_config(**overrides)
        sd = ref.random_official_state_dict(cfg)
        ids = torch.randint(0, 96, (2, 10))
        logits = ref.official_forward(cfg, sd, ids)
        assert logits.shape == (2, 10, 128) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- forward (§4)

def _ids(B=2, T=12, seed=0, vocab=96):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [ref.official_parcae_config(),
                                 ref.official_parcae_config(**VARIANTS["gqa_ds"]),
                                 ref.official_gpt_config()])
def test_causality(cfg):
    sd = ref.random_official_state_dict(cfg)
    ids = _ids()
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 5) % 96
    a = ref.official_forward(cfg, sd, ids, 4)
    b = ref.official_forward(cfg, sd, ids2, 4)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_loop_count_and_h0_matter():
    cfg = ref.official_parcae_config()
    sd = ref.random_official_state_dict(cfg)
    ids = _ids()
    l1, l2 = ref.official_forward(cfg, sd, ids, 1), ref.official_forward(cfg, sd, ids, 2)
    assert not torch.allclose(l1, l2)
    h0 = torch.randn(2, 12, 64)
    assert not torch.allclose(l1, ref.official_forward(cfg, sd, ids, 1, h0=h0))
    assert torch.equal(l1, ref.official_forward(cfg, sd, ids, 1, h0=torch.zeros(2, 12, 64)))
    with pytest.raises(ValueError):
        ref.official_forward(cfg, sd, ids, 0)


def test_rope_table_matches_formula():
    cfg = ref.official_parcae_config(rope_settings={"rope_base": 10000})
    sd = ref.random_official_state_dict(cfg)
    f = sd["freqs_cis"]
    hd, Tmax = 16, 64
    assert f.shape == (1, Tmax, 1, hd // 2, 2) and f.dtype == torch.float32
    for t in (0, 1, 5, 63):
        for j in range(hd // 2):
            angle = t * (1.0 / 10000 ** (2 * j / hd))
            assert math.isclose(f[0, t, 0, j, 0].item(), math.cos(angle), abs_tol=2e-6)
            assert math.isclose(f[0, t, 0, j, 1].item(), math.sin(angle), abs_tol=2e-6)
    assert torch.equal(f[0, 0, 0, :, 0], torch.ones(hd // 2))


def test_apply_rope_is_interleaved_complex_multiplication():
    x = torch.randn(2, 5, 3, 16)
    f = ref.rope_table(16, 5)
    out = ref.apply_rope(x, f)
    xc = torch.view_as_complex(x.reshape(2, 5, 3, 8, 2).contiguous())
    fc = torch.view_as_complex(f.contiguous())  # (1, 5, 1, 8)
    expected = torch.view_as_real(xc * fc).flatten(-2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_rms_norm_formula():
    x, w = torch.randn(3, 7, 32), torch.randn(32)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5), expected)


def test_linear_injection_state_first():
    cfg = ref.official_parcae_config(injection_type="linear", recurrent_embedding_dimension=48,
                                     recurrent_num_attention_heads=3,
                                     n_layers_in_prelude=1, n_layers_in_recurrent_block=1,
                                     n_layers_in_coda=1)
    sd = ref.random_official_state_dict(cfg)
    ids = _ids(T=8)
    h0 = torch.randn(2, 8, 48)
    base = ref.official_forward(cfg, sd, ids, 1)
    assert not torch.allclose(base, ref.official_forward(cfg, sd, ids, 1, h0=h0))
    sd0 = dict(sd)
    w = sd["transformer.adapter.adapter.weight"].clone()
    w[:, :48] = 0  # the state block is the first ds columns
    sd0["transformer.adapter.adapter.weight"] = w
    assert torch.equal(ref.official_forward(cfg, sd0, ids, 1),
                       ref.official_forward(cfg, sd0, ids, 1, h0=h0))


def test_diagonal_injection_formula():
    cfg = ref.official_parcae_config()
    sd = ref.random_official_state_dict(cfg)
    h, e = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    out = ref.inject(cfg, sd, h, e)
    delta = torch.log1p(torch.exp(sd["transformer.adapter.dt_bias"]))
    a_bar = torch.exp(-delta * torch.exp(sd["transformer.adapter.A_log"]))
    torch.testing.assert_close(out, a_bar * h + delta * (e @ sd["transformer.adapter.B"].T))
    torch.testing.assert_close(ref.inject(dict(cfg, injection_type="add"), {}, h, e), h + e)


def test_value_embedding_liveness():
    cfg = ref.official_parcae_config(**VARIANTS["odd_linear_ds"])  # tables {0,2,4}, coda.1 live
    sd = ref.random_official_state_dict(cfg)
    ids = _ids()
    base = ref.official_forward(cfg, sd, ids, 2)
    for key, live in (("value_embeds.0.weight", False), ("value_embeds.2.weight", False),
                      ("value_embeds.4.weight", True),
                      ("transformer.prelude.1.attn.ve_gate.weight", False),
                      ("transformer.coda.1.attn.ve_gate.weight", True)):
        sd2 = dict(sd)
        sd2[key] = sd[key] + 1.0
        changed = not torch.equal(base, ref.official_forward(cfg, sd2, ids, 2))
        assert changed == live, key


def test_gqa_equals_mha_with_repeated_kv_heads():
    """§4.3 step 7: query head i uses kv head floor(i / (h/hk)) (repeat-interleave)."""
    layers = dict(n_layers_in_prelude=2, n_layers_in_recurrent_block=1, n_layers_in_coda=2)
    gqa = ref.official_parcae_config(num_key_value_heads=2, **layers)
    mha = ref.official_parcae_config(num_key_value_heads=4, **layers)
    sd = ref.random_official_state_dict(gqa)
    s = 16

    def expand(t):  # (2*s, ...) rows or (V, 2*s) columns -> 4 heads
        return t.reshape(2, s, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * s,
                                                                                 *t.shape[1:])

    sd_mha = {}
    for k, v in sd.items():
        outer = not k.startswith("transformer.core_block")
        if outer and (k.endswith("attn.c_k.weight") or k.endswith("attn.c_v.weight")):
            v = expand(v)
        elif outer and k.endswith("ve_gate.weight"):
            v = v.repeat_interleave(2, dim=0)
        elif k.startswith("value_embeds"):
            v = expand(v.T).T
        sd_mha[k] = v
    ids = _ids()
    torch.testing.assert_close(ref.official_forward(gqa, sd, ids, 3),
                               ref.official_forward(mha, sd_mha, ids, 3), rtol=1e-5, atol=1e-5)


def test_strict_state_dict_check():
    cfg = ref.official_parcae_config()
    sd = ref.random_official_state_dict(cfg)
    ids = _ids()
    bad = dict(sd)
    bad.pop("transformer.coda.1.attn.ve_gate.weight")
    with pytest.raises(KeyError):
        ref.official_forward(cfg, bad, ids, 1)
    one = dict(sd)
    one.pop("lm_head.weight")  # tied: one key is enough
    torch.testing.assert_close(ref.official_forward(cfg, one, ids, 1),
                               ref.official_forward(cfg, sd, ids, 1))


def test_scales():
    dv = ref.derived(ref.official_parcae_config())
    assert dv.emb_scale == 1 and dv.logit_scale == 1
    dv = ref.derived(ref.official_parcae_config(init_strategy="takase-scaled"))
    assert dv.emb_scale == 8 and math.isclose(dv.logit_scale, math.sqrt(0.4) / 8)
    dv = ref.derived(ref.official_parcae_config(init_strategy="shaped"))
    assert dv.emb_scale == 1 and dv.logit_scale == 1 / 8


# --------------------------------------------------------------------- writing (§1.1)

@pytest.mark.parametrize("weights_name,prefix", [("model.pt", ""), ("pytorch_model.bin", "module."),
                                                 ("model.pt", "_orig_mod.")])
def test_write_official_checkpoint(tmp_path, weights_name, prefix):
    cfg = ref.official_parcae_config()
    sd = ref.random_official_state_dict(cfg)
    out = ref.write_official_checkpoint(tmp_path / "ckpt", cfg, sd, weights_name=weights_name,
                                        key_prefix=prefix)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", weights_name])
    text = (out / "config.json").read_text()
    assert text == json.dumps(cfg, indent=2)
    assert list(json.loads(text)) == list(cfg)
    loaded = torch.load(out / weights_name, weights_only=True)
    assert list(loaded) == [prefix + k for k in sd]
    wte, head = loaded[prefix + "transformer.wte.weight"], loaded[prefix + "lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    stripped = {k[len(prefix):]: v for k, v in loaded.items()}
    torch.testing.assert_close(ref.official_forward(cfg, stripped, _ids(), 2),
                               ref.official_forward(cfg, sd, _ids(), 2), rtol=0, atol=0)


def test_write_safetensors_and_wrapped(tmp_path):
    from safetensors.torch import load_file

    cfg = ref.official_parcae_config()
    sd = ref.random_official_state_dict(cfg)
    ref.write_official_checkpoint(tmp_path / "a", cfg, sd, weights_name="model.safetensors",
                                  include_class_name=False)
    assert "_class_name" not in json.loads((tmp_path / "a" / "config.json").read_text())
    assert set(load_file(tmp_path / "a" / "model.safetensors")) == set(sd)
    ref.write_official_checkpoint(tmp_path / "b", cfg, sd, wrap_in="model")
    assert set(torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]) == set(sd)
