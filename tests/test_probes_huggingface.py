"""The Hugging Face TrainerCallback in a real (tiny) Trainer run (skipped without transformers)."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from loopdyn.probes.integrations.huggingface import StabilityTrainerCallback  # noqa: E402
from tests.test_probes_monitor import all_hook_dicts_empty, tiny  # noqa: E402


class Wrapped(nn.Module):
    def __init__(self, nan_at=None):
        super().__init__()
        self.lm = tiny()
        self.nan_at, self.calls = nan_at, 0

    def forward(self, input_ids, labels=None):
        self.calls += 1
        out = self.lm(input_ids, labels)
        loss = out.loss * (float("nan") if self.calls == self.nan_at else 1.0)
        return {"loss": loss, "logits": out.logits}


def run(tmp_path, model, callback, steps, **extra):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (32, 33), generator=g)
    dataset = [{"input_ids": row[:-1], "labels": row[1:]} for row in data]
    options = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, report_to=[],
                   save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    options.update(extra)
    args = transformers.TrainingArguments(**options)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    return trainer


def test_trainer_callback_records_the_run_and_detaches(tmp_path):
    model = Wrapped()
    callback = StabilityTrainerCallback(console=False)
    run(tmp_path, model, callback, 5)
    monitor = callback.monitor
    assert monitor.step == 5
    hist = monitor.history
    assert len(hist["loss"]) == 5 and len(hist["grad_norm"]) == 5 and len(hist["state_norm"]) == 5
    assert all_hook_dicts_empty(model, monitor.optimizer)


def test_trainer_callback_stop_ends_training(tmp_path):
    callback = StabilityTrainerCallback(console=False, on_spike="stop")
    trainer = run(tmp_path, Wrapped(nan_at=3), callback, 8)
    assert callback.monitor.stop_requested and trainer.state.global_step == 3


def test_trainer_callback_signals_reach_the_report_to_backends(tmp_path, monkeypatch):
    """report_to=["tensorboard"]: the Trainer's TensorBoard integration writes loopdyn's signals
    and alert counts next to its own metrics, with the monitor's values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = StabilityTrainerCallback(console=False, sync_every=1)
    logs = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logs))
    run(tmp_path, Wrapped(nan_at=3), callback, 5, report_to=["tensorboard"], logging_strategy="steps",
        logging_steps=1)
    event_dirs = {p.parent for p in logs.rglob("events.out.tfevents.*")}
    tags, values = set(), {}
    for d in event_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        if "train/loopdyn/state_norm" in acc.Tags()["scalars"]:
            values = {e.step: e.value for e in acc.Scalars("train/loopdyn/state_norm")}
    assert {"train/loopdyn/loss", "train/loopdyn/grad_norm", "train/loopdyn/state_norm"} <= tags, sorted(tags)
    assert "train/loopdyn/alerts/nonfinite" in tags
    hist = dict(callback.monitor.history["state_norm"])
    assert values and all(v == pytest.approx(hist[s], rel=1e-5) for s, v in values.items())
