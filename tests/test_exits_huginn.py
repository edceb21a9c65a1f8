"""Issue 23: Huginn's exit criteria in loopdyn.dynamics.exits against the spec-only reference
(tests/huginn_exit_reference.py, run on the spec-only forward of tests/huginn_reference.py): the same
exit loop per token on the Huginn-shaped fixtures, at the published defaults and across a grid of
thresholds; and the whole report on Huginn- and Ouro-shaped fixtures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loopdyn.dynamics.exits import HUGINN, exit_loops, exits, loop_signals
from loopdyn.models import load
from tests import huginn_exit_reference as spec
from tests import huginn_reference as ref
from tests import ouro_reference as oref

LOOPS = 16
GRIDS = {"entropy-diff": [1e-3, 1e-2, 0.1, 0.5], "latent-diff": [0.03, 0.1, 0.3, 0.6],
         "kl": [1e-3, 1e-2, 0.1, 1.0], "minp-kl": [1e-5, 1e-3, 0.1, 1.0], "argmax-stability": [5, 1, 2, 3, 8],
         "cosine": [1e-3, 1e-2, 0.05, 0.2]}


def near(values, thr) -> bool:
    """A checked value within float32 round-off of the threshold: the exit is decided by round-off."""
    return any(v is not None and abs(v - thr) <= 1e-4 * thr + 1e-6 for v in values)


@pytest.fixture(scope="module", params=[("tied-qkbias", {}), ("deeper", dict(n_layers_in_recurrent_block=3,
                                                                              n_heads=2))],
                ids=lambda p: p[0])
def fixture(request, tmp_path_factory):
    name, overrides = request.param
    folder = ref.make_huginn_checkpoint(tmp_path_factory.mktemp(name) / name, seed=7, **overrides)
    model = load(folder)
    idx = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    d = model.config.n_embd
    cases = {"zeros": torch.zeros(2, 11, d), "official-draw": ref.official_random_state((2, 11, d), d, seed=5)}
    out = {}
    for case, h0 in cases.items():
        r = ref.reference_forward(folder, idx, LOOPS, h0=h0)
        states = [s.double().reshape(22, d).numpy() for s in r.states]  # s_0..s_T
        logits = [z.double().reshape(22, -1).numpy() for z in r.logits_per_loop[1:]]  # after loops 1..T
        out[case] = (loop_signals(model, idx, LOOPS, h0=h0), states, logits)
    return out


@pytest.mark.parametrize("criterion", HUGINN)
def test_same_exit_loop_per_token_as_the_spec_reference(fixture, criterion):
    compared = fired = 0
    for sig, states, logits in fixture.values():
        for thr in GRIDS[criterion]:
            mine = exit_loops(sig, criterion, thr, LOOPS)
            for n in range(sig.n_tokens):
                S = [s[n] for s in states]
                Z = [z[n] for z in logits]
                if criterion != "argmax-stability" and near(spec.exit_value_trace(criterion, S, Z)[: mine[n]], thr):
                    continue
                want = spec.exit_step(criterion, S, Z, thr)
                assert mine[n] == want, (criterion, thr, n)
                compared += 1
                fired += want < LOOPS
    assert compared >= 0.9 * 2 * len(GRIDS[criterion]) * 22
    assert fired >= 10  # the grid makes the criterion fire at many tokens, not only run to the end


def test_published_defaults_are_the_spec_table():
    from loopdyn.dynamics.exits import DEFAULTS

    assert {k: DEFAULTS[k] for k in HUGINN} == spec.AUTO


def test_report_on_huginn_and_ouro_fixtures(tmp_path):
    hug = load(ref.make_huginn_checkpoint(tmp_path / "h", seed=2))
    idx = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    r = exits(hug, idx, h0=torch.zeros(1, 12, hug.config.n_embd))
    assert r.horizon == 4 * hug.mean_loops and set(r.calibration.defaults) == set(HUGINN) | {"contraction"}
    ouro = load(oref.make_ouro_checkpoint(tmp_path / "o", seed=3, gate_scale=6.0))
    assert callable(getattr(ouro, "exit_gate", None))
    r = exits(ouro, idx, criteria=("exit-gate", "kl", "contraction"), budget=0.01)
    assert set(r.calibration.criteria) == {"exit-gate", "kl", "contraction"}
    gate = r.calibration.defaults["exit-gate"]
    assert gate.threshold == 1.0 and np.isfinite(gate.mean_loops)
    assert "exit-gate (default)" in r.to_text()
