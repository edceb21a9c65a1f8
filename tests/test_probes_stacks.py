"""The monitor inside the training stacks people use, for real (not mocked): a Lightning
Trainer whose training_step calls a submodule (eager and torch.compile'd) with a CSVLogger,
the Hugging Face Trainer with torch_compile=True, an accelerate loop with a dynamo backend.
Each run monitors a user's own looped network through LoopAdapter (no state tap: the loop
signals come from the monitor's probe pass, which needs the batch's token ids), checks that the
loop signals reach the framework's logger, and that a learning-rate jump is warned at its step.
(The plain torch.compile loop: test_probes_compile.py; torchrun + FSDP2 + compile:
test_probes_fsdp_compile.py.)"""
import contextlib
import csv
import logging

import pytest
import torch

from tests.stack_models import LOOP_SIGNALS, UserLoopNet, adapter, token_batches

BACKEND = "aot_eager"  # dynamo traces for real; the backend only keeps the tests fast
JUMP = 24


@contextlib.contextmanager
def probe_warnings(caplog):
    """The warnings of the `loopdyn.probes` logger, as messages filled in on exit. That logger stops
    propagating to the root once it has its own console handler (an earlier test may have made
    it), so caplog's handler is attached to it directly; a record seen twice (propagated and
    direct) is kept once."""
    log = logging.getLogger("loopdyn.probes")
    log.addHandler(caplog.handler)
    messages: list[str] = []
    try:
        with caplog.at_level("WARNING", logger="loopdyn.probes"):
            yield messages
    finally:
        log.removeHandler(caplog.handler)
        messages.extend(r.getMessage() for r in {id(r): r for r in caplog.records}.values())


def lr_warning(alerts):
    return [a.step for a in alerts if a.kind == "spike_warning" and a.signal == "lr"]


# ---- Lightning -------------------------------------------------------------------------------
pl = pytest.importorskip("pytorch_lightning")


class LitUser(pl.LightningModule):
    """training_step calls the submodule (`self.net(x, y)`), never `self(...)`."""

    def __init__(self, compiled: bool):
        super().__init__()
        self.net = UserLoopNet()
        self.loop = adapter(self.net)
        if compiled:
            self.net = torch.compile(self.net, backend=BACKEND)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.net(x, y)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step + 1 == JUMP:
            for g in self.optimizers().optimizer.param_groups:
                g["lr"] *= 10

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=3e-3)


@pytest.mark.parametrize("compiled", [False, True])
def test_lightning_submodule_step_csv_logger_gets_the_loop_signals(tmp_path, compiled):
    from pytorch_lightning.loggers import CSVLogger

    from loopdyn.probes.integrations.lightning import StabilityCallback

    module = LitUser(compiled)
    callback = StabilityCallback(console=False, loop=module.loop, loop_every=5, sync_every=5)
    logger = CSVLogger(str(tmp_path), name="run")
    data = token_batches(32)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
        batch_size=4)
    trainer = pl.Trainer(max_steps=32, callbacks=[callback], accelerator="cpu", logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    monitor = callback.monitor
    assert monitor.compile_safe == compiled
    rows = list(csv.DictReader(open(logger.experiment.metrics_file_path)))
    for name in LOOP_SIGNALS + ("injection_radius", "loss", "lr"):
        logged = [float(r[f"loopdyn/{name}"]) for r in rows if r.get(f"loopdyn/{name}")]
        assert logged, f"loopdyn/{name} not in the CSV"
    hist = dict(monitor.history["state_norm"])
    assert sorted(hist) == [5, 10, 15, 20, 25, 30]
    assert lr_warning(monitor.alerts)[:1] == [JUMP]
    assert list(monitor.coverage().missing) == ["attention logits"], monitor.coverage().line()  # none in the net


def test_lightning_without_token_ids_says_so_once(tmp_path, caplog):
    """A batch without an integer (B, S) tensor: one log line at the first step names the
    missing piece and the fix; coverage() and the run verdict repeat it."""
    from loopdyn.probes.integrations.lightning import StabilityCallback

    class FloatBatches(LitUser):
        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x.long(), x.long())

    module = FloatBatches(False)
    callback = StabilityCallback(console=False, loop=module.loop)
    data = torch.cat([x for x, _ in token_batches(4)]).float()
    trainer = pl.Trainer(max_steps=4, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with probe_warnings(caplog) as messages:
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4))
    lines = [m for m in messages if "not measured" in m]
    assert len(lines) == 1 and "token ids" in lines[0] and "record_inputs" in lines[0] and "batch_to_ids" in lines[0]
    cov = callback.monitor.coverage()
    assert "loop state" in cov.missing and "injection spectrum" in cov.measured
    assert "token ids" in callback.monitor.verdict().line()


