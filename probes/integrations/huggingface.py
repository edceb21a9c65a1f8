"""Hugging Face Transformers: `StabilityTrainerCallback(**monitor_options)`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[StabilityTrainerCallback(on_spike="stop", alerts_path="alerts.jsonl")])

The monitor attaches in `on_train_begin` to the model and the optimiser the Trainer passes
(an accelerate wrapper is unwrapped). The loss is read from the model output's `.loss`.
The Trainer clips gradients before optimizer.step(), so `grad_norm` here is the clipped
norm. `stop` sets `control.should_training_stop`. Learning-rate cuts also scale the Trainer's
scheduler's base rates (`SchedulerLRCut`), which would otherwise undo them.

Framework loggers: in `on_log` the latest signals and running alert counts (`loopdyn/<signal>`,
`loopdyn/alerts/<kind>`) are added to the Trainer's log record. The callback moves itself in
front of the reporting integrations when training begins, so every `report_to` backend
(TensorBoard, W&B, MLflow, …) receives them with the Trainer's own metrics;
`log_signals=False` turns that off.

Needs `transformers` (pip install "loopdyn[hf]").
"""
from __future__ import annotations

import inspect

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from loopdyn.probes.actions import ParamGroupLRCut, SchedulerLRCut
from loopdyn.probes.monitor import StabilityMonitor
from loopdyn.probes.sinks import MetricsSink


def _unwrap_optimizer(optimizer):
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _calling_handler() -> CallbackHandler | None:
    """The CallbackHandler whose call_event is running this callback (found on the stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


class StabilityTrainerCallback(TrainerCallback):
    """A transformers TrainerCallback around probes.StabilityMonitor."""

    def __init__(self, log_signals: bool = True, **monitor_options):
        self.options = monitor_options
        self.log_signals = log_signals
        self.metrics = MetricsSink()
        self.monitor: StabilityMonitor | None = None

    @property
    def alerts(self):
        return [] if self.monitor is None else self.monitor.alerts

    def _go_first(self) -> None:
        """Run on_log before the reporting integrations, so they see what we add to `logs`."""
        handler = _calling_handler()
        if handler is None or self not in handler.callbacks:
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(1 if handler.callbacks else 0, self)  # after DefaultFlowCallback

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        if self.log_signals:
            self._go_first()
        if model is not None:
            opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
            cut = None
            if opt is not None:
                cut = SchedulerLRCut(opt, lr_scheduler) if lr_scheduler is not None else ParamGroupLRCut(opt)
            self.monitor = StabilityMonitor(model, opt, sinks=[self.metrics] if self.log_signals else (),
                                            lr_cut=cut, **self.options)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.record_batch({"global_step": state.global_step, "epoch": state.epoch})
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and self.log_signals and isinstance(logs, dict):
            self.monitor.flush()
            logs.update(self.metrics.pop())
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None and self.monitor.stop_requested:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
        return control
