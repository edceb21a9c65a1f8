"""Hugging Face Transformers: `StabilityTrainerCallback(**monitor_options)`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[StabilityTrainerCallback(on_spike="stop", alerts_path="alerts.jsonl")])

The monitor attaches in `on_train_begin` to the model and the optimiser the Trainer passes
(an accelerate wrapper is unwrapped). The loss is read from the model output's `.loss`.
The Trainer clips gradients before optimizer.step(), so `grad_norm` here is the clipped
norm. `stop` sets `control.should_training_stop`.

Needs `transformers` (pip install "loopdyn[hf]").
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from loopdyn.probes.monitor import StabilityMonitor


def _unwrap_optimizer(optimizer):
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class StabilityTrainerCallback(TrainerCallback):
    """A transformers TrainerCallback around probes.StabilityMonitor."""

    def __init__(self, **monitor_options):
        self.options = monitor_options
        self.monitor: StabilityMonitor | None = None

    @property
    def alerts(self):
        return [] if self.monitor is None else self.monitor.alerts

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        if model is not None:
            self.monitor = StabilityMonitor(model, _unwrap_optimizer(optimizer) if optimizer is not None else None,
                                            **self.options)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None and self.monitor.stop_requested:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        return control
