"""Importers: checkpoints written by other code, loaded as LoopedModels (docs/design.md §3).

| format   | config.json says                                  | module      | model          |
|----------|---------------------------------------------------|-------------|----------------|
| parcae   | `_class_name` / `n_embd` (ParcaeConfig, GPTConfig) | `parcae.py` | `LoopedLM`     |
| huginn   | `RavenForCausalLM` / `model_type: huginn_raven`    | `huginn.py` | `HuginnLM`     |
| ouro     | `OuroForCausalLM` / `model_type: ouro`             | `ouro.py`   | `OuroLM`       |

loopdyn's own format is models/checkpoint.py; `loopdyn.models.load` reads all four. Each importer
has `from_official(directory, raw_config, dtype=None)`, which returns the model with
`checkpoint_info` set; shared weight-layout and config-reading helpers are in models/formats.py.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

FORMATS = ("huginn", "ouro", "parcae")


def detect(raw: dict) -> str | None:
    """'huginn' | 'ouro' | 'parcae' for a config.json an importer reads, None for anything else
    (loopdyn's own format included). Huginn and Ouro are recognised by `model_type`,
    `architectures` or `auto_map`; an official Parcae config by its fields."""
    model_type = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures") or []
    archs = [str(a) for a in archs] if isinstance(archs, list) else [str(archs)]
    auto_map = raw.get("auto_map")
    auto = " ".join(str(v) for v in auto_map.values()) if isinstance(auto_map, dict) else ""
    if model_type == "huginn_raven" or "RavenForCausalLM" in archs or "raven_modeling" in auto:
        return "huginn"
    if model_type == "ouro" or "OuroForCausalLM" in archs or "modeling_ouro" in auto:
        return "ouro"
    if raw.get("format") != "loopdyn" and ("_class_name" in raw or "n_embd" in raw):
        return "parcae"
    return None


def load_imported(directory: Path, raw: dict, fmt: str, dtype: torch.dtype | None = None):
    """The model of importer `fmt` (one of FORMATS), filled from `directory`, with
    `checkpoint_info` set, its parameters in `dtype` (default float32)."""
    if fmt not in FORMATS:  # pragma: no cover - detect only returns these
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    module = importlib.import_module(f"loopdyn.models.importers.{fmt}")
    return module.from_official(directory, raw, dtype=dtype)
