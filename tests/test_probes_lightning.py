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


def fit(module, callback, steps, logger=False):
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], accelerator="cpu", logger=logger, log_every_n_steps=1,
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
    assert state["step"] == 6 and "detectors" in state["policy"]


def test_lightning_skip_prevents_the_bad_update():
    module = TinyLM(nan_at=5)
    callback = StabilityCallback(console=False, on_spike="skip")
    fit(module, callback, 7)
    before5, before6 = module.params_at[5], module.params_at[6]
    assert all(torch.equal(a, b) for a, b in zip(before5, before6))  # step 5 changed nothing
    assert callback.monitor.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(module.params_at[4], before5))  # others do change


def test_lightning_callback_reports_through_the_trainers_loggers(tmp_path):
    """Signals and alert counts reach a logger configured on the Trainer (here CSV): the
    values written are the monitor's own history at those steps."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    module = TinyLM(nan_at=5)
    callback = StabilityCallback(console=False, on_spike="skip", sync_every=2)
    logger = CSVLogger(str(tmp_path), name="run")
    fit(module, callback, 7, logger=logger)
    rows = list(csv.DictReader(open(logger.experiment.metrics_file_path)))
    loss_rows = [(int(r["step"]), float(r["loopdyn/loss"])) for r in rows if r.get("loopdyn/loss")]
    assert len(loss_rows) >= 3
    hist = dict(callback.monitor.history["loss"])
    finite = {s: v for s, v in hist.items() if v == v}
    logged = [v for _, v in loss_rows]
    assert all(any(v == pytest.approx(h, rel=1e-5) for h in finite.values()) for v in logged)
    counts = [float(r["loopdyn/alerts/nonfinite"]) for r in rows if r.get("loopdyn/alerts/nonfinite")]
    assert counts and max(counts) >= 1  # the NaN step's alert was counted
    assert "loopdyn/grad_norm" in rows[0] and "loopdyn/state_norm" in rows[0]
