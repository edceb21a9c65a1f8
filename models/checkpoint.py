"""Checkpoints: loopdyn's own format, and import of checkpoints written by the official Parcae code.

loopdyn format: a folder with `config.json` ({"format": "loopdyn", "version": 1, "save_id": …,
"config": {every LoopConfig field}}) and `model.safetensors` (tied head stored once; the same
save_id in its metadata). `save` writes or replaces only these two files and keeps everything
else in the folder. Each file is written under a temporary name and renamed; while the two are
swapped in, the previous pair is kept as hard links in `.loopdyn-backup/`, so a save killed at
any moment leaves a loadable checkpoint: if the two files then come from different saves, `load`
takes the backup copy and says so on stderr. save → load is bit-exact.

Official Parcae format (shared/reference/parcae-checkpoint-format.md): `config.json` of a
ParcaeConfig or GPTConfig, weights in `pytorch_model.bin`, `model.pt`, `model.safetensors` or
`model.bin`. Pickled weights are read with `torch.load(weights_only=True)` only. Unlike the
official loader (strict=False), the key set is checked strictly against the one the config
implies, and every mismatch is reported.

Before anything is allocated, the parameter bytes a config implies are checked against the size
of the weights file and the machine's memory (`LoopConfig.check_fits`), and every official config
field is type-checked; integer, boolean and complex weights are refused by name.

Every loader builds the model on the `meta` device and fills it tensor by tensor, casting each to
float32 as it is read (models/weights.py): no random initialisation, no second full copy of the
weights; a bfloat16 file loads with a peak of the float32 model + one tensor.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from loopdyn.models.config import LoopConfig
from loopdyn.models.errors import CheckpointError, ConfigError
from loopdyn.io import (WriteError, check_output, describe_os_error, fill_temp, fsync_dir,
                        remove_stale_temps, temp_name)
from loopdyn.models.looped import LoopedLM, value_embedding_layout
from loopdyn.models.layers import rope_table
from loopdyn.models.weights import StoredTensor, build_on_meta, fill, nonfinite_parameters, open_weights

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


OWN_FILES = ("model.safetensors", "config.json")  # the only files `save` writes, in commit order
BACKUP_DIR = ".loopdyn-backup"


def save(model: LoopedLM, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` into `directory` (made if needed).

    Only those two files are written or replaced; everything else in the folder is kept. A file
    of either name that loopdyn did not write is never overwritten (CheckpointError). Works for
    `.` and the working directory. An interruption at any moment, kill -9 included, leaves the
    old checkpoint or the new one loadable; temporary files of a killed save are removed by the
    next save into the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    check_save_target(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{directory}: cannot create the folder ({describe_os_error(err)})") from None
    remove_stale_temps(directory)  # left by a save that was killed outright
    save_id = secrets.token_hex(8)
    state = _own_state_dict(model)
    config = {"format": "loopdyn", "version": FORMAT_VERSION, "save_id": save_id, "config": model.config.to_dict()}
    config_text = (json.dumps(config, indent=2) + "\n").encode("utf-8")

    def write_weights(tmp: Path) -> None:
        try:
            save_file(state, str(tmp), metadata={"format": "loopdyn", "save_id": save_id})
        except OSError:
            raise
        except Exception as err:  # safetensors' own error type: name the user's file, not ours
            text = str(err).replace(str(tmp), str(directory / "model.safetensors")).strip().splitlines()
            raise CheckpointError(f"{directory / 'model.safetensors'}: cannot write "
                                  f"({text[0][:200] if text else type(err).__name__})") from None

    def write_config(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            if f.write(config_text) != len(config_text):
                raise OSError(28, os.strerror(28))

    temps: dict[str, Path] = {}
    backup: Path | None = None
    committed: list[str] = []
    existed = {name: os.path.lexists(directory / name) for name in OWN_FILES}
    try:
        temps["model.safetensors"] = fill_temp(directory / "model.safetensors", write_weights)
        temps["config.json"] = fill_temp(directory / "config.json", write_config)
        backup = _keep_backup(directory)
        for name in OWN_FILES:
            os.replace(temps[name], directory / name)
            del temps[name]
            committed.append(name)
        fsync_dir(directory)
    except BaseException as err:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if committed and backup is not None:  # put the previous pair back
            for name in OWN_FILES:
                with contextlib.suppress(OSError):
                    os.replace(backup / name, directory / name)
        for name in committed:  # files this save created where there were none
            if not existed[name]:
                with contextlib.suppress(OSError):
                    os.unlink(directory / name)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        if created:  # a first save that fails leaves no empty folder behind
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise CheckpointError(f"{directory}: cannot save ({describe_os_error(err)})") from None
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return directory


def check_save_target(directory: str | Path) -> Path:
    """Refuse, before any work, a `save` folder that cannot take a checkpoint: not a folder,
    not writable, or holding a `config.json` / `model.safetensors` that loopdyn did not write."""
    directory = Path(directory)
    try:
        check_output(directory, "", kind="dir")
    except WriteError as err:
        raise CheckpointError(str(err)) from None
    config, weights = directory / "config.json", directory / "model.safetensors"
    if os.path.lexists(config) and _own_save_id(config) is False:
        raise CheckpointError(f"{config}: exists and was not written by loopdyn; not overwriting it "
                              f"(save into another folder)")
    if os.path.lexists(weights) and _own_weights_id(weights) is False:
        raise CheckpointError(f"{weights}: exists and was not written by loopdyn; not overwriting it "
                              f"(save into another folder)")
    return directory


def _own_save_id(config_path: Path):
    """The save_id of a loopdyn config.json (None for one written before save ids), or False
    when the file is not a loopdyn config."""
    try:
        if not config_path.is_file():
            return False
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(raw, dict) or raw.get("format") != "loopdyn":
        return False
    return raw.get("save_id")


def _own_weights_id(weights_path: Path):
    """The save_id in a loopdyn safetensors file's metadata (None before save ids), or False
    when the file is not loopdyn's."""
    try:
        meta = _safetensors_metadata(weights_path)
    except (OSError, ValueError):
        return False
    if meta.get("format") != "loopdyn":
        return False
    return meta.get("save_id")


