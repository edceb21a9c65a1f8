"""Issue 15 (scale): every loader builds its model on the meta device and streams the weights
into it one tensor at a time (models/weights.py). Ground truth is the plain path, written here
independently of models/weights.py: read the whole file (safetensors `load_file`, `torch.load`,
tests/hf_layout_reference.py), build the module normally (random init) and `load_state_dict`.
The streamed model must equal it exactly (every parameter and buffer, and the logits), bf16
files must give the float32 cast of the stored bf16 tensors, tied weights must stay one
Parameter, mismatches must stay one line naming the key, and no random init may run."""
from __future__ import annotations

import math
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loopdyn.models.weights as weights
from loopdyn.models import CheckpointError, InputError, LoopedLM, load, save
from loopdyn.models.importers.parcae import official_config_to_loop_config, official_state_dict_shapes
from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM
from loopdyn.models.layers import rope_table
from loopdyn.models.importers.ouro import OuroLM
from tests import huginn_reference as href
from tests import ouro_reference as oref
from tests import parcae_reference as pref
from tests.hf_layout_reference import read_weights
from tests.test_models import make_model, tokens


def assert_same(streamed: nn.Module, plain: nn.Module, idx: torch.Tensor, **forward) -> None:
    """Bit-identical parameters (names, dtypes, values), buffers and logits."""
    ps, pp = dict(streamed.named_parameters()), dict(plain.named_parameters())
    assert ps.keys() == pp.keys()
    for name in ps:
        assert ps[name].dtype == pp[name].dtype == torch.float32, name
        assert torch.equal(ps[name], pp[name]), name
        assert not ps[name].is_meta and ps[name].is_contiguous(), name
    bs, bp = dict(streamed.named_buffers()), dict(plain.named_buffers())
    assert bs.keys() == bp.keys()
    for name in bs:
        assert torch.equal(bs[name], bp[name]), name
    with torch.no_grad():
        assert torch.equal(streamed(idx, **forward).logits, plain.eval()(idx, **forward).logits)


def assert_tied(model: nn.Module, head: nn.Parameter, embedding: nn.Parameter) -> None:
    assert head is embedding
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(list(model.parameters())) + 1  # one Parameter under two names
    with torch.no_grad():
        embedding[0, 0] += 1.0
    assert head[0, 0] == embedding[0, 0]


# ---- loopdyn's own format ----------------------------------------------------------------------

@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_own_format_streams_to_the_plain_load(tmp_path, stored, tied):
    model = make_model(seed=5, injection="linear", tie_embeddings=tied, bias=not tied).to(stored)
    path = save(model, tmp_path / "ckpt")
    streamed = load(path)
    plain = LoopedLM(model.config)  # random init, then the whole file at once
    file = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    plain.load_state_dict(file, strict=not tied)
    assert_same(streamed, plain, tokens(B=2, S=9, seed=2), n_loops=5)
    for name, p in model.state_dict().items():  # bf16 → the float32 cast of the stored bf16
        assert torch.equal(streamed.state_dict()[name], p.float()), name
    assert torch.equal(streamed.rope, rope_table(model.config.block_size, model.config.head_dim,
                                                 model.config.rope_base))
    if tied:
        assert_tied(streamed, streamed.lm_head.weight, streamed.wte.weight)
    else:
        assert streamed.lm_head.weight is not streamed.wte.weight


# ---- official Parcae ---------------------------------------------------------------------------

