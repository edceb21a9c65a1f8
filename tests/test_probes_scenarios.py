"""A real run that becomes unstable on purpose, and a stable Parcae run of the same length.

Short deterministic version of bench/spike_scenarios.py (tiny preset, batch 8 × 64, seed 2):
linear (RDM-style) injection whose learning rate is raised 7× at step 60. ρ(Ā) climbs through
1, the state explodes and the loss breaks (ground truth from the loss alone, see
`loss_break`); the early warning must be reported before that. The Parcae run of the same
length must raise no alarm at all.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "bench" / "spike_scenarios.py"
_spec = importlib.util.spec_from_file_location("spike_scenarios", _path)
scenarios = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scenarios  # dataclasses look their module up
_spec.loader.exec_module(scenarios)

STEPS, TRIGGER, SEED = 90, 60, 2


def test_loss_break_ground_truth_rule():
    flat = [2.0, 2.2] * 30
    assert scenarios.loss_break(flat) is None
    assert scenarios.loss_break(flat[:40] + [2.0, 2.1] + [2.6, 2.7] * 8) == 43  # a sustained rise
    assert scenarios.loss_break(flat[:40] + [4.0] + flat[:19]) is None  # one hard batch is not a break
    assert scenarios.loss_break(flat[:30] + [float("nan")] + flat[:5]) == 31


@pytest.fixture(scope="module")
def unstable():
    return scenarios.run_scenario("inj-lr-jump-x7", seed=SEED, steps=STEPS, trigger=TRIGGER)


def test_early_warning_comes_before_the_loss_breaks(unstable):
    brk = unstable.break_step
    assert brk is not None and brk > TRIGGER
    warning = unstable.first("early_warning", after=TRIGGER)
    assert warning is not None
    assert warning.detected_step < brk, (warning.line(), brk)
    assert unstable.lead >= 5
    assert warning.signal == "injection_radius" and warning.lead_time is not None
    assert not unstable.false_alarms  # nothing before the trigger
    rho = dict(unstable.history["injection_radius"])
    assert rho[TRIGGER] < 1 < rho[warning.detected_step] or rho[warning.detected_step] >= 0.9


def test_stable_parcae_run_of_the_same_length_raises_no_alarm():
    run = scenarios.run_scenario("parcae", seed=SEED, steps=STEPS, trigger=TRIGGER)
    assert run.break_step is None
    assert run.alarms == []  # no spike, trend, non-finite or early-warning alert: 0 false alarms
