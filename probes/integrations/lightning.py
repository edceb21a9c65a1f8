"""PyTorch Lightning: `StabilityCallback(**monitor_options)` attaches a StabilityMonitor.

    trainer = pl.Trainer(callbacks=[StabilityCallback(on_spike="skip", alerts_path="alerts.jsonl")])

The monitor hooks the LightningModule (and the looped model inside it, if any) and the first
optimiser. Lightning runs forward and backward inside optimizer.step(closure), so the
gradient signals, the learning-rate precursors and the skip decision are taken in
`on_before_optimizer_step` (after the backward pass, before the update and before Lightning's
gradient clipping: the norm is the unclipped one). The loss comes from the model output's
`.loss` when it has one, else from `on_before_backward`. `stop` sets `trainer.should_stop`.

The batch's token ids reach the monitor in `on_train_batch_start`, whatever `training_step`
calls (`self(x)`, `self.net(x)`, a torch.compile'd submodule): the first integer tensor of shape
(B, S) in the batch (tuples, lists and dicts are searched, `input_ids` first), or
`batch_to_ids(batch)` when given. A compiled module in the LightningModule puts the monitor in
compile-safe mode (loopdyn.probes.probe_pass).

Framework loggers: at each of the monitor's sync points the latest signals and running alert
counts are logged through `pl_module.log` (names `loopdyn/<signal>`, `loopdyn/alerts/<kind>`),
so every logger configured on the Trainer (CSV, TensorBoard, W&B, MLflow, …) receives them;
`log_signals=False` turns that off. The batch index is the data position named in alerts. The
monitor's statistics are saved in Lightning checkpoints (callback state) and restored on resume.

Needs `pytorch_lightning` (pip install "loopdyn[lightning]"); the `lightning` package
(`lightning.pytorch`) works as well.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

try:
    import pytorch_lightning as pl
except ImportError:  # the unified package
    import lightning.pytorch as pl

from loopdyn.probes.monitor import StabilityMonitor
from loopdyn.probes.sinks import MetricsSink


def first_token_ids(batch, depth: int = 3):
    """The first integer tensor of shape (B, S) in a batch (`input_ids` first in a mapping)."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() == 2 and not batch.is_floating_point() and batch.dtype != torch.bool else None
    if depth <= 0:
        return None
    if isinstance(batch, Mapping):
        items = [batch["input_ids"]] if "input_ids" in batch else []
        items += list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for item in items:
        found = first_token_ids(item, depth - 1)
        if found is not None:
            return found
    return None


class StabilityCallback(pl.Callback):
    """A Lightning callback around probes.StabilityMonitor (keyword arguments = monitor options).

    batch_to_ids: batch → token ids (B, S) for the probe pass, when the batch holds several
    integer (B, S) tensors and the first is not the input.
    """

    def __init__(self, log_signals: bool = True, batch_to_ids=None, **monitor_options):
        super().__init__()
        self.options = monitor_options
        self.batch_to_ids = batch_to_ids
        self.log_signals = log_signals
        self.metrics = MetricsSink()
        self.monitor: StabilityMonitor | None = None
        self._restored: dict | None = None

    @property
    def alerts(self):
        return [] if self.monitor is None else self.monitor.alerts

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = StabilityMonitor(pl_module, optimizer, sinks=[self.metrics] if self.log_signals else (),
                                        **self.options)
        if self._restored:
            self.monitor.load_state_dict(self._restored)
            self._restored = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.monitor is not None:
            self.monitor.record_batch({"epoch": trainer.current_epoch, "batch_idx": batch_idx})
            ids = self.batch_to_ids(batch) if self.batch_to_ids is not None else first_token_ids(batch)
            if ids is not None:
                self.monitor.record_inputs(ids)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.monitor is not None:
            self.monitor.record_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is not None:
            self.monitor.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        if self.log_signals:
            metrics = self.metrics.pop()
            if metrics and trainer.loggers:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=True)
        if self.monitor.stop_requested:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def state_dict(self) -> dict:
        return self.monitor.state_dict() if self.monitor is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict) if state_dict else None