def _safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors header, read without loading any tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > 100_000_000 or n > os.fstat(f.fileno()).st_size:
            raise ValueError("not a safetensors header")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header")
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _pair_state(directory: Path) -> str:
    """'ok' (a loopdyn config and weights from one save), 'mixed' (from different saves, or
    one missing) or 'absent' (neither is a loopdyn file)."""
    cid = _own_save_id(directory / "config.json")
    wid = _own_weights_id(directory / "model.safetensors")
    if cid is False and wid is False:
        return "absent"
    if cid is False or wid is False or cid != wid:
        return "mixed"
    return "ok"


def _keep_backup(directory: Path) -> Path | None:
    """Hard links of the current checkpoint in `.loopdyn-backup/` (copies where links are not
    possible), made complete before it is renamed into place. Keeps an older backup when the
    current pair is itself half-replaced (from a killed save)."""
    backup = directory / BACKUP_DIR
    state = _pair_state(directory)
    if state != "ok":
        return backup if state == "mixed" and _pair_state(backup) == "ok" else None
    shutil.rmtree(backup, ignore_errors=True)
    tmp = temp_name(backup)
    tmp.mkdir()
    try:
        for name in OWN_FILES:
            try:
                os.link(directory / name, tmp / name)
            except OSError:
                shutil.copy2(directory / name, tmp / name)
        os.replace(tmp, backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return backup


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
        raise CheckpointError(f"{config_path}: not a loopdyn, official Parcae, Huginn/Raven or Ouro config")
    model.checkpoint_info = info
    if info.nonfinite:
        warnings.warn(f"{info.weights_file}: non-finite values in {len(info.nonfinite)} parameter(s): "
                      f"{', '.join(info.nonfinite[:5])}", RuntimeWarning, stacklevel=2)
    return model.to(device).eval()


def _checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    directory = path if path.is_dir() else path.parent
    backup = directory / BACKUP_DIR
    if backup.is_dir() and _pair_state(directory) != "ok" and _pair_state(backup) == "ok":
        # a save was killed while swapping the two files in: its files do not belong together
        print(f"loopdyn: warning: {directory}: config.json and model.safetensors come from different saves "
              f"(a save was interrupted); loading the previous checkpoint kept in {backup}", file=sys.stderr)
        return backup
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
    cid, wid = raw.get("save_id"), (_own_weights_id(weights) if weights.is_file() else None)
    if weights.is_file() and wid is not False and cid != wid:
        raise CheckpointError(f"{directory}: config.json and model.safetensors come from different saves "
                              f"(an interrupted save?) and no backup copy is kept")
    bound(config, weights, config_path)
    state = open_weights(weights)
    check_float_weights(state, weights)
    model = _build(config, config_path)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")  # stored once, as wte.weight
    _check_keys_and_shapes(state, {k: tuple(v.shape) for k, v in expected.items()}, weights)
    fill(model, {**state, "rope": _rope(config)}, torch.float32, weights)
    return model, CheckpointInfo(str(directory), "loopdyn", str(weights), nonfinite_parameters(model))


def bound(config: LoopConfig, weights: Path, source: Path) -> None:
    """Refuse, before reading or allocating anything, a config that implies more parameters
    than the weights file holds or than the machine's memory takes (the float32 model, filled
    one tensor at a time: its bytes plus the largest tensor, bounded by 1.25×)."""
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file")
    size = weights.stat().st_size

    def check_file(n: int, at_least: str) -> None:  # every weight takes at least one byte
        if size < n:
            raise CheckpointError(f"{weights}: refused: its {size:,} bytes cannot hold the {at_least}{n:,} "
                                  f"parameters that {source} implies (the config does not match the weights)")

    check_file(config.param_count(exact=False), "at least ")
    try:
        config.check_fits(factor=1.25, what="loading it", source=str(source))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    check_file(config.param_count(), "")


def check_float_weights(state: dict, path: Path) -> None:
    """Refuse integer, boolean and complex weights by name (a float model cannot hold them
    without silently losing information)."""
    for key, value in state.items():
        dtype = value.dtype
        if dtype.is_complex or not dtype.is_floating_point:
            kind = "complex" if dtype.is_complex else ("boolean" if dtype == torch.bool else "integer")
            raise CheckpointError(f"{path}: weight {key!r} is {kind} ({str(dtype).replace('torch.', '')}); "
                                  f"loopdyn needs floating-point weights")


def _build(config: LoopConfig, source: Path) -> LoopedLM:
    """The LoopedLM of `config` on the meta device (shapes only, no random init): `fill` it."""
    try:
        return build_on_meta(lambda: LoopedLM(config))
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _rope(config: LoopConfig) -> torch.Tensor:
    """The RoPE table LoopedLM computes (a buffer that is not stored), on the CPU."""
    return rope_table(config.block_size, config.head_dim, config.rope_base, device="cpu")


def _check_keys_and_shapes(state: dict, expected: dict[str, tuple], path: Path) -> None:
    """One line naming the missing and unexpected keys, or the first key whose shape differs
    (`state` values: tensors or StoredTensors, anything with a `shape`)."""
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
    bound(config, weights, config_path)
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
    model = _build(config, config_path)
    shapes, to_ours = official_state_dict_shapes(model)
    _check_keys_and_shapes(state, shapes, weights)
    notes = []
    stored_rope = state["freqs_cis"].load().float()[0, :, 0]
    computed = _rope(config)
    if not torch.allclose(stored_rope, computed, atol=1e-6, rtol=0):
        notes.append("stored RoPE table differs from the one recomputed from rope_settings; using the stored one")
    ours = {to_ours[k]: v for k, v in state.items() if k in to_ours}
    fill(model, {**ours, "rope": stored_rope.contiguous()}, torch.float32, weights)
    unused = sorted(set(shapes) - set(to_ours) - {"freqs_cis"})
    if unused:
        notes.append(f"{len(unused)} value-embedding table(s)/gate(s) are never used by the official forward "
                     f"pass and were dropped: {', '.join(unused)}")
    if config.looped and config.state_init != "zero":
        notes.append(f"state_init '{config.state_init}' is random; loopdyn draws it from a fixed seed in eval mode")
    return model, CheckpointInfo(str(directory), "parcae", str(weights), nonfinite_parameters(model), notes)


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