# ---- Hugging Face --------------------------------------------------------------------------------
class HFUser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = UserLoopNet()

    def forward(self, input_ids, labels=None):
        logits = self.net(input_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("wrapper_found", [True, False])
def test_huggingface_trainer_torch_compile_logs_the_loop_signals(tmp_path, monkeypatch, caplog, wrapper_found):
    """With the compiled wrapper found, the monitor hooks it (outside the compiled frame). When it
    is not found (a trainer the callback does not recognise), a hook on the model would run inside
    the compiled frame (dynamo traced it and recompiled as the monitor's state changed, 3 → 11
    graphs over the first 8 steps): the callback then hooks nothing and says so once, and the
    compiled model stays compiled."""
    transformers = pytest.importorskip("transformers")
    from torch._dynamo.utils import counters

    from loopdyn.probes.integrations import huggingface
    from loopdyn.probes.integrations.huggingface import StabilityTrainerCallback

    if not wrapper_found:
        monkeypatch.setattr(huggingface, "_called_model", lambda model, args: model)
    torch._dynamo.reset()  # no compiled code from an earlier test
    counters.clear()

    class Jump(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            if state.global_step + 1 == JUMP:
                for g in optimizer.param_groups:
                    g["lr"] *= 10
                lr_scheduler.base_lrs = [10 * b for b in lr_scheduler.base_lrs]

    class Record(transformers.TrainerCallback):
        logs, graphs = [], []

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

        def on_step_end(self, args, state, control, **kw):
            self.graphs.append((state.global_step, counters["stats"]["unique_graphs"]))

    model = HFUser()
    callback = StabilityTrainerCallback(console=False, loop=adapter(model.net), loop_every=5)
    data = torch.cat([x for x, _ in token_batches(32)])
    dataset = [{"input_ids": row, "labels": row} for row in data]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=32, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", logging_strategy="steps",
                                          logging_steps=1, disable_tqdm=True, use_cpu=True,
                                          lr_scheduler_type="constant", learning_rate=3e-3, torch_compile=True,
                                          torch_compile_backend=BACKEND)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback, Jump(), Record()])
    with probe_warnings(caplog) as messages:
        trainer.train()
    monitor = callback.monitor
    assert monitor.compile_safe and (monitor.model is trainer.model_wrapped) == wrapper_found
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    graphs = [n for _, n in Record.graphs]
    assert graphs[0] >= 1 and len(set(graphs)) == 1, Record.graphs  # compiled at the first step, never again
    assert lr_warning(monitor.alerts)[:1] == [JUMP]  # the optimiser's signals need no hook
    logged = {k for rec in Record.logs for k in rec}
    told = [m for m in messages if "cannot find the compiled model" in m]
    if wrapper_found:
        assert {f"loopdyn/{n}" for n in LOOP_SIGNALS} <= logged, sorted(logged)
        assert list(monitor.coverage().missing) == ["attention logits"], monitor.coverage().line()  # none in the net
        assert not told
    else:
        assert len(told) == 1 and "record_inputs" in told[0]
        assert {"loss", "loop state"} <= set(monitor.coverage().missing), monitor.coverage().line()


# ---- accelerate ----------------------------------------------------------------------------------
def test_accelerate_loop_with_a_dynamo_backend_logs_the_loop_signals(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.tracking import GeneralTracker

    from loopdyn.probes import MetricsSink, StabilityMonitor

    class Tracker(GeneralTracker):
        name, requires_logging_directory = "memory", False

        def __init__(self):
            super().__init__()
            self.records = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.records.append((step, dict(values)))

    tracker = Tracker()
    acc = accelerate.Accelerator(cpu=True, dynamo_backend=BACKEND, log_with=[tracker])
    acc.init_trackers("run")
    net = UserLoopNet()
    loop = adapter(net)
    model, opt = acc.prepare(net, torch.optim.AdamW(net.parameters(), lr=3e-3))
    sink = MetricsSink()
    monitor = StabilityMonitor(model, opt, console=False, loop=loop, loop_every=5, sinks=[sink])
    for step, (x, y) in enumerate(token_batches(32), start=1):
        if step == JUMP:
            for g in opt.param_groups:
                g["lr"] *= 10
        loss = model(x, y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        acc.log(sink.pop(), step=step)
    monitor.close()
    acc.end_training()
    assert monitor.compile_safe
    logged = {k for _, rec in tracker.records for k in rec}
    assert {f"loopdyn/{n}" for n in LOOP_SIGNALS} <= logged, sorted(logged)
    assert lr_warning(monitor.alerts)[:1] == [JUMP]
