"""The PyTorch Lightning callback in a real (tiny) Lightning run."""
import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from loopdyn.probes.integrations.lightning import StabilityCallback  # noqa: E402
from tests.test_probes_monitor import all_hook_dicts_empty, tiny  # noqa: E402


class TinyLM(pl.LightningModule):
    def __init__(self, nan_at=None):
        super().__init__()
        self.model = tiny()
        self.nan_at = nan_at
        self.params_at = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model(x, y).loss
        if self.nan_at is not None and self.global_step + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.params_at[self.global_step + 1] = [p.detach().clone() for p in self.parameters()]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loader(n=8):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (n * 4, 33), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)


def fit(module, callback, steps):
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader())
    return trainer


def test_lightning_callback_records_the_run_and_detaches():
    module = TinyLM()
    callback = StabilityCallback(console=False)
    fit(module, callback, 6)
    monitor = callback.monitor
    assert monitor.step == 6
    hist = monitor.history
    assert len(hist["loss"]) == 6 and len(hist["grad_norm"]) == 6 and len(hist["state_norm"]) == 6
    assert all_hook_dicts_empty(module, monitor.optimizer)
    state = callback.state_dict()
    assert state["step"] == 6 and "detectors" in state


def test_lightning_skip_prevents_the_bad_update():
    module = TinyLM(nan_at=5)
    callback = StabilityCallback(console=False, on_spike="skip")
    fit(module, callback, 7)
    before5, before6 = module.params_at[5], module.params_at[6]
    assert all(torch.equal(a, b) for a, b in zip(before5, before6))  # step 5 changed nothing
    assert callback.monitor.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(module.params_at[4], before5))  # others do change
