"""Checkpoints: loopdyn's own format, and import of checkpoints written by the official Parcae code.

loopdyn format: a folder with `config.json` ({"format": "loopdyn", "version": 1, "config":
{every LoopConfig field}}) and `model.safetensors` (tied head stored once). `save` writes
into a temporary folder and renames it, so an interrupted save never leaves a broken
checkpoint; save → load is bit-exact.

Official Parcae format (shared/reference/parcae-checkpoint-format.md): `config.json` of a
ParcaeConfig or GPTConfig, weights in `pytorch_model.bin`, `model.pt`, `model.safetensors` or
`model.bin`. Pickled weights are read with `torch.load(weights_only=True)` only. Unlike the
official loader (strict=False), the key set is checked strictly against the one the config
implies, and every mismatch is reported.
"""
from __future__ import annotations

import json
import math
import pickle
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from loopdyn.models.config import LoopConfig
from loopdyn.models.errors import CheckpointError, ConfigError
from loopdyn.models.fileio import atomic_directory
from loopdyn.models.looped import LoopedLM, value_embedding_layout
from loopdyn.models.layers import rope_table

FORMAT_VERSION = 1
OFFICIAL_WEIGHT_FILES = ("pytorch_model.bin", "model.pt", "model.safetensors", "model.bin")
OFFICIAL_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class CheckpointInfo:
    """Where a model came from, attached to a loaded model as `model.checkpoint_info`."""

    path: str
    format: str  # "loopdyn" | "parcae"
    weights_file: str
    nonfinite: list[str] = field(default_factory=list)  # parameters holding NaN or ±Inf
    notes: list[str] = field(default_factory=list)


# ---- loopdyn format ------------------------------------------------------------------------

def _own_state_dict(model: LoopedLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save(model: LoopedLM, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (replaced atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a folder")
    with atomic_directory(directory) as tmp:
        save_file(_own_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "loopdyn"})
        config = {"format": "loopdyn", "version": FORMAT_VERSION, "config": model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoopedLM:
    """Load a loopdyn checkpoint, an official Parcae checkpoint, or a Huginn-0125/Raven or Ouro
    folder (models/formats.py) — a folder, its config.json, or its weights file. The model is
    returned in eval mode, in float32 (Huginn/Ouro: in `dtype` when given), with
    `model.checkpoint_info` telling where it came from and whether any weight is not finite."""
    directory = _checkpoint_dir(Path(path))
    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: cannot read ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    from loopdyn.models.formats import detect_format, load_imported

    imported = detect_format(raw)
    if imported is not None:
        model = load_imported(directory, raw, imported, device, dtype)
        info = model.checkpoint_info
    elif raw.get("format") == "loopdyn":
        model, info = _load_own(directory, raw)
    elif "_class_name" in raw or "n_embd" in raw:
        model, info = _load_official(directory, raw)
    else:
        raise CheckpointError(f"{config_path}: neither a loopdyn nor an official Parcae config")
    model.checkpoint_info = info
    if info.nonfinite:
        warnings.warn(f"{info.weights_file}: non-finite values in {len(info.nonfinite)} parameter(s): "
                      f"{', '.join(info.nonfinite[:5])}", RuntimeWarning, stacklevel=2)
    return model.to(device).eval()


def _checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        # `save` swaps folders in two renames; a crash between them leaves only the old copy
        old = path.with_name(f".{path.name}.old")
        if old.is_dir() and (old / "config.json").is_file():
            warnings.warn(f"{path}: missing, loading the previous copy {old} left by an interrupted save",
                          RuntimeWarning, stacklevel=3)
            return old
        raise CheckpointError(f"{path}: no such checkpoint")
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json (not a checkpoint folder)")
    return directory


def _load_own(directory: Path, raw: dict) -> tuple[LoopedLM, CheckpointInfo]:
    config_path = directory / "config.json"
    if raw.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: unsupported loopdyn format version {raw.get('version')!r}")
    data = raw.get("config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: missing the 'config' object")
    missing = sorted({f.name for f in fields(LoopConfig)} - set(data))
    if missing:
        raise CheckpointError(f"{config_path}: missing config field(s) {', '.join(missing)}")
    try:
        config = LoopConfig.from_dict(data, source=str(config_path))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    weights = directory / "model.safetensors"
    state = _read_safetensors(weights)
    model = _build(config, config_path)
    expected = _own_state_dict(model)
    _check_keys_and_shapes(state, {k: tuple(v.shape) for k, v in expected.items()}, weights)
    model.load_state_dict(state, strict=not config.tie_embeddings)
    return model, CheckpointInfo(str(directory), "loopdyn", str(weights), _nonfinite(model))


def _build(config: LoopConfig, source: Path) -> LoopedLM:
    try:
        return LoopedLM(config)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and containers
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: refused to unpickle: not a plain tensor state dict "
                              f"(weights_only=True: {first[:160]})") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: unreadable weights file, corrupt or truncated? ({first[:160]})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a Lightning-Fabric training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict mapping names to tensors")
    return obj


def _check_keys_and_shapes(state: dict, expected: dict[str, tuple], path: Path) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) ({', '.join(unexpected[:4])}"
                         f"{', …' if len(unexpected) > 4 else ''})")
        raise CheckpointError(f"{path}: weights do not match the config: {'; '.join(parts)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, the config implies {shape}")


def _nonfinite(model: LoopedLM) -> list[str]:
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


# ---- official Parcae format ---------------------------------------------------------------

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
            return LoopConfig(**common, n_prelude=int(raw["n_layer"]), n_core=0, n_coda=0, injection="none",
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


def _load_official(directory: Path, raw: dict) -> tuple[LoopedLM, CheckpointInfo]:
    config_path = directory / "config.json"
    config = official_config_to_loop_config(raw, str(config_path))
    weights = next((directory / n for n in OFFICIAL_WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(OFFICIAL_WEIGHT_FILES)})")
    state = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_pickle(weights)
    state = {_strip_prefixes(k): v for k, v in state.items()}
    # A tied head may be stored once under either name.
    if config.tie_embeddings:
        if "lm_head.weight" not in state and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        if "transformer.wte.weight" not in state and "lm_head.weight" in state:
            state["transformer.wte.weight"] = state["lm_head.weight"]
    if _head_is_transposed(config) and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"].T  # the Triton head stores (d, V)
    model = _build(config, config_path)
    shapes, to_ours = official_state_dict_shapes(model)
    _check_keys_and_shapes(state, shapes, weights)
    notes = []
    stored_rope = state["freqs_cis"].float()[0, :, 0]
    computed = rope_table(config.block_size, config.head_dim, config.rope_base)
    if not torch.allclose(stored_rope, computed, atol=1e-6, rtol=0):
        notes.append("stored RoPE table differs from the one recomputed from rope_settings; using the stored one")
    model.rope.copy_(stored_rope)
    ours = {to_ours[k]: v.float() for k, v in state.items() if k in to_ours}
    model.load_state_dict(ours, strict=True)
    unused = sorted(set(shapes) - set(to_ours) - {"freqs_cis"})
    if unused:
        notes.append(f"{len(unused)} value-embedding table(s)/gate(s) are never used by the official forward "
                     f"pass and were dropped: {', '.join(unused)}")
    if config.looped and config.state_init != "zero":
        notes.append(f"state_init '{config.state_init}' is random; loopdyn draws it from a fixed seed in eval mode")
    return model, CheckpointInfo(str(directory), "parcae", str(weights), _nonfinite(model), notes)


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