@pytest.mark.parametrize("weights_name", ["model.pt", "model.safetensors"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["tied", "untied-triton"])
def test_official_parcae_streams_to_the_plain_load(tmp_path, weights_name, stored, variant):
    cfg = (pref.official_parcae_config(injection_type="linear") if variant == "tied"
           else pref.official_parcae_config(tie_embeddings=False, use_fused_head="full-triton"))
    sd = {k: v.to(stored) for k, v in pref.random_official_state_dict(cfg, seed=9).items()}
    if variant == "tied":
        sd["lm_head.weight"] = sd["transformer.wte.weight"]  # shared storage, as torch.save keeps it
    pref.write_official_checkpoint(tmp_path, cfg, sd, weights_name=weights_name)
    streamed = load(tmp_path)
    plain = LoopedLM(official_config_to_loop_config(cfg))
    _, to_ours = official_state_dict_shapes(plain)
    ours = {to_ours[k]: v.float() for k, v in sd.items() if k in to_ours}
    if variant != "tied":
        ours["lm_head.weight"] = sd["lm_head.weight"].float().T  # the Triton head is stored (d, V)
        assert streamed.lm_head.weight.shape == (plain.config.vocab_size, plain.config.d_model)
    plain.load_state_dict(ours, strict=True)
    plain.rope.copy_(sd["freqs_cis"].float()[0, :, 0])
    assert_same(streamed, plain, tokens(B=2, S=12, seed=3, vocab=cfg["vocab_size"]), n_loops=3)
    if variant == "tied":
        assert_tied(streamed, streamed.lm_head.weight, streamed.wte.weight)


# ---- Huginn-0125 / Raven -----------------------------------------------------------------------

def huginn_plain_state(file: dict, cfg: HuginnConfig) -> dict[str, torch.Tensor]:
    """The official Raven keys → HuginnLM names, written out here (spec §2: Wqkv rows are
    q, k, v; our norm_2/norm_3 are the official norm_3/norm_2), every tensor cast to float32."""
    d, out = cfg.n_embd, {}
    for key, value in file.items():
        value = value.float()
        if key == "freqs_cis" or (key == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if key.startswith("transformer."):
            key = key[len("transformer."):].replace("core_block.", "core.")
            for theirs, mine in (("norm_2", "@3"), ("norm_3", "@2")):
                key = key.replace(theirs, mine)
            key = key.replace("@", "norm_")
        if key.endswith("attn.Wqkv.weight"):
            for j, part in enumerate(("c_q", "c_k", "c_v")):
                out[key.replace("Wqkv", part)] = value[j * d:(j + 1) * d]
            continue
        out[key.replace("attn.proj", "attn.c_proj")] = value
    return out


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_huginn_streams_to_the_plain_load(tmp_path, layout, stored, tied):
    folder = href.make_huginn_checkpoint(tmp_path / "raven", seed=4, dtype=stored, layout=layout,
                                         tie_embeddings=tied)
    streamed = load(folder)
    cfg = streamed.config
    file = read_weights(folder)
    plain = HuginnLM(cfg)
    plain.load_state_dict(huginn_plain_state(file, cfg), strict=not tied)  # a tied head is the embedding
    plain.rope = file["freqs_cis"].float()[0, :, 0]
    streamed.init_mode = plain.init_mode = "zero"
    assert_same(streamed, plain, tokens(B=2, S=7, seed=5, vocab=cfg.vocab_size), n_loops=3)
    assert torch.equal(streamed.adapter.weight, file["transformer.adapter.weight"].float())
    if tied:
        assert_tied(streamed, streamed.lm_head.weight, streamed.wte.weight)
    else:
        assert torch.equal(streamed.lm_head.weight, file["lm_head.weight"].float())


# ---- Ouro --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["safetensors", "sharded-bin"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_ouro_streams_to_the_plain_load(tmp_path, layout, stored, tied):
    folder = oref.make_ouro_checkpoint(tmp_path / "ouro", seed=6, dtype=stored, layout=layout,
                                       tie_word_embeddings=tied)
    streamed = load(folder)
    file = read_weights(folder)
    plain = OuroLM(streamed.config)
    ours = {k: v.float() for k, v in file.items() if not (tied and k == "lm_head.weight")}
    ours.pop("model.rotary_emb.inv_freq", None)
    plain.load_state_dict(ours, strict=not tied)  # a tied head is the embedding
    for name, value in ours.items():  # bf16 → the float32 cast of the stored bf16
        assert torch.equal(streamed.state_dict()[name], value), name
    assert_same(streamed, plain, tokens(B=2, S=7, seed=7, vocab=streamed.config.vocab_size), n_loops=2)
    if tied:
        assert_tied(streamed, streamed.lm_head.weight, streamed.model.embed_tokens.weight)


# ---- no random init, one stored tensor at a time -------------------------------------------------

INIT_FUNCTIONS = ("orthogonal_", "normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_")


def count_real_inits(monkeypatch) -> list[str]:
    """Record every torch.nn.init call that draws into a real (non-meta) tensor."""
    calls: list[str] = []
    for name in INIT_FUNCTIONS:
        real = getattr(nn.init, name)

        def spy(tensor, *args, _real=real, _name=name, **kwargs):
            if not tensor.is_meta:
                calls.append(_name)
            return _real(tensor, *args, **kwargs)
        monkeypatch.setattr(nn.init, name, spy)
    return calls


def test_loading_runs_no_random_init(tmp_path, monkeypatch):
    path = save(make_model(seed=1, tie_embeddings=False), tmp_path / "own")
    official = tmp_path / "official"
    cfg = pref.official_parcae_config()
    pref.write_official_checkpoint(official, cfg, pref.random_official_state_dict(cfg, seed=1))
    raven = href.make_huginn_checkpoint(tmp_path / "raven", seed=1)
    ouro = oref.make_ouro_checkpoint(tmp_path / "ouro", seed=1)
    calls = count_real_inits(monkeypatch)
    make_model(seed=2)
    assert "orthogonal_" in calls and "normal_" in calls  # the spy sees a real init
    calls.clear()
    for folder in (path, official, raven, ouro):
        load(folder)
        assert calls == [], (folder.name, calls)


@pytest.mark.parametrize("maker", ["own", "huginn-sharded"])
def test_at_most_one_stored_tensor_is_alive_while_loading(tmp_path, monkeypatch, maker):
    """Every tensor read from a safetensors file is released before the next one is read: a
    bf16 checkpoint never has a second full copy (or its file pages) alive next to the model."""
    if maker == "own":
        folder = save(make_model(seed=3).to(torch.bfloat16), tmp_path / "own")
    else:
        folder = href.make_huginn_checkpoint(tmp_path / "raven", seed=3, dtype=torch.bfloat16, layout="sharded")
    import safetensors

    real_open = safetensors.safe_open
    alive: list[weakref.ref] = []
    most = [0]

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def metadata(self):
            return self.file.metadata()

        def get_slice(self, key):
            return self.file.get_slice(key)

        def get_tensor(self, key):
            most[0] = max(most[0], sum(r() is not None for r in alive))
            tensor = self.file.get_tensor(key)
            alive.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    model = load(folder)
    assert len(alive) >= 10 and most[0] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- errors ------------------------------------------------------------------------------------

def _one_line(call, *words) -> str:
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, InputError) and "\n" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def test_fill_names_the_key_of_every_mismatch(tmp_path):
    config = make_model().config
    stored = {k: v for k, v in make_model(seed=1).state_dict().items() if k != "lm_head.weight"}
    stored["rope"] = rope_table(config.block_size, config.head_dim, config.rope_base)

    def fill(tensors):
        model = weights.build_on_meta(lambda: LoopedLM(config))
        return weights.fill(model, tensors, torch.float32, "ckpt")

    bad = dict(stored, **{"coda.0.mlp.fc.weight": torch.zeros(3, 3)})
    _one_line(lambda: fill(bad), "ckpt", "coda.0.mlp.fc.weight", "shape (3, 3)")
    _one_line(lambda: fill(dict(stored, extra=torch.zeros(1))), "ckpt", "extra")
    missing = {k: v for k, v in stored.items() if k != "ln_f.weight"}
    _one_line(lambda: fill(missing), "ckpt", "no weights for 1", "ln_f.weight")
    no_rope = {k: v for k, v in stored.items() if k != "rope"}  # a computed buffer is made at build
    assert torch.equal(fill(no_rope).rope, stored["rope"])
    model = fill(stored)  # and the right tensors fill it, as copies of the caller's tensors
    assert torch.equal(model.ln_f.weight, stored["ln_f.weight"])
    assert model.ln_f.weight.data_ptr() != stored["ln_f.weight"].data_ptr()


def test_a_bf16_checkpoint_that_does_not_match_its_config_is_one_line(tmp_path):
    from safetensors import safe_open

    path = save(make_model().to(torch.bfloat16), tmp_path / "ckpt")
    original = (path / "config.json").read_text()
    assert '"d_mlp": 128' in original
    (path / "config.json").write_text(original.replace('"d_mlp": 128', '"d_mlp": 96'))
    _one_line(lambda: load(path), "model.safetensors", "prelude.0.mlp.fc.weight", "(96, 64)")
    (path / "config.json").write_text(original)
    weights_file = path / "model.safetensors"
    with safe_open(str(weights_file), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights_file))
    state["prelude.0.mlp.fc.weight"] = state["prelude.0.mlp.fc.weight"].to(torch.int32)
    save_file(state, str(weights_file), metadata=metadata)
    _one_line(lambda: load(path), "prelude.0.mlp.fc.weight", "integer (int32)")


# ---- the finiteness check every loader and the audit run on all weights -----------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), where=st.integers(0, 10_000), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_all_finite_agrees_with_the_elementwise_mask(n, where, bad, dtype):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g).to(dtype)
    assert weights.all_finite(t) is True
    t[where % n] = bad
    assert weights.all_finite(t) is bool(torch.isfinite(t).all()) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_when_the_sum_overflows(dtype):
    """Finite entries near the dtype's maximum overflow their sum: the exact check decides."""
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    assert not bool(torch.isfinite(big.sum()))  # the fast route alone would say "non-finite"
    assert weights.all_finite(big) is True
    assert weights.all_finite(torch.empty(0, dtype=dtype)) is True


def test_nonfinite_parameters_names_parameters_and_buffers():
    model = nn.Linear(3, 4)
    model.register_buffer("table", torch.ones(5))
    assert weights.nonfinite_parameters(model) == []
    with torch.no_grad():
        model.weight[1, 2] = math.nan
    model.table[3] = math.inf
    assert weights.nonfinite_parameters(model) == ["weight", "table"]
