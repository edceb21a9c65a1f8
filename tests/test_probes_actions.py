"""Actions and sinks: skip really leaves the parameters (and Adam's moments) untouched,
rollback really undoes the damage, stop/raise/cut-lr, the JSON Lines and console sinks."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from loopdyn.data import load_text
from loopdyn.train import TrainConfig, train
from loopdyn.probes import ALERT_FIELDS, InstabilityError, StabilityMonitor, TensorBoardSink
from tests.test_probes_monitor import batches, tiny


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())}
    return params, state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]) for i in sa)


@pytest.mark.parametrize("fault", ["gradient burst", "nan loss"])
def test_skip_leaves_parameters_and_optimizer_state_exactly_unchanged(fault):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    monitor = StabilityMonitor(model, opt, console=False, on_spike="skip")
    bad_step = 26
    states = {}
    for step, (x, y) in enumerate(batches(30), start=1):
        loss = model(x, y).loss
        if step == bad_step:
            loss = loss * 1e4 if fault == "gradient burst" else loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        states[step] = snapshot(model, opt)
        opt.step()
        states[step, "after"] = snapshot(model, opt)
        assert monitor.last_step_skipped == (step == bad_step), step
    monitor.close()
    assert same(states[bad_step], states[bad_step, "after"])  # the bad step changed nothing
    assert not same(states[bad_step - 1], states[bad_step - 1, "after"])  # normal steps do change
    assert not same(states[bad_step + 1], states[bad_step + 1, "after"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert monitor.skipped_steps == 1 and monitor.history["skipped"].steps.tolist() == [bad_step]
    actions = [a for a in monitor.alerts if a.kind == "action"]
    assert len(actions) == 1 and f"skipped step {bad_step}" in actions[0].message


def test_rollback_restores_a_good_state_and_the_loss_recovers():
    """The real trainer; after step 40 the weights are corrupted (a bad update). The loss
    spikes at step 41, the monitor rolls back to its last snapshot, and the loss returns to
    its pre-spike level."""
    data = load_text(max_bytes=400_000)
    model = tiny(seed=1)
    monitors = []

    def factory(m, opt):
        monitors.append(StabilityMonitor(m, opt, console=False, on_spike="rollback", snapshot_every=10))
        return monitors[0]

    def on_step(step, record):
        if step == 40:
            with torch.no_grad():
                g = torch.Generator().manual_seed(0)
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 3 * p.detach().float().std().clamp_min(0.05))

    cfg = TrainConfig(steps=50, batch_size=8, seq_len=32, lr=3e-3, eval_every=0, progress=False, warmup_steps=5)
    result = train(model, data, cfg, monitor_factory=factory, on_step=on_step)
    monitor = monitors[0]
    losses = np.array(result.losses)
    before = np.median(losses[30:40])
    assert losses[40] > before + 1.0  # step 41: the spike
    # At step 41, back to the snapshot after step 30: the state after step 40 produced the spike.
    assert monitor.rollbacks == [(41, 30)]
    assert np.median(losses[42:50]) < before + 0.25  # recovered
    spikes = [a for a in monitor.alerts if a.kind == "spike"]
    assert "loss" in {a.signal for a in spikes} and {a.step for a in spikes} == {41}


def test_stop_and_raise(tmp_path):
    def run(action):
        model = tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        monitor = StabilityMonitor(model, opt, console=False, on_spike=action)
        for step, (x, y) in enumerate(batches(6), start=1):
            loss = model(x, y).loss * (float("nan") if step == 4 else 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if monitor.stop_requested:
                break
        monitor.close()
        return monitor, step

    monitor, step = run("stop")
    assert step == 4 and monitor.stop_requested and "nonfinite" in monitor.stop_reason
    with pytest.raises(InstabilityError) as err:
        run("raise")
    assert err.value.alert.kind == "nonfinite" and err.value.alert.step == 4


def test_trainer_honours_stop_and_lr_cut(tmp_path):
    data = load_text(max_bytes=300_000)
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=2e-3, eval_every=0, progress=False, warmup_steps=1,
                      min_lr_ratio=1.0, log_path=str(tmp_path / "log.jsonl"))

    def corrupt_at(step_to_break):
        def on_step(step, record):
            if step == step_to_break:
                with torch.no_grad():
                    model.lm_head.weight.mul_(40.0)
        return on_step

    model = tiny()
    result = train(model, data, cfg, monitor_factory=lambda m, o: StabilityMonitor(m, o, console=False, on_spike="stop"),
                   on_step=corrupt_at(24))
    assert result.steps == 25 and "monitor" in result.stop_reason
    model = tiny()
    monitors = []
    result = train(model, data, cfg, on_step=corrupt_at(24), monitor_factory=lambda m, o: monitors.append(
        StabilityMonitor(m, o, console=False, on_spike="cut_lr")) or monitors[-1])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert result.steps == 30
    assert lrs[24] == pytest.approx(lrs[23]) and lrs[25] == pytest.approx(lrs[23] / 2)  # cut after step 25
    assert any("learning rate cut" in a.message for a in monitors[0].alerts)


def test_jsonl_sink_writes_whole_lines_with_the_contract_fields(tmp_path, capsys):
    path = tmp_path / "alerts.jsonl"
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, alerts_path=str(path), console=True, on_spike="skip")
    for step, (x, y) in enumerate(batches(25), start=1):
        loss = model(x, y).loss * (float("inf") if step in (22, 24) else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 22:
            lines = path.read_bytes()  # complete on disk before close
            assert lines.endswith(b"\n") and len(lines.splitlines()) >= 1
    monitor.close()
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode().splitlines()]
    assert records and all(list(r)[: len(ALERT_FIELDS)] == list(ALERT_FIELDS) for r in records)
    assert all(set(list(r)[len(ALERT_FIELDS):]) <= {"lead_time", "detected_step", "data_position", "escalation"}
               for r in records)
    assert {r["data_position"]["batch_index"] for r in records} == {21, 23}  # 0-based: the 22nd and 24th batch
    nonfinite = [r for r in records if r["kind"] == "nonfinite" and r["signal"] == "grad_norm"]
    assert {r["step"] for r in nonfinite} == {22, 24} and all(r["value"] is None for r in nonfinite)
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("loopdyn probe: ")]) == len(records)


def test_tensorboard_sink_is_skipped_cleanly_without_tensorboard(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(RuntimeWarning, match="TensorBoard sink disabled"):
        sink = TensorBoardSink(tmp_path)
    assert not sink.enabled
    sink.signals(1, {"loss": 1.0})
    sink.close()
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning):
        monitor = StabilityMonitor(model, opt, console=False, tensorboard_dir=str(tmp_path / "tb"))
    for x, y in batches(2):
        model(x, y).loss.backward()
        opt.step()
    monitor.close()
    assert monitor.step == 2 and not math.isnan(monitor.history["loss"].values[-1])


def test_tensorboard_sink_writes_the_signals_and_alerts_it_was_given(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, console=False, tensorboard_dir=str(tmp_path / "tb"), sync_every=2)
    for x, y in batches(6):
        opt.zero_grad()
        model(x, y).loss.backward()
        opt.step()
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "probes/loss" in scalars and "probes/grad_norm" in scalars
    written = {e.step: e.value for e in events.Scalars("probes/loss")}
    recorded = dict(monitor.history["loss"])
    assert set(written) == set(recorded) and len(written) == 6
    for step, value in recorded.items():
        assert written[step] == pytest.approx(value, rel=1e-6)
