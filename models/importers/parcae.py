"""Import of checkpoints written by the official Parcae code (docs/design.md §3).

Format (shared/reference/parcae-checkpoint-format.md): `config.json` of a ParcaeConfig or
GPTConfig, weights in `pytorch_model.bin`, `model.pt`, `model.safetensors` or `model.bin`.
Pickled weights are read with `torch.load(weights_only=True)` only. Unlike the official loader
(strict=False), the key set is checked strictly against the one the config implies, and every
mismatch is reported. Every official config field is type-checked before anything is allocated;
the weights are streamed into a model built on the meta device (models/weights.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from loopdyn.models.checkpoint import (CheckpointInfo, bound, build_meta_model, check_float_weights,
                                       check_keys_and_shapes, computed_rope)
from loopdyn.models.config import LoopConfig
from loopdyn.models.errors import CheckpointError, ConfigError
from loopdyn.models.looped import LoopedLM, value_embedding_layout
from loopdyn.models.weights import StoredTensor, fill, nonfinite_parameters, open_weights

OFFICIAL_WEIGHT_FILES = ("pytorch_model.bin", "model.pt", "model.safetensors", "model.bin")
OFFICIAL_PREFIXES = ("module.", "_orig_mod.", "model.")


def detect(raw: dict) -> bool:
    """An official ParcaeConfig / GPTConfig dict (`_class_name` or `n_embd`)."""
    return "_class_name" in raw or "n_embd" in raw


# Every key the official save writes (reference §1.1), ParcaeConfig and GPTConfig together.
OFFICIAL_KEYS = frozenset("""
name hf_config block_size n_embd intermediate_size num_attention_heads num_key_value_heads vocab_size
padding_multiple padded_vocab_size rope_settings use_abacus randomize_positions_from block_class_name
norm_class_name attn_impl norm_eps mlp_class_name nonlin_name bias qk_bias init_strategy init_orthogonal
skip_initialization mup_model_scaling_factor use_fused_head debias_attention center_attention clip_qkv
qk_norm logit_softcap activation_checkpoint_impl simple_ops strategy injection_type
n_layers_in_recurrent_block n_layers_in_prelude n_layers_in_coda state_init recurrent_embedding_dimension
recurrent_intermediation_embedding_dimension recurrent_num_attention_heads prelude_norm sampling_scheme
mean_recurrence mean_backprop_depth lockstep_n lockstep_k curriculum_target recurrent_iteration_method
tie_embeddings model_class_name _is_recurrent_block_config _class_name n_layer init
""".split())
_REQUIRED = ("block_size", "n_embd", "num_attention_heads", "vocab_size")
_REQUIRED_PARCAE = ("injection_type", "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda",
                    "mean_recurrence", "mean_backprop_depth")
# The type of every official field loopdyn reads (reference §1.1, §7); null is always allowed
# (the dataclass default). Fields loopdyn ignores are not checked.
_INT, _NUM, _BOOL, _STR, _DICT = "an integer", "a number", "true or false", "a string", "an object"
OFFICIAL_TYPES = {
    **{k: _INT for k in ("block_size", "n_embd", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                         "vocab_size", "padding_multiple", "padded_vocab_size", "randomize_positions_from",
                         "n_layers_in_recurrent_block", "n_layers_in_prelude", "n_layers_in_coda",
                         "recurrent_embedding_dimension", "recurrent_intermediation_embedding_dimension",
                         "recurrent_num_attention_heads", "mean_recurrence", "mean_backprop_depth", "n_layer")},
    **{k: _NUM for k in ("norm_eps", "mup_model_scaling_factor", "clip_qkv", "logit_softcap")},
    **{k: _BOOL for k in ("bias", "qk_bias", "qk_norm", "simple_ops", "prelude_norm", "tie_embeddings")},
    **{k: _STR for k in ("name", "block_class_name", "norm_class_name", "mlp_class_name", "nonlin_name",
                         "init_strategy", "use_fused_head", "injection_type", "state_init", "sampling_scheme",
                         "_class_name")},
    "rope_settings": _DICT,
}
_ROPE_TYPES = {"use_rope": _BOOL, "rope_condense_ratio": _NUM, "rope_base": _NUM}
_POSITIVE = ("block_size", "n_embd", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
             "padding_multiple", "padded_vocab_size", "randomize_positions_from", "recurrent_embedding_dimension",
             "recurrent_intermediation_embedding_dimension", "recurrent_num_attention_heads", "mean_recurrence",
             "mean_backprop_depth")


def _type_ok(value, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    return isinstance(value, dict)


def check_official_types(raw: dict, source: str) -> None:
    """Type-check every official config field loopdyn reads, one by one (CheckpointError names
    the field, what it must be and what it is)."""
    def check(name, value, kind):
        if value is not None and not _type_ok(value, kind):
            raise CheckpointError(f"{source}: {name} must be {kind}, got {json.dumps(value)[:60]}")

    for name, kind in OFFICIAL_TYPES.items():
        check(name, raw.get(name), kind)
    for name, kind in _ROPE_TYPES.items():
        check(f"rope_settings.{name}", (raw.get("rope_settings") or {}).get(name), kind)
    for name in _POSITIVE:
        if raw.get(name) is not None and raw[name] < 1:
            raise CheckpointError(f"{source}: {name} must be ≥ 1, got {raw[name]}")
    for name in ("n_layers_in_recurrent_block", "n_layers_in_prelude", "n_layers_in_coda", "n_layer"):
        if raw.get(name) is not None and raw[name] < 0:
            raise CheckpointError(f"{source}: {name} must be ≥ 0, got {raw[name]}")


_MLPS = {("BaseMLP", "ReLU2"): "relu2", ("BaseMLP", "ReLU"): "relu", ("BaseMLP", "GELU"): "gelu",
         ("GatedMLP", "SiLU"): "swiglu", ("GatedMLP", "GELU"): "geglu"}
_INJECTIONS = {"diagonal": "diagonal", "linear": "linear", "add": "additive"}
_LOGIT_SCALE_INV_SQRT_D = {"llama-by-dim-ls", "noci-anagnostidis", "shaped", "deep-scale-simple",
                           "deep-scale-full", "scaled-and-logit-scale"}


def official_config_to_loop_config(raw: dict, source: str = "config.json") -> LoopConfig:
    """Translate an official ParcaeConfig/GPTConfig dict into a LoopConfig (reference §1.3, §2)."""
    raw = {k: v for k, v in raw.items()}
    unknown = sorted(set(raw) - OFFICIAL_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unknown config field(s) {', '.join(unknown)}")
    class_name = raw.pop("_class_name", None) or ("ParcaeConfig" if "injection_type" in raw else "GPTConfig")
    parcae = class_name == "ParcaeConfig"
    required = _REQUIRED + (_REQUIRED_PARCAE if parcae else ("n_layer",))
    missing = [k for k in required if raw.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: missing config field(s) {', '.join(missing)}")
    check_official_types(raw, source)

    def get(key, default=None):
        value = raw.get(key)
        return default if value is None else value

    def refuse(msg):
        raise CheckpointError(f"{source}: {msg}")

    d = int(raw["n_embd"])
    heads = int(raw["num_attention_heads"])
    padded = raw.get("padded_vocab_size")
    if padded is None:
        multiple = int(get("padding_multiple", 512))
        padded = -(-int(raw["vocab_size"]) // multiple) * multiple
    rope = get("rope_settings", {}) or {}
    if not rope.get("use_rope", True):
        refuse("use_rope = false is not supported")
    if rope.get("rope_condense_ratio", 1) != 1:
        refuse("rope_condense_ratio ≠ 1 is not supported")
    norm = "rmsnorm" if get("simple_ops", False) else {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}.get(
        get("norm_class_name", "LayerNorm"))
    if norm is None:
        refuse(f"norm_class_name {raw.get('norm_class_name')!r} is not supported")
    if "Gemma" in str(raw.get("name", "")) and norm == "rmsnorm":
        refuse("a 'Gemma' name with RMSNorm fails in the official code too")
    mlp = _MLPS.get((get("mlp_class_name", "BaseMLP"), get("nonlin_name", "GELU")))
    if mlp is None:
        refuse(f"MLP {raw.get('mlp_class_name')}/{raw.get('nonlin_name')} is not supported")
    if get("block_class_name", "TransformerPreNormBlock") != "TransformerPreNormBlock":
        refuse(f"block_class_name {raw.get('block_class_name')!r} is not supported")
    strategy = get("init_strategy", "scaled")
    mup = float(get("mup_model_scaling_factor", 1))
    emb_scale = math.sqrt(d) if strategy in ("takase", "takase-scaled") else 1.0
    logit_scale = {"takase-scaled": math.sqrt(2 / 5) / math.sqrt(d)}.get(
        strategy, 1 / math.sqrt(d) if strategy in _LOGIT_SCALE_INV_SQRT_D else 1.0) / mup
    common = dict(
        name=str(get("name", "parcae")), vocab_size=int(padded),
        block_size=int(get("randomize_positions_from", raw["block_size"])),
        d_model=d, n_heads=heads, n_kv_heads=int(get("num_key_value_heads", heads)),
        d_mlp=int(get("intermediate_size", 4 * d)), mlp=mlp, norm=norm, norm_eps=float(get("norm_eps", 1e-5)),
        block="prenorm", qk_norm=bool(get("qk_norm", False)), qk_bias=bool(get("qk_bias", False)),
        clip_qkv=raw.get("clip_qkv"), bias=bool(get("bias", False)), value_embeds=True,
        rope_base=float(rope.get("rope_base", 50000)), tie_embeddings=bool(get("tie_embeddings", False)),
        logit_softcap=raw.get("logit_softcap"), emb_scale=emb_scale,
        extra={"source_format": "parcae", "class_name": class_name, "init_strategy": strategy,
               "use_fused_head": get("use_fused_head", "pytorch")},
    )
    try:
        if not parcae:
            common["logit_scale"] = 1.0  # the official GPT applies no logit scale (reference §7.3)
            return LoopConfig(**common, n_prelude=int(raw["n_layer"]), n_core=0, n_coda=0, injection="fixed",
                              prelude_norm=False)
        injection = _INJECTIONS.get(raw["injection_type"])
        if injection is None:
            refuse(f"injection_type {raw['injection_type']!r} is not supported")
        state_init = get("state_init", "like-init")
        scheme = str(get("sampling_scheme", ""))
        ds = int(get("recurrent_embedding_dimension", d))
        return LoopConfig(
            **common, logit_scale=logit_scale,
            n_prelude=int(raw["n_layers_in_prelude"]), n_core=int(raw["n_layers_in_recurrent_block"]),
            n_coda=int(raw["n_layers_in_coda"]), d_state=ds,
            n_state_heads=int(get("recurrent_num_attention_heads", heads)),
            d_state_mlp=int(get("recurrent_intermediation_embedding_dimension", 4 * ds)),
            injection=injection, input_gain="euler", state_init=state_init,
            prelude_norm=bool(get("prelude_norm", False)), mean_loops=int(raw["mean_recurrence"]),
            backprop_loops=int(raw["mean_backprop_depth"]),
            depth_sampling="fixed" if scheme.startswith("fixed") else "poisson",
        )
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _official_name(ours: str, looped: bool) -> str:
    """loopdyn parameter name → official state-dict key."""
    head, _, rest = ours.partition(".")
    if head in ("prelude", "coda"):
        stage = head if looped else "h"
        return f"transformer.{stage}.{rest}"
    if head == "core":
        return f"transformer.core_block.{rest}"
    if head == "injection":
        return "transformer.adapter.adapter." + rest[2:] if rest.startswith("W.") else f"transformer.adapter.{rest}"
    if head == "readout":
        return f"transformer.C.{rest}"
    if head in ("wte", "ln_f", "ln_prelude"):
        return f"transformer.{ours}"
    return ours  # value_embeds.*, lm_head.weight


def official_state_dict_shapes(model: LoopedLM) -> tuple[dict[str, tuple], dict[str, str]]:
    """The official key set implied by the config: ({official key: shape}, {official key: our name}).

    Includes the value-embedding tables and gates the official layout allocates but never uses
    (they are checked, then dropped) and the `freqs_cis` RoPE buffer.
    """
    cfg = model.config
    looped = cfg.looped
    shapes, to_ours = {}, {}
    for name, tensor in model.state_dict().items():
        if name == "rope":
            continue
        key = _official_name(name, looped)
        shapes[key], to_ours[key] = tuple(tensor.shape), name
    layout = value_embedding_layout(cfg)
    kv_width = cfg.n_kv_heads * cfg.head_dim
    for k in layout.tables:
        shapes.setdefault(f"value_embeds.{k}.weight", (cfg.vocab_size, kv_width))
    for block in layout.gated - set(layout.live):
        stage, _, i = block.partition(".")
        heads = cfg.n_state_heads if stage == "core" else cfg.n_kv_heads
        shapes[_official_name(f"{block}.attn.ve_gate.weight", looped)] = (heads, 32)
    shapes["freqs_cis"] = (1, cfg.block_size, 1, cfg.head_dim // 2, 2)
    return shapes, to_ours


def from_official(directory: Path, raw: dict, dtype: torch.dtype | None = None) -> LoopedLM:
    """A LoopedLM from an official Parcae folder, its parameters in `dtype` (default float32, the
    official numerics; bf16 as Parcae runs bf16), with `checkpoint_info` set."""
    dtype = dtype or torch.float32
    config_path = directory / "config.json"
    config = official_config_to_loop_config(raw, str(config_path))
    weights = next((directory / n for n in OFFICIAL_WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(OFFICIAL_WEIGHT_FILES)})")
    bound(config, weights, config_path, dtype)
    state: dict[str, StoredTensor] = open_weights(weights)
    check_float_weights(state, weights)
    state = {_strip_prefixes(k): v for k, v in state.items()}
    # A tied head may be stored once under either name.
    if config.tie_embeddings:
        if "lm_head.weight" not in state and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        if "transformer.wte.weight" not in state and "lm_head.weight" in state:
            state["transformer.wte.weight"] = state["lm_head.weight"]
    if _head_is_transposed(config) and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"].map(lambda t: t.T)  # the Triton head stores (d, V)
    model = build_meta_model(config, config_path)
    shapes, to_ours = official_state_dict_shapes(model)
    check_keys_and_shapes(state, shapes, weights)
    notes = []
    stored_rope = state["freqs_cis"].load().float()[0, :, 0]
    computed = computed_rope(config)
    if not torch.allclose(stored_rope, computed, atol=1e-6, rtol=0):
        notes.append("stored RoPE table differs from the one recomputed from rope_settings; using the stored one")
    ours = {to_ours[k]: v for k, v in state.items() if k in to_ours}
    fill(model, {**ours, "rope": stored_rope.contiguous()}, dtype, weights)
    unused = sorted(set(shapes) - set(to_ours) - {"freqs_cis"})
    if unused:
        notes.append(f"{len(unused)} value-embedding table(s)/gate(s) are never used by the official forward "
                     f"pass and were dropped: {', '.join(unused)}")
    if config.looped and config.state_init != "zero":
        notes.append(f"state_init '{config.state_init}' is random; loopdyn draws it from a fixed seed in eval mode")
    model.checkpoint_info = CheckpointInfo(str(directory), "parcae", str(weights), nonfinite_parameters(model), notes)
    return model


def _head_is_transposed(config: LoopConfig) -> bool:
    """An untied Triton head stores its weight as (d, V) (reference §3, §7.3): Parcae with
    use_fused_head 'full-triton' or 'hhe'; GPT with any non-empty use_fused_head."""
    fused = config.extra.get("use_fused_head") or ""
    if config.tie_embeddings:
        return False
    if config.extra.get("class_name") == "GPTConfig":
        return fused != ""
    return fused in ("full-triton", "hhe")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key
