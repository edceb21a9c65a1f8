"""Issue 11: the Huginn-0125 / Raven importer. Parity against the independent spec-only reference
(tests/huginn_reference.py) at every loop count 1…16, per-loop and pre-norm states, every
layout and variant the format allows; the official configuration on the meta device; bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loopdyn.models import CheckpointError, InputError, load, validate
from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM
from loopdyn.models.kernels import fast_paths
from loopdyn.models.protocol import initial_state, linear_part, state_norm_kind
from tests import huginn_reference as ref
from tests.helpers import rewrite_config

RTOL = 2e-5  # float32 round-off after 16 loops; loopdyn's fast path multiplies through oneDNN, the reference through MKL
LOOPS = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def tokens(B=2, S=11, V=128, seed=0):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def assert_parity(model, folder, idx, h0):
    """Logits at every loop count 0…LOOPS, states s_0…s_T and pre-norm states r_1…r_T."""
    out = ref.reference_forward(folder, idx, LOOPS, h0=h0)
    with torch.no_grad():
        states, ctx = model.unroll(idx, LOOPS, h0=h0)
        assert len(states) == LOOPS + 1
        for t, (s, s_ref) in enumerate(zip(states, out.states)):
            assert rel(s, s_ref) <= RTOL, f"state {t}"
        for t in range(LOOPS):
            assert rel(model.pre_norm_state(states[t], ctx), out.pre_norm_states[t]) <= RTOL, f"pre-norm {t + 1}"
            assert rel(model.renormalise(out.pre_norm_states[t], ctx), out.states[t + 1]) <= RTOL, f"renorm {t + 1}"
        for t, logits_ref in enumerate(out.logits_per_loop):
            assert rel(model.decode(states[t], ctx), logits_ref) <= RTOL, f"logits at {t} loops"
        for T in (1, 7, LOOPS):  # forward at an explicit loop count = the reference at that count
            logits = model(idx, n_loops=T, h0=h0).logits
            assert logits.dtype == torch.float32
            assert rel(logits, out.logits_per_loop[T]) <= RTOL, f"forward at {T} loops"


VARIANTS = {
    "tied-qkbias": {},
    "untied": dict(tie_embeddings=False),
    "adapter-bias": dict(bias=True),
    "no-qkbias": dict(qk_bias=False),
    "deeper": dict(n_layers_in_prelude=2, n_layers_in_recurrent_block=3, n_layers_in_coda=2, n_heads=2),
    "no-prelude": dict(n_layers_in_prelude=0, n_layers_in_coda=1),
    "hf-spelling": dict(spelling="hf", dtype_key="dtype"),
    "no-freqs": dict(include_freqs=False),
    "sharded": dict(layout="sharded", n_shards=3),
    "bin": dict(layout="bin"),
    "sharded-bin": dict(layout="sharded-bin"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_the_reference_at_every_loop_count(tmp_path, variant):
    folder = ref.make_huginn_checkpoint(tmp_path / variant, seed=len(variant), **VARIANTS[variant])
    model = load(folder)
    assert model.checkpoint_info.format == "huginn" and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    idx = tokens(seed=len(variant))
    zeros = torch.zeros(2, 11, model.config.n_embd)
    assert_parity(model, folder, idx, zeros)
    h0 = ref.official_random_state((2, 11, model.config.n_embd), model.config.n_embd, seed=5)
    assert_parity(model, folder, idx, h0)
    assert (model.lm_head.weight is model.wte.weight) == VARIANTS[variant].get("tie_embeddings", True)


def test_random_initial_state_is_the_official_draw_and_deterministic_given_a_generator(tmp_path):
    model = load(ref.make_huginn_checkpoint(tmp_path / "h", seed=2))
    ctx = model.encode(tokens())
    d = model.config.n_embd
    for seed in (0, 7):
        ours = model.init_state(ctx, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, ref.official_random_state((2, 11, d), d, seed=seed))
    # the std the spec quotes: √(2/5)·0.987 ≈ 0.624 (truncation at ±3σ)
    big = model.init_state(model.encode(tokens(B=8, S=32)), generator=torch.Generator().manual_seed(1))
    assert abs(float(big.std()) - math.sqrt(2 / 5) * 0.9866) < 0.02
    assert float(big.abs().max()) <= 3 * math.sqrt(2 / (5 * d)) * math.sqrt(d) + 1e-6
    # what analyses call: deterministic; no generator = seed 0
    assert torch.equal(initial_state(model, ctx, seed=3), initial_state(model, ctx, seed=3))
    assert torch.equal(model.init_state(ctx), model.init_state(ctx, generator=torch.Generator().manual_seed(0)))
    model.init_scale = 0.5
    assert torch.allclose(model.init_state(ctx, generator=torch.Generator().manual_seed(4)),
                          ref.official_random_state((2, 11, d), d, seed=4, init_scale=0.5))
    model.init_mode = "zero"
    assert torch.equal(model.init_state(ctx, generator=torch.Generator().manual_seed(4)), torch.zeros(2, 11, d))
    h0 = torch.randn(2, 11, d)
    given = model.init_state(ctx, h0=h0)
    assert torch.equal(given, h0) and given is not h0
    model.init_mode = "gaussian"
    with pytest.raises(InputError, match="init_mode"):
        model.init_state(ctx)
    with pytest.raises(InputError, match="h0 must be"):
        model.forward(tokens(), n_loops=2, h0=torch.zeros(2, 11, d + 1))


def test_bfloat16_weights_load_in_float32_and_compute_in_bfloat16_on_request(tmp_path):
    folder = ref.make_huginn_checkpoint(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    idx, h0 = tokens(), torch.zeros(2, 11, 32)
    model = load(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any("bfloat16" in n for n in model.checkpoint_info.notes)
    assert_parity(model, folder, idx, h0)  # the reference also upcasts the bf16 weights
    low = load(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    with torch.no_grad():
        out = ref.reference_forward(folder, idx, 4, h0=h0, dtype=torch.bfloat16)
        with fast_paths(False):  # PyTorch's own bf16 kernels, as the reference
            states, ctx = low.unroll(idx, 4, h0=h0)
            assert states[-1].dtype == torch.bfloat16
            for t in range(5):
                assert rel(low.decode(states[t], ctx), out.logits_per_loop[t]) <= RTOL  # the same bf16 casts
        # the fast path (on a CPU without bf16 kernels: float32 products rounded once to bf16,
        # models/precision.py) differs only by the accumulation order: within bf16 round-off
        states, ctx = low.unroll(idx, 4, h0=h0)
        for t in range(5):
            assert rel(low.decode(states[t], ctx), out.logits_per_loop[t]) <= 2.0 ** -8
        # and bf16 is a different computation from float32 (the option does something)
        assert rel(low.decode(states[-1], ctx), model(idx, n_loops=4, h0=h0).logits) > 1e-4


def test_protocol_members(tmp_path):
    model = load(ref.make_huginn_checkpoint(tmp_path / "h", seed=4, bias=True))
    idx = tokens()
    validate(model, idx)
    assert state_norm_kind(model) == "post" and model.mean_loops == 4
    part = linear_part(model)
    W = model.adapter.weight.detach()
    assert torch.equal(part.A.dense(), W[:, :32]) and torch.equal(part.B.dense(), W[:, 32:])
    with torch.no_grad():
        ctx = model.encode(idx)
        h = torch.randn(2, 11, 32)
        # the affine map the operators describe is the adapter's output u = Ā h + B̄ e + b
        u = part.A.apply(h) + part.B.apply(ctx.e) + part.bias
        assert torch.allclose(u, model.inject(h, ctx), atol=1e-5)
        # step = N₄(pre-norm state): every new state is RMS-normalised with the last N₄ gain
        r = model.pre_norm_state(h, ctx)
        s = model.step(h, ctx)
        g = model.core[-1].norm_4.weight
        assert torch.allclose(s, g * r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-5)
        # composing the sublayers reproduces the step
        x = h
        for sub in model.sublayers(ctx):
            x = x + sub.fn(x) if sub.kind == "residual" else sub.fn(x)
        assert torch.allclose(x, s, atol=1e-6)
        # the state tap sees h_0 and every new state
        seen = []
        hook = model.state_tap.register_forward_hook(lambda m, i, o: seen.append(o))
        model(idx, n_loops=3)
        hook.remove()
        assert len(seen) == 4


def test_the_official_configuration_builds_on_meta_with_the_published_parameter_count():
    cfg = HuginnConfig.huginn_0125()
    with torch.device("meta"):
        model = HuginnLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = model.num_params()
    # closed form from the spec's §2 table (wte + 8 blocks + adapter + ln_f), and the reference's count
    d, I, V = 5280, 17920, 65536
    block = 3 * d * d + 2 * 55 * 96 + d * d + 2 * I * d + d * I + 4 * d
    assert n == V * d + 8 * block + d * 2 * d + d == 3_564_976_800
    assert n == ref.parameter_count(ref.HUGINN_0125)
    assert round(n / 1e9, 2) == 3.56  # "346M + 8 × 395.4M + 55.8M ≈ 3.56B"
    assert model.mean_loops == 32 and model.config.head_dim == 96
    assert linear_part(model).A.shape == (d, d)


# ---- bad input: one line each ---------------------------------------------------------------------

def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_raven_config_with_a_missing_key(tmp_path):
    folder = ref.make_huginn_checkpoint(tmp_path / "h")
    rewrite_config(folder, drop=("n_layers_in_coda",))
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "missing config field n_layers_in_coda" in one_line(err)


@pytest.mark.parametrize("field, value, words", [
    ("n_embd", "32", "n_embd must be an integer"),
    ("qk_bias", 1, "qk_bias must be true or false"),
    ("rope_base", "big", "rope_base must be a finite number"),
    ("num_key_value_heads", 2, "num_key_value_heads = 2 ≠ n_heads = 4"),
    ("test_time_noise", 0.1, "test_time_noise"),
    ("tie_word_embeddings", False, "contradicts tie_embeddings"),
    ("torch_dtype", "int8", "torch_dtype must be"),
])
def test_config_fields_are_type_checked(tmp_path, field, value, words):
    folder = ref.make_huginn_checkpoint(tmp_path / "h")
    rewrite_config(folder, {field: value})
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert words in one_line(err)


def test_wrong_layer_count_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = ref.make_huginn_checkpoint(tmp_path / "h", n_layers_in_recurrent_block=3)
    rewrite_config(folder, {"n_layers_in_recurrent_block": 4})
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "weights hold 3 layer(s) (transformer.core_block.0…2)" in one_line(err)
    assert "n_layers_in_recurrent_block = 4" in one_line(err)

    folder = ref.make_huginn_checkpoint(tmp_path / "k")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("transformer.adapter.weight")
    state["transformer.extra.weight"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "missing 1 key(s) (transformer.adapter.weight)" in one_line(err)
    assert "unexpected 1 key(s) (transformer.extra.weight)" in one_line(err)


def test_mixed_format_folders(tmp_path):
    folder = ref.make_huginn_checkpoint(tmp_path / "h")
    ref.make_huginn_checkpoint(tmp_path / "h", layout="bin")  # the same folder, a second layout
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "mixed weight formats (model.safetensors and pytorch_model.bin)" in one_line(err)

    from tests import ouro_reference
    mixed = tmp_path / "m"
    ouro_reference.make_ouro_checkpoint(mixed)
    raw = ref.raven_config()
    (mixed / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load(mixed)
    assert "Ouro/Llama layout (model.layers.*) but config.json is a Raven config" in one_line(err)


def test_broken_shard_index(tmp_path):
    folder = ref.make_huginn_checkpoint(tmp_path / "h", layout="sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00002-of-00002.safetensors"  # listed under the wrong shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "which is listed under model-00002-of-00002.safetensors" in one_line(err)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "shard model-00002-of-00002.safetensors is missing" in one_line(err)


def test_training_checkpoint_prefix_and_tied_duplicate(tmp_path):
    folder = ref.make_huginn_checkpoint(tmp_path / "h", layout="bin", seed=6)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # a tied duplicate is accepted
    torch.save({"model": {ref_key(k): v for k, v in state.items()}}, folder / "pytorch_model.bin")
    model = load(folder)
    idx, h0 = tokens(), torch.zeros(2, 11, 32)
    out = ref.reference_forward((json.loads((folder / "config.json").read_text()), state), idx, 3, h0=h0)
    with torch.no_grad():
        assert rel(model(idx, n_loops=3, h0=h0).logits, out.logits) <= RTOL
    state["lm_head.weight"] += 1.0
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "lm_head.weight differs from transformer.wte.weight" in one_line(err)


def ref_key(k: str) -> str:
    return "_orig_mod._original_module." + k


def test_bad_calls(tmp_path):
    folder = ref.make_huginn_checkpoint(tmp_path / "h")
    model = load(folder)
    with torch.no_grad():  # the folder, its config.json or its weights file name the checkpoint
        for path in (folder / "config.json", folder / "model.safetensors"):
            assert torch.equal(load(path)(tokens(), n_loops=2).logits, model(tokens(), n_loops=2).logits)
    with pytest.raises(InputError, match="n_loops must be a non-negative integer"):
        model(tokens(), n_loops=-1)
    with pytest.raises(InputError, match="token ids must lie in"):
        model(tokens() + 200, n_loops=1)
    with pytest.raises(InputError, match="longer than the model supports"):
        model(tokens(S=40), n_loops=1)
