"""Alert families, field meanings, warnings before the step, escalation, verdicts, replay.

Ground truth is computed here independently: the SGD update a step really applied, ρ(Ā) by
numpy, the RNG state the test itself read after each step."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from loopdyn.probes import StabilityMonitor
from tests.test_probes_monitor import batches, tiny


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return self.body(x)


def lr_jump_run(on_warning, jump_at=30, factor=10.0, steps=34):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = StabilityMonitor(model, opt, console=False, on_warning=on_warning)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    applied = {}
    for step in range(1, steps + 1):
        opt.param_groups[0]["lr"] = 0.01 * (factor if step >= jump_at else 1.0)  # a schedule that jumps
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        monitor.record_loss(loss)
        # the learning rate the update really used: Δθ = −lr·g for plain SGD
        d = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
        g = torch.cat([gr.flatten() for gr in grads])
        applied[step] = float(d @ g / (g @ g))
    monitor.close()
    return monitor, applied


def test_a_learning_rate_jump_is_warned_before_the_step_and_cut_lr_acts_on_that_step():
    monitor, applied = lr_jump_run("cut_lr")
    warning = next(a for a in monitor.alerts if a.kind == "spike_warning")
    assert warning.step == 30 and warning.detected_step == 30 and warning.signal == "lr"
    assert warning.value == pytest.approx(0.1)  # the signal's own value: the new learning rate
    assert warning.score >= warning.threshold == 1.0  # the fused precursor score
    assert "before the update" in warning.message and "×10" in warning.message
    assert applied[29] == pytest.approx(0.01, rel=1e-4)
    assert applied[30] == pytest.approx(0.05, rel=1e-4)  # the very step was taken at the cut rate
    assert any(a.kind == "action" and a.step == 30 and "before step 30" in a.message for a in monitor.alerts)
    # Without an action the monitor changes nothing: the jump goes through.
    monitor, applied = lr_jump_run("warn")
    assert applied[30] == pytest.approx(0.1, rel=1e-4)
    assert [a.step for a in monitor.alerts if a.kind == "spike_warning"][:1] == [30]
    assert not any(a.kind == "action" for a in monitor.alerts)


def test_on_warning_stop_drops_the_warned_step():
    monitor, applied = lr_jump_run("stop", steps=30)
    assert monitor.stop_requested and "before step 30" in monitor.stop_reason
    assert applied[30] == 0.0 or math.isnan(applied[30])  # no update at all


def loop_blowup_run(repeat_actions=True, steps=75, start=31, rate=1.1):
    """A linear injection whose Ā is scaled ×rate after every step from `start` on (as a bad
    optimiser would): ρ(Ā) crosses 1 and keeps climbing."""
    model = tiny("linear", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, console=False, on_loop="cut_lr", repeat_actions=repeat_actions)
    d = model.config.d_state
    rho = {}
    for step, (x, y) in enumerate(batches(steps), start=1):
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # ρ after the update (what the monitor reads in its post-step hook)
            A = model.injection.W.weight.detach().double().numpy()[:, :d]
            rho[step] = float(np.abs(np.linalg.eigvals(A)).max())
            if step >= start:
                model.injection.W.weight[:, :d] *= rate
    monitor.close()
    return monitor, rho


def test_loop_instability_escalates_while_it_worsens_and_repeats_the_action():
    monitor, rho = loop_blowup_run()
    loop = [a for a in monitor.alerts if a.kind == "loop_instability"]
    assert len(loop) >= 3
    first = loop[0]
    assert first.severity == "warning" and first.escalation == 0 and first.family == "loop_instability"
    assert first.signal == "injection_radius" and first.value == pytest.approx(rho[first.step], rel=1e-5)
    assert first.threshold == 1.0 and first.score == first.value
    assert first.step == min(s for s, r in rho.items() if r > 1 + 1e-3)  # the first step ρ > 1 (numpy)
    for a, b in zip(loop, loop[1:]):
        assert b.severity == "critical" and b.escalation == a.escalation + 1
        assert b.step - a.step >= 10 and b.value >= 1.5 * a.value  # rate-limited, each one worse
        assert "still worsening" in b.message
    cuts = [a for a in monitor.alerts if a.kind == "action" and "learning rate cut" in a.message]
    assert len(cuts) == len(loop)  # the action is repeated at every report
    assert monitor.optimizer.param_groups[0]["lr_scale"] == pytest.approx(0.5 ** len(loop))
    # never silent while it worsens: no gap of more than ~escalation.every + the ×1.5 time
    steps_per_x15 = math.log(1.5) / math.log(1.1)
    assert all(b.step - a.step <= 10 + steps_per_x15 + 1 for a, b in zip(loop, loop[1:]))
    assert monitor.verdict().line().startswith(f"run warned: loop unstable since step {first.step}")
    failed = monitor.verdict(val_loss=5.6, baseline=4.9).line()
    assert failed.startswith("run failed: validation loss 5.600 above the unigram baseline 4.900; "
                             f"loop unstable since step {first.step}")


def test_escalation_without_repeated_actions_still_reports():
    monitor, _ = loop_blowup_run(repeat_actions=False)
    loop = [a for a in monitor.alerts if a.kind == "loop_instability"]
    cuts = [a for a in monitor.alerts if a.kind == "action" and "learning rate cut" in a.message]
    assert len(loop) >= 3 and len(cuts) == 1


def test_stable_run_verdict_is_ok():
    model = tiny("diagonal")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with StabilityMonitor(model, opt, console=False) as monitor:
        for x, y in batches(8):
            opt.zero_grad()
            model(x, y).loss.backward()
            opt.step()
    assert monitor.verdict().line() == "run ok: no instability seen"
    assert monitor.verdict(val_loss=3.0, baseline=5.0).status == "ok"


def test_alerts_name_the_batch_and_snapshots_hold_the_rng_state():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = StabilityMonitor(model, opt, console=False, on_spike="rollback", snapshot_every=5)
    rng_after = {}
    for step, (x, y) in enumerate(batches(27), start=1):
        monitor.record_batch({"file": "shard-0", "row": 100 + step})
        loss = model(x, y).loss * (float("nan") if step == 26 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rng_after[step] = torch.get_rng_state().clone()  # the depth sampler draws from it
    monitor.close()
    nan = next(a for a in monitor.alerts if a.kind == "nonfinite" and a.signal == "grad_norm")
    assert nan.step == 26 and nan.data_position == {"file": "shard-0", "row": 126}
    assert nan.record()["data_position"] == {"file": "shard-0", "row": 126}
    assert monitor.rollbacks == [(26, 20)]
    snap = next(s for s in monitor.policy.snapshots.ring if s.step == 20)
    assert torch.equal(snap.rng["torch"], rng_after[snap.step])  # replay from here: same random depths
    assert snap.data_position == {"file": "shard-0", "row": 100 + snap.step + 1}


def test_history_exports_to_pandas():
    pd = pytest.importorskip("pandas")
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with StabilityMonitor(model, opt, console=False, spectral_every=2, update_dense=0, update_every=2) as monitor:
        for x, y in batches(4):
            opt.zero_grad()
            model(x, y).loss.backward()
            opt.step()
    frame = monitor.history.to_pandas()
    assert isinstance(frame, pd.DataFrame) and frame.index.name == "step"
    assert frame.index.tolist() == [1, 2, 3, 4]
    assert frame["loss"].tolist() == pytest.approx(monitor.history["loss"].values.tolist())
    assert frame["update_ratio"].isna().tolist() == [True, False, True, False]  # every 2 steps
