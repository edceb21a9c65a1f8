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

The inputs: the monitor hooks the model the Trainer calls — with `torch_compile=True` that is
the compiled wrapper (`trainer.model_wrapped`, found on the call stack), whose hooks run outside
the compiled frame and see `input_ids`; the monitor is then in compile-safe mode (its own eager
probe pass, loopdyn.probes.probe_pass) and no hook touches the compiled model.

Needs `transformers` (pip install "loopdyn[hf]").
"""
from __future__ import annotations

import inspect
import logging

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from loopdyn.probes.actions import ParamGroupLRCut, SchedulerLRCut
from loopdyn.probes.monitor import StabilityMonitor
from loopdyn.probes.sinks import MetricsSink

log = logging.getLogger("loopdyn.probes")


def _unwrap_optimizer(optimizer):
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _on_stack(cls):
    """The innermost `self` of type `cls` among the calling frames (the CallbackHandler whose
    call_event runs this callback, the Trainer that runs it)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, cls):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _calling_handler() -> CallbackHandler | None:
    return _on_stack(CallbackHandler)


def _called_model(model, args):
    """The module the Trainer calls in training: with torch_compile the compiled wrapper around
    `model` (trainer.model_wrapped), else `model`."""
    if not getattr(args, "torch_compile", False):
        return model
    from transformers import Trainer

    trainer = _on_stack(Trainer)
    wrapped = getattr(trainer, "model_wrapped", None)
    if isinstance(wrapped, torch.nn.Module) and any(m is model for m in wrapped.modules()):
        return wrapped
    return model


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
            options = dict(self.options)
            called = _called_model(model, args)
            if getattr(args, "torch_compile", False):
                options.setdefault("compile_safe", True)  # whatever module we find: never hook compiled code
                if called is model:  # the compiled wrapper is out of sight: a hook on `model` runs inside it
                    options["hook_inputs"] = False
                    log.warning("loopdyn: StabilityTrainerCallback cannot find the compiled model this Trainer calls, "
                                "so it hooks nothing (a hook inside the compiled frame would recompile it): no loss "
                                "and no token ids reach the monitor. Fix: give them from the training step "
                                "(callback.monitor.record_loss(loss), callback.monitor.record_inputs(input_ids)).")
            self.monitor = StabilityMonitor(called, opt,
                                            sinks=[self.metrics] if self.log_signals else (), lr_cut=cut, **options)
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
