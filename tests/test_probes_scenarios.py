"""Real runs that break on purpose, and a stable one (short deterministic versions of
bench/spike_scenarios.py; tiny preset, batch 8 × 64).

Ground truth comes from the loss alone (`spike_step`: the first step at or after the trigger whose
loss is more than 0.3 nats above the median of the 20 before it). A learning-rate jump is seen
in the optimiser's pre-hook: the warning names the step about to be taken, before the loss can
move. A corrupted-data burst cannot be foreseen; it must be reported at the step whose loss
spikes. A stable Parcae run raises no alarm of the spike family."""
import importlib.util
import sys
from pathlib import Path


_path = Path(__file__).resolve().parents[1] / "bench" / "spike_scenarios.py"
_spec = importlib.util.spec_from_file_location("spike_scenarios", _path)
scenarios = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scenarios  # dataclasses look their module up
_spec.loader.exec_module(scenarios)

BY_NAME = {s.name: s for s in scenarios.BREAKING + scenarios.STABLE}


def test_ground_truth_rules():
    flat = [2.0, 2.2] * 30
    assert scenarios.spike_step(flat, 1) is None
    assert scenarios.spike_step(flat[:40] + [2.7] + flat[:10], 1) is None  # one hard batch 0.6 nats up
    assert scenarios.spike_step(flat[:40] + [3.2] + flat[:10], 1) == 41  # a burst: > 1 nat above the median
    assert scenarios.spike_step(flat[:40] + [2.7] * 10, 1) == 41  # a rise that stays
    assert scenarios.spike_step(flat[:40] + [3.2] + flat[:10], 45) is None  # before the trigger: not this run's
    assert scenarios.spike_step(flat[:30] + [float("nan")], 1) == 31
    # A hard stretch of text raises the loss of every run on those batches: the healthy twin's
    # loss cancels it, the run's own excess does not.
    hard = flat[:40] + [2.7] * 10
    assert scenarios.spike_step(hard, 1) == 41
    assert scenarios.spike_step(hard, 1, reference=hard) is None
    assert scenarios.spike_step([v + 0.5 * (i >= 45) for i, v in enumerate(hard)], 1, reference=hard) == 46
    assert scenarios.loss_break(flat[:40] + [2.0, 2.1] + [2.6, 2.7] * 8) == 43  # a sustained rise
    assert scenarios.loss_break(flat[:40] + [4.0] + flat[:19]) is None  # one hard batch is not a break


def test_baselines_follow_their_rules():
    x = [2.0 + 0.01 * (i % 3) for i in range(60)] + [20.0, 2.0]
    assert scenarios.lightning_spike(x) == [61]  # ≥ 3× the running mean of 10 (rtol 2), worse than the last
    assert scenarios.olmo_core(x) == [61]
    g = [1.0 + 0.01 * (i % 5) for i in range(60)] + [5.0]
    assert scenarios.zclip(g) == [61]


def test_learning_rate_jump_is_warned_before_the_step_that_breaks():
    run = scenarios.run_scenario(BY_NAME["inj-lr-x20@60"], seed=0, steps=75)
    spike = run.spike_step
    assert spike is not None and spike > 60
    warning = next(a for a in run.alerts if a.kind == "spike_warning")
    assert warning.step == warning.detected_step == 60 and warning.signal == "lr"  # before step 60's update
    assert spike - warning.detected_step >= 1
    loop = next(a for a in run.alerts if a.kind == "loop_instability")
    assert loop.signal == "injection_radius" and loop.value > 1 and loop.step <= spike
    assert not [a for a in run.alerts if a.kind in scenarios.SPIKE_KINDS and a.step < 60]  # nothing before


def test_data_burst_is_reported_at_the_step_whose_loss_spikes():
    run = scenarios.run_scenario(BY_NAME["data-burst@70"], seed=0, steps=74)
    assert run.spike_step == 70
    first = min(a.detected_step for a in run.alerts if a.kind in scenarios.SPIKE_KINDS)
    assert first == 70


def test_stable_parcae_run_raises_no_spike_alarm():
    run = scenarios.run_scenario(BY_NAME["parcae"], seed=0, steps=120)
    assert [a for a in run.alerts if a.kind in scenarios.SPIKE_KINDS + ("loop_instability",)] == []
