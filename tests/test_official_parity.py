"""loopdyn against the official Parcae code itself, when it is importable (an extra oracle).

Skipped unless a `parcae_lm` with `create_config` can be imported (the PyPI `parcae-lm` 0.1.0
wheel ships no code; point PARCAE_LM_PATH at a folder holding the package to run these).
The official code is never bundled: these tests only import it.

An official model with small random weights (every output projection perturbed: the official
init makes them zero, which would hide the blocks) is saved with `save_pretrained`, loaded
through loopdyn's official-format importer, and both run from the same h_0 (the official
`initialize_state` draws it from the global RNG; it is handed loopdyn's instead).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from loopdyn.models import load
from loopdyn.models.importers.parcae import official_state_dict_shapes
from loopdyn.models.kernels import fast_paths

if os.environ.get("PARCAE_LM_PATH"):
    sys.path.insert(0, os.environ["PARCAE_LM_PATH"])
parcae_lm = pytest.importorskip("parcae_lm")
if not hasattr(parcae_lm, "create_config"):
    pytest.skip("the installed parcae_lm has no code (create_config missing)", allow_module_level=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(official model, loopdyn model) holding the same weights."""
    torch.manual_seed(0)
    base = parcae_lm.create_config("parcae-small-140m")
    cfg = dataclasses.replace(
        base, n_embd=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=96,
        padded_vocab_size=96, block_size=32, recurrent_embedding_dimension=64,
        recurrent_intermediation_embedding_dimension=160, recurrent_num_attention_heads=4, n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=5, mean_backprop_depth=3,
        recurrent_iteration_method="per-sequence", sampling_scheme="fixed")
    official = cfg.construct_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in official.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.proj.weight")):
                p.normal_(0, 0.05, generator=g)
    path = tmp_path_factory.mktemp("official") / "ckpt"
    parcae_lm.save_pretrained(official, str(path))
    return official, load(path)


def _same_start(official, ours, idx):
    ctx = ours.encode(idx)
    h0 = ours.init_state(ctx, generator=torch.Generator().manual_seed(3)).detach()
    official.initialize_state = lambda e: h0.clone()
    ours.init_state = lambda ctx, generator=None: h0.clone()


def _restore(official, ours):
    for m, attr in ((official, "initialize_state"), (ours, "init_state")):
        m.__dict__.pop(attr, None)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("loops", [1, 4, 9])
def test_eval_logits_match_the_official_code(pair, fast, loops):
    official, ours = pair
    official.eval(), ours.eval()
    idx = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(loops))
    _same_start(official, ours, idx)
    try:
        with torch.no_grad(), fast_paths(fast):
            theirs = official(idx, num_steps_pair=torch.tensor([loops, 0]), return_logits=True)["logits"]
            mine = ours(idx, n_loops=loops).logits
    finally:
        _restore(official, ours)
    assert theirs.abs().max() > 0.1  # the blocks do something
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    if not fast:
        assert torch.equal(mine, theirs)  # the plain path is the official computation, bit for bit


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_training_loss_and_gradients_match_the_official_code(pair, fast):
    # fixed depths: μ_rec − μ_bwd loops without gradients, then μ_bwd with, for every sequence
    official, ours = pair
    official.train(), ours.train()
    idx = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(11))
    targets = torch.roll(idx, -1, dims=1)
    _same_start(official, ours, idx)
    official.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    try:
        theirs = official(idx, labels=targets)["loss"]
        theirs.backward()
        with fast_paths(fast):
            mine = ours(idx, targets).loss
            mine.backward()
    finally:
        _restore(official, ours)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    _, to_ours = official_state_dict_shapes(ours)
    ours_params = dict(ours.named_parameters())
    compared = 0
    for key, p in official.named_parameters():
        if key not in to_ours or p.grad is None:
            continue  # tables and gates the official layout allocates but never uses
        grad = ours_params[to_ours[key]].grad
        scale = max(float(p.grad.abs().max()), 1e-6)
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=key)
        compared += 1
    assert compared >= 20
