"""Hugging Face checkpoint folder layouts, for the spec-only references of Huginn and Ouro.

Independent of loopdyn (imports only torch, safetensors, json). Used by
``tests/huginn_reference.py`` and ``tests/ouro_reference.py`` to write and read the three
layouts issue 11 names:

* ``"safetensors"``: ``config.json`` + ``model.safetensors`` (what ``save_pretrained`` writes);
* ``"sharded"``: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` with
  ``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}`` (HF's sharding layout);
* ``"bin"``: ``pytorch_model.bin``, a ``torch.save``-d ``OrderedDict`` (legacy layout; read back
  with ``weights_only=True``);
* ``"sharded-bin"``: ``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

LAYOUTS = ("safetensors", "sharded", "bin", "sharded-bin")


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """Llama-order RMSNorm (both specs §3): normalise in float32, cast back to x's dtype, *then*
    multiply by the weight: ``w ⊙ cast_back(x_f32 · (mean(x_f32²) + ε)^(−1/2))``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def write_weights(directory: str | os.PathLike, state_dict: Mapping[str, Tensor],
                  layout: str = "safetensors", n_shards: int = 2) -> list[Path]:
    """Write ``state_dict`` into ``directory`` in one of :data:`LAYOUTS`; returns the files."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = OrderedDict((k, v.detach().contiguous()) for k, v in state_dict.items())
    if layout == "safetensors":
        path = directory / "model.safetensors"
        save_file(sd, str(path), metadata={"format": "pt"})
        return [path]
    if layout == "bin":
        path = directory / "pytorch_model.bin"
        torch.save(sd, path)
        return [path]
    keys = list(sd)
    n = max(1, min(n_shards, len(keys)))
    chunks = [keys[i * len(keys) // n:(i + 1) * len(keys) // n] for i in range(n)]
    weight_map, files, total = {}, [], 0
    st = layout == "sharded"
    for i, chunk in enumerate(chunks, 1):
        name = (f"model-{i:05d}-of-{n:05d}.safetensors" if st
                else f"pytorch_model-{i:05d}-of-{n:05d}.bin")
        part = OrderedDict((k, sd[k]) for k in chunk)
        if st:
            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        for k in chunk:
            weight_map[k] = name
            total += sd[k].numel() * sd[k].element_size()
        files.append(directory / name)
    index = directory / ("model.safetensors.index.json" if st else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                indent=2))
    return files + [index]


def read_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Read whichever single layout ``directory`` holds (safetensors preferred, as HF does)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return dict(load_file(str(directory / "model.safetensors")))
    for index_name, st in (("model.safetensors.index.json", True),
                           ("pytorch_model.bin.index.json", False)):
        index = directory / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            out: dict[str, Tensor] = {}
            for name in dict.fromkeys(weight_map.values()):
                part = (load_file(str(directory / name)) if st
                        else torch.load(directory / name, map_location="cpu", weights_only=True))
                out.update(part)
            return out
    if (directory / "pytorch_model.bin").exists():
        return dict(torch.load(directory / "pytorch_model.bin", map_location="cpu",
                               weights_only=True))
    raise FileNotFoundError(f"no weights in {directory}")


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
