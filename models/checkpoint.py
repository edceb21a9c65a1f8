"""Checkpoints: loopdyn's own format, and `load`, which also reads the formats of models/importers/.

loopdyn format: a folder with `config.json` ({"format": "loopdyn", "version": 1, "save_id": …,
"config": {every LoopConfig field}}) and `model.safetensors` (tied head stored once; the same
save_id in its metadata). `save` writes or replaces only these two files and keeps everything
else in the folder. Each file is written under a temporary name and renamed; while the two are
swapped in, the previous pair is kept as hard links in `.loopdyn-backup/`, so a save killed at
any moment leaves a loadable checkpoint: if the two files then come from different saves, `load`
takes the backup copy and says so on stderr. save → load is bit-exact.

`load` detects the format from config.json (`importers.detect`): loopdyn's own, or one of the
importers in models/importers/ (official Parcae, Huginn-0125/Raven, Ouro; docs/design.md §3).

Before anything is allocated, the parameter bytes a config implies are checked against the size
of the weights file and the machine's memory (`bound`, `LoopConfig.check_fits`); integer,
boolean and complex weights are refused by name (`check_float_weights`).

Every loader builds the model on the `meta` device and fills it tensor by tensor, casting each to
float32 as it is read (models/weights.py): no random initialisation, no second full copy of the
weights; a bfloat16 file loads with a peak of the float32 model + one tensor.
"""
from __future__ import annotations

import contextlib
import json
import errno
import os
import secrets
import shutil
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from loopdyn.models.config import LoopConfig
from loopdyn.models.errors import CheckpointError, ConfigError, InputError
from loopdyn.io import (CONFIG_LIMIT, WriteError, check_output, describe_os_error, describe_read_error, fill_temp,
                        fsync_dir, read_small_json, remove_stale_temps, temp_name)
from loopdyn.models.looped import LoopedLM, value_embedding_layout
from loopdyn.models.layers import rope_table
from loopdyn.models.weights import build_on_meta, fill, nonfinite_parameters, open_weights

FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    """Where a model came from, attached to a loaded model as `model.checkpoint_info`."""

    path: str
    format: str  # "loopdyn" | "parcae" | "huginn" | "ouro"
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


def check_save_target(directory: str | Path, option: str = "") -> Path:
    """Refuse, before any work, a `save` folder that cannot take a checkpoint: not a folder,
    not writable, or holding a `config.json` / `model.safetensors` that loopdyn did not write."""
    directory = Path(directory)
    try:
        check_output(directory, option, kind="dir")
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
        raw = read_small_json(config_path, CONFIG_LIMIT, "config.json")
    except (OSError, InputError):
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
    """The `__metadata__` of a safetensors file, from its header only (`safe_open` maps the file
    and parses the header; no tensor is read). ValueError when the file is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except SafetensorError as err:
        raise ValueError(f"not a safetensors file ({err})") from None
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


def load(path: str | Path, device: str | torch.device = "cpu", dtype: "torch.dtype | str | None" = None) -> LoopedLM:
    """Load a loopdyn checkpoint, an official Parcae checkpoint, or a Huginn-0125/Raven or Ouro
    folder (models/formats.py) — a folder, its config.json, or its weights file. The model is
    returned in eval mode, its parameters in `dtype` (default float32; a name such as "bf16" or a
    torch dtype, models/precision.py; a mixed precision loads float32 weights), cast tensor by
    tensor as they are read: bf16 weights computed in bf16 are never held in float32. With
    `model.checkpoint_info` telling where it came from and whether any weight is not finite."""
    from loopdyn.models.precision import precision

    dtype = None if dtype is None else precision(dtype).weights
    directory = _checkpoint_dir(Path(path))
    config_path = directory / "config.json"
    try:
        raw = read_small_json(config_path, CONFIG_LIMIT, "config.json")
    except CheckpointError:
        raise
    except InputError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    from loopdyn.models import importers

    fmt = importers.detect(raw)
    if fmt is not None:
        model = importers.load_imported(directory, raw, fmt, dtype)
    elif raw.get("format") == "loopdyn":
        model, model.checkpoint_info = _load_own(directory, raw, dtype or torch.float32)
    else:
        raise CheckpointError(f"{config_path}: not a loopdyn, official Parcae, Huginn/Raven or Ouro config")
    info = model.checkpoint_info
    if info.nonfinite:
        warnings.warn(f"{info.weights_file}: non-finite values in {len(info.nonfinite)} parameter(s): "
                      f"{', '.join(info.nonfinite[:5])}", RuntimeWarning, stacklevel=2)
    return model.to(device).eval()


def _checkpoint_dir(path: Path) -> Path:
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ENOENT and not os.path.lexists(path):
            raise CheckpointError(f"{path}: no such checkpoint") from None
        if err.errno == errno.ENOENT:
            raise CheckpointError(f"{path}: a symlink to a missing file (no such checkpoint)") from None
        raise CheckpointError(describe_read_error(err, path)) from None
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


def _load_own(directory: Path, raw: dict, dtype: torch.dtype = torch.float32) -> tuple[LoopedLM, CheckpointInfo]:
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
    bound(config, weights, config_path, dtype)
    state = open_weights(weights)
    check_float_weights(state, weights)
    model = build_meta_model(config, config_path)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")  # stored once, as wte.weight
    check_keys_and_shapes(state, {k: tuple(v.shape) for k, v in expected.items()}, weights)
    fill(model, {**state, "rope": computed_rope(config)}, dtype, weights)
    return model, CheckpointInfo(str(directory), "loopdyn", str(weights), nonfinite_parameters(model))


def bound(config: LoopConfig, weights: Path, source: Path, dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before reading or allocating anything, a config that implies more parameters
    than the weights file holds or than the machine's memory takes (the model in `dtype`, filled
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
        config.check_fits(factor=1.25 * torch.finfo(dtype).bits / 32, what="loading it", source=str(source))
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


def build_meta_model(config: LoopConfig, source: Path) -> LoopedLM:
    """The LoopedLM of `config` on the meta device (shapes only, no random init): `fill` it."""
    try:
        return build_on_meta(lambda: LoopedLM(config))
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def computed_rope(config: LoopConfig) -> torch.Tensor:
    """The RoPE table LoopedLM computes (a buffer that is not stored), on the CPU."""
    return rope_table(config.block_size, config.head_dim, config.rope_base, device="cpu")


def check_keys_and_shapes(state: dict, expected: dict[str, tuple], path: Path) -> None:
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
