"""Hugging Face-style checkpoint folders: weight layouts and config reading for the importers.

The Huginn-0125/Raven and Ouro importers (models/importers/, docs/design.md §3) read their
folders through here.

Weights may be stored as

    model.safetensors                                  one file
    model.safetensors.index.json + shards             sharded ({"weight_map": {key: file}})
    pytorch_model.bin  (or its .index.json + shards)  read with torch.load(weights_only=True)

and exactly one of these layouts may be present: a folder holding two (say model.safetensors
and pytorch_model.bin) is refused, since which one the official loader would read depends on
its version. Every error is one line naming the file and the keys at fault.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopdyn.models.errors import CheckpointError, InputError
from loopdyn.io import INDEX_LIMIT, read_small_json
from loopdyn.models.weights import StoredTensor, open_weights

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ---- reading weights ------------------------------------------------------------------------

def weight_files(directory: Path) -> tuple[str, list[Path]]:
    """(layout name, files to read) for the single weight layout in `directory`."""
    present = [n for n in SINGLE_FILES + INDEX_FILES if (directory / n).is_file()]
    if not present:
        raise CheckpointError(f"{directory}: no weights (looked for {', '.join(SINGLE_FILES + INDEX_FILES)})")
    if len(present) > 1:
        raise CheckpointError(f"{directory}: mixed weight formats ({' and '.join(present)}); keep exactly one")
    name = present[0]
    if name in SINGLE_FILES:
        return name, [directory / name]
    index_path = directory / name
    try:
        index = read_small_json(index_path, INDEX_LIMIT, "weight index")
    except InputError as err:
        raise CheckpointError(str(err)) from None
    try:
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (KeyError, TypeError):
        raise CheckpointError(f"{index_path}: not a weight index (expected JSON with a 'weight_map' "
                              f"object mapping tensor names to shard files)") from None
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a plain file name")
        if not (directory / shard).is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
    return name, [directory / s for s in shards]


def read_weights(directory: Path) -> tuple[dict[str, StoredTensor], str]:
    """Every tensor of the checkpoint in `directory`, not yet read ({key: StoredTensor}, as
    stored: dtype untouched; models/weights.py), and the name of the file that describes them.
    For a sharded layout every tensor must sit in the shard the index names, and the index must
    list every tensor."""
    name, files = weight_files(directory)
    if name in SINGLE_FILES:
        return open_weights(files[0]), str(files[0])
    index_path = directory / name
    weight_map = read_small_json(index_path, INDEX_LIMIT, "weight index")["weight_map"]
    state: dict[str, StoredTensor] = {}
    for path in files:
        shard = open_weights(path)
        for key, tensor in shard.items():
            listed = weight_map.get(key)
            if listed != path.name:
                where = "not in the index" if listed is None else f"listed under {listed}"
                raise CheckpointError(f"{path}: holds {key}, which is {where}")
            state[key] = tensor
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} indexed tensor(s) not found in their shards "
                              f"({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''})")
    return state, str(index_path)


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, tuple], optional: dict[str, tuple],
                  source: str) -> None:
    """Strict key set: every `expected` key present with its shape, `optional` keys allowed
    (shape checked), nothing else; one line naming the keys."""
    from loopdyn.models.checkpoint import check_keys_and_shapes

    present_optional = {k: v for k, v in optional.items() if k in state}
    check_keys_and_shapes(state, {**expected, **present_optional}, Path(source))
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {key} has dtype {tensor.dtype}; expected floating-point weights")


def layer_indices(keys, prefix: str) -> list[int]:
    """Sorted distinct i of keys '<prefix>.<i>.…'."""
    out = set()
    for key in keys:
        if key.startswith(prefix + "."):
            head = key[len(prefix) + 1:].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def check_layer_count(keys, prefix: str, expected: int, field: str, source: str) -> None:
    """A wrong layer count as one line ('weights hold 2 layers … config says 3'), before the
    generic key check would list dozens of keys."""
    found = layer_indices(keys, prefix)
    if found != list(range(expected)):
        held = (f"{len(found)} layer(s) ({prefix}.{found[0]}…{found[-1]})" if found else "no layers")
        raise CheckpointError(f"{source}: weights hold {held} under {prefix}, config.json {field} = {expected}")


# ---- reading config.json field by field -----------------------------------------------------

_MISSING = object()


@dataclass
class ConfigReader:
    """Type-checked access to a config.json dict; every error names the file and the field."""

    raw: dict
    source: str

    def _get(self, names: tuple[str, ...], default: Any):
        found = [(n, self.raw[n]) for n in names if n in self.raw and self.raw[n] is not None]
        if len({json.dumps(v, sort_keys=True) for _, v in found}) > 1:
            spelled = ", ".join(f"{n} = {v!r}" for n, v in found)
            raise CheckpointError(f"{self.source}: conflicting values for one field: {spelled}")
        if found:
            return found[0]
        if default is _MISSING:
            alias = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
            raise CheckpointError(f"{self.source}: missing config field {names[0]}{alias}")
        return names[0], default

    def int(self, *names: str, default: Any = _MISSING, minimum: int = 1) -> int:
        name, value = self._get(names, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"{self.source}: {name} must be an integer ≥ {minimum}, got {value!r}")
        return value

    def float(self, *names: str, default: Any = _MISSING, positive: bool = True) -> float:
        name, value = self._get(names, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            raise CheckpointError(f"{self.source}: {name} must be a finite number{' > 0' if positive else ''}, "
                                  f"got {value!r}")
        return float(value)

    def bool(self, *names: str, default: Any = _MISSING) -> bool:
        name, value = self._get(names, default)
        if not isinstance(value, bool):
            raise CheckpointError(f"{self.source}: {name} must be true or false, got {value!r}")
        return value

    def str(self, *names: str, default: Any = _MISSING) -> str:
        name, value = self._get(names, default)
        if not isinstance(value, str):
            raise CheckpointError(f"{self.source}: {name} must be a string, got {value!r}")
        return value

    def optional(self, name: str):
        return self.raw.get(name)

    def dtype(self) -> torch.dtype:
        """The stored dtype (`torch_dtype`, or `dtype` as transformers ≥ 4.56 writes it)."""
        name, value = self._get(("torch_dtype", "dtype"), "float32")
        dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            str(value).replace("torch.", ""))
        if dt is None:
            raise CheckpointError(f"{self.source}: {name} must be float32, float16 or bfloat16, got {value!r}")
        return dt


def make_embedding(vocab_size: int, width: int) -> nn.Embedding:
    """nn.Embedding with N(0, 1) rows, except on the meta device, where the draw is skipped:
    torch's first meta-device normal_ costs seconds, and an importer overwrites the rows anyway."""
    weight = torch.empty(vocab_size, width)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(vocab_size, width, _weight=weight)


# ---- shared input check -----------------------------------------------------------------------

def check_tokens(idx: torch.Tensor, vocab_size: int, max_len: int) -> None:
    from loopdyn.models.checks import check_tokens as check

    check(idx, "idx", vocab_size, max_len)


def check_loops(n_loops) -> int:
    if isinstance(n_loops, bool) or not isinstance(n_loops, int) or n_loops < 0:
        raise InputError(f"n_loops must be a non-negative integer, got {n_loops!r}")
    return n_loops


def check_h0(h0: torch.Tensor, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A caller's initial state: right shape, floating point; returned as a copy in the model's
    dtype and device (the caller's tensor is never modified)."""
    if not isinstance(h0, torch.Tensor) or not h0.is_floating_point() or tuple(h0.shape) != tuple(shape):
        got = tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__
        raise InputError(f"h0 must be a floating-point tensor of shape {tuple(shape)}, got {got}")
    return h0.detach().to(device=like.device, dtype=like.dtype).clone()


def stored_dtype_note(state: dict[str, StoredTensor], compute: torch.dtype) -> list[str]:
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    if dtypes != [str(compute).replace("torch.", "")]:
        return [f"weights stored as {', '.join(dtypes)}; computing in {str(compute).replace('torch.', '')}"]
    return []
