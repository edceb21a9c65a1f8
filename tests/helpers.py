"""Shared test fixtures."""
from __future__ import annotations

import torch

from loopdyn.models import LoopConfig, LoopedLM


def small_loop_model(injection: str = "diagonal", *, d: int = 16, perturb: float = 0.0, seed: int = 0,
                     **overrides) -> LoopedLM:
    """A small looped model for dynamics tests, in eval mode: width d, 2 heads, MLP width 2d,
    no value embeddings, h_0 = 0. The official init makes every core block the identity (zero
    output projections); perturb > 0 draws them from N(0, perturb²) so the loop is nonlinear."""
    torch.manual_seed(seed)
    cfg = LoopConfig.preset("tiny", injection=injection, d_model=d, n_heads=2, d_mlp=2 * d,
                            value_embeds=False, state_init="zero", **overrides)
    model = LoopedLM(cfg).eval()
    if perturb:
        with torch.no_grad():
            for blk in model.core:
                blk.attn.c_proj.weight.normal_(0, perturb)
                blk.mlp.proj.weight.normal_(0, perturb)
    return model


def rewrite_config(folder, changes: dict | None = None, drop: tuple = ()) -> None:
    """Edit a checkpoint folder's config.json in place: set `changes`, delete the keys in `drop`."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes or {})
    for key in drop:
        del raw[key]
    path.write_text(json.dumps(raw))
