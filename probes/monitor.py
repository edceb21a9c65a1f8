"""StabilityMonitor: live-training signals, alert families and actions, attached by hooks.

    monitor = probes.StabilityMonitor(model, optimizer)        # defaults: watch and warn
    for x, y in batches:
        loss = model(x, y).loss                                 # .loss is read by a hook
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if monitor.stop_requested: break
    monitor.close()                                             # or `with StabilityMonitor(...)`
    monitor.alerts, monitor.history["state_norm"], monitor.verdict()

Any looped model: `loop=` takes a `loopdyn.models.LoopedModel` (a `LoopAdapter` around your own
network, say); without it the monitor looks for one inside `model`
(`loopdyn.models.protocol.find_looped_model`). The loop signals come only through the protocol.

The monitor is a small façade over three parts, each with one concern:
    loopdyn.probes.bus      SignalBus: hooks, per-step device values, host sync
    loopdyn.probes.policy   Policy: detectors → alert families → actions, agreed across ranks
    loopdyn.probes.sinks    where alerts and signals go (logging, JSON Lines, TensorBoard, …)

Signals (name: when, where from)
    loss            every step   model output `.loss` (forward hook), else `record_loss()`
    grad_norm       every step   ‖∇θ‖₂ before the step (`record_grad_norm()` from a trainer
                                 that clips, else computed from .grad in the step pre-hook)
    update_ratio    every step of the first `update_dense` (50), then every `update_every` (20):
                                 ‖Δθ‖₂/‖θ‖₂ over all parameters, and update_ratio/<group>;
                                 needs a copy of θ before the step (the monitor's largest cost,
                                 hence the cadence; a too-short warm-up shows in the first ones)
    lr              every step   group 0's learning rate (every group's lr and settings are
                                 also read in the pre-hook, before the update: OptimizerWatch)
    state_norm      every step   mean over batch and tokens of ‖h_T‖₂ (the final state)
    state_norm_max  every `loop_every` steps (10): the largest per-loop mean ‖h_t‖₂
    rel_residual    every step   mean ‖h_T − h_{T−1}‖₂ / mean ‖h_T‖₂
    state_growth    every step   mean ‖h_T‖ / mean ‖h_{T−1}‖ (per-loop growth at the trained depth)
                    (the four loop-state signals: every step from the LoopedModel's `state_tap`;
                    without a tap, every `loop_every` steps from a probe unroll of the first
                    `loop_batch` sequences of the last batch; in compile-safe mode every 20
                    steps on 1 sequence)
    logz            every step   mean over tokens of log Σ exp(logits) (output log-partition)
    injection_norm, injection_radius   ‖Ā‖₂ and ρ(Ā) of `linear_part()` (Operator.norm() /
                                 radius()): every step on the CPU when cheap, else every
                                 `spectral_every` steps (‖Ā‖₂ estimated per step in between)
    attn_logit_max  every `attention_every` steps: largest causal pre-softmax logit over the
                                 attention modules that offer `max_logit`
    embed_outliers  every `spectral_every` steps: fraction of embedding entries > 6·RMS
    jacobian_norm   every `jacobian_every` steps: σ_max of ∂step/∂h at a fixed probe input, at
                                 h_{T−1}, T = mean_loops; a warm-started power-iteration bound
    skipped         1 when the monitor skipped the step

Sync cadence: per-step values are 0-d tensors left on the device; the host reads them
asynchronously (CUDA: pinned memory and an event, polled) and blocks at most every
`sync_every` steps. Skip mode reads the pre-step signals before every step (one sync per
step). Under torch.distributed, actions are agreed across ranks (all_reduce MAX) every
`sync_every` steps, or every step in skip mode and in "heightened watch".

torch.compile: when the model or a module inside it is compiled (or `compile_safe=True`), no
hook is put on compiled code and none is added or removed while training; every activation
signal above (the four loop-state signals, logz, attn_logit_max, jacobian_norm) comes from the
monitor's own eager probe pass (loopdyn.probes.probe_pass) every `loop_every` steps (attention
every `attention_every`), outside the compiled graph, through the LoopedModel protocol; the
gradient, update and learning-rate signals come from the optimiser as always. The token ids
reach the monitor through a hook on the compile wrapper (which runs outside the compiled frame),
the Lightning / Hugging Face integrations, or `record_inputs(idx)`.

Coverage: what cannot be measured (no token ids, no `linear_part`, no `decode`, no loss, …) is
logged once, at the first step, in one line naming the missing piece and the fix;
`coverage()` lists what is measured and what is not; the run verdict repeats it.

Hooks record only training forwards: the root module in training mode, autograd enabled, no
torch.func transform active, the monitor not paused (`with monitor.pause()`). A probe that
raises is disabled with one warning; training continues. The monitor changes nothing in the
run unless an action other than "warn"/"log" is configured.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable

import torch
from torch import nn

from loopdyn.dynamics.verdict import RunStatus, run_line, run_status, validation_failure
from loopdyn.probes.actions import ACTIONS, LRCut, ParamGroupLRCut, SnapshotRing
from loopdyn.probes.alerts import Alert, InstabilityError
from loopdyn.probes.bus import SignalBus
from loopdyn.probes.coverage import Coverage, coverage
from loopdyn.probes.detectors import EarlyWarningDetector, LoopInstabilityDetector, SpikeDetector
from loopdyn.probes.distributed import world
from loopdyn.probes.history import History
from loopdyn.probes.policy import Policy
from loopdyn.probes.sinks import ConsoleSink, JsonlSink, Sink, TensorBoardSink

log = logging.getLogger("loopdyn.probes")


def _loss_spike() -> SpikeDetector:
    return SpikeDetector("loss", min_rel=0.05)


def _grad_spike() -> SpikeDetector:
    return SpikeDetector("grad_norm", min_rel=2.0)


def _early_warning() -> EarlyWarningDetector:
    return EarlyWarningDetector(warmup=15)


@dataclass
class MonitorConfig:
    """Every knob of the monitor, with defaults meant to be left on.

    The detectors are nested, each with its own documented constructor arguments (None turns
    one off); the monitor works on copies, so one config can serve many monitors. A nested
    field is also set by a dotted keyword, e.g. `StabilityMonitor(model, opt,
    **{"early_warning.warmup": 30, "loss_spike.method": "ema"})`.

    Defaults and why (figures from bench/probe_overhead.py and bench/spike_scenarios.py):
    - loss_spike: robust z ≥ 6 over 128 steps after 20 warm-up steps (OLMo-core's 6σ/128, with
      median/MAD so an earlier spike does not inflate the scale); the loss must also be ≥ 5 %
      above its median (min_rel=0.05).
    - grad_spike: the same statistic, and also ≥ 3× its median (min_rel=2.0: small-batch runs
      have hard batches). It is never an alert on its own — only an early-warning precursor (and
      a skip trigger in skip mode).
    - early_warning: one strong or two moderate precursors (EarlyWarningDetector), relative
      ones from step 15 (bench: 0 false alarms in 2,400 stable steps at 15; at 30 the
      linear-injection run at lr 0.05 was warned 6 steps after its loss broke); a learning-rate
      jump ≥ 3× (optimizer.jump) is strong and seen before the step; loss_rise off (on the stable
      bench runs a hard stretch of text raises the loss 0.3-0.4 nats with a gradient spike).
    - loop_instability: ρ(Ā) > 1, or the state growing ≥ ×1.5 per loop five times in a row
      (LoopInstabilityDetector).
    - escalation (each detector's `escalation`): after a first report, again each time the
      evidence worsened ×1.5, at most every 10 steps, severity critical, the action repeated
      when `repeat_actions`.
    - rollback: a CPU snapshot every 50 steps, a ring of 2.
    """

    # cadence
    sync_every: int = 10
    spectral_every: int = 10
    attention_every: int = 20
    jacobian_every: int = 200
    jacobian_iters: int = 3
    jacobian_tokens: int = 32
    attention_batch: int = 2  # sequences whose attention logits are recomputed
    loop_every: int | None = None  # the probe pass (a loop without a state tap, or compile-safe mode)
    # and the hook mode's per-loop norms; None: 10, or 20 in compile-safe mode
    loop_batch: int | None = None  # sequences of the last batch in the probe pass; None: 2, or 1 in
    # compile-safe mode, where the eager pass is the monitor's main cost (there every 20 steps and on
    # one sequence: 0.45 % of a compiled `small` step; every 10 on two: 1.3 %, bench/probe_overhead.py)
    compile_safe: bool | None = None  # None: on when the model or a module in it is torch.compile'd
    hook_inputs: bool = True  # False: no hook on the model (its loss and token ids then come from
    # record_loss / record_inputs); the Hugging Face callback sets it when the model the Trainer
    # calls is compiled but out of its sight (a hook inside a compiled frame would be traced)
    update_ratio: bool = True
    update_every: int = 20
    update_dense: int = 50  # every step until then
    disable: tuple = ()  # signal names (or probe names) not to record
    # detectors (None: off)
    loss_spike: SpikeDetector | None = field(default_factory=_loss_spike)
    grad_spike: SpikeDetector | None = field(default_factory=_grad_spike)
    early_warning: EarlyWarningDetector | None = field(default_factory=_early_warning)
    loop_instability: LoopInstabilityDetector | None = field(default_factory=LoopInstabilityDetector)
    repeat_actions: bool = True
    # actions: warn (log and record) | log (record and write to files, no console line) |
    # raise | stop | skip | rollback | cut_lr
    on_spike: str = "warn"  # loss spikes (and gradient-norm anomalies in skip mode)
    on_nonfinite: str | None = None  # None: as on_spike
    on_warning: str = "warn"  # spike warnings
    on_loop: str | None = None  # loop_instability; None: as on_warning
    lr_cut: float = 0.5  # cut_lr factor
    rollback_lr_cut: float = 0.5  # also applied after a rollback
    snapshot_every: int = 50
    snapshot_ring: int = 2
    snapshot_device: str = "cpu"
    max_skips: int = 20  # consecutive skipped steps before the monitor asks to stop
    max_rollbacks: int = 5  # rollbacks without a clean sync in between before it asks to stop
    # sinks
    console: bool = True
    alerts_path: str | None = None
    tensorboard_dir: str | None = None
    history_limit: int | None = None

    DETECTORS = {"loss_spike": (SpikeDetector, "loss"), "grad_spike": (SpikeDetector, "grad_norm"),
                 "early_warning": (EarlyWarningDetector, None), "loop_instability": (LoopInstabilityDetector, None)}

    def set(self, name: str, value: Any) -> None:
        """Set one option; a dotted name sets a nested detector's argument (`early_warning.warmup`,
        `early_warning.optimizer.jump`): the detector is rebuilt, so its own checks run."""
        from loopdyn.models.errors import InputError

        head, _, rest = name.partition(".")
        if head not in {f.name for f in fields(MonitorConfig)}:
            raise TypeError(f"StabilityMonitor got an unknown option {name!r}")
        if not rest:
            setattr(self, head, value)
            return
        obj = getattr(self, head)
        if obj is None:
            raise InputError(f"monitor option {name}: {head} is off (None)")
        try:
            setattr(self, head, _replace_path(obj, rest.split("."), value))
        except (TypeError, ValueError) as err:
            raise InputError(f"monitor option {name}: {err}") from None

    def validate(self) -> None:
        from loopdyn.models.errors import InputError

        for name in ("sync_every", "spectral_every", "attention_every", "jacobian_every", "snapshot_every",
                     "update_every", "loop_every", "loop_batch"):
            if name in ("loop_batch", "loop_every") and getattr(self, name) is None:
                continue
            if getattr(self, name) < 1:
                raise InputError(f"monitor option {name} must be ≥ 1, got {getattr(self, name)}")
        if self.update_dense < 0:
            raise InputError(f"monitor option update_dense must be ≥ 0, got {self.update_dense}")
        for name, (cls, signal) in self.DETECTORS.items():
            det = getattr(self, name)
            if det is False:  # off
                det = None
                setattr(self, name, None)
            if det is not None and not isinstance(det, cls):
                raise InputError(f"monitor option {name} must be a {cls.__name__} or None, got {type(det).__name__}")
            if det is not None and signal is not None and det.signal != signal:
                raise InputError(f"monitor option {name} watches {signal!r}, got a detector of {det.signal!r}")
        for name in ("on_spike", "on_nonfinite", "on_warning", "on_loop"):
            value = getattr(self, name)
            if isinstance(value, str):  # the command line's spelling (cut-lr) is accepted too
                value = value.replace("-", "_")
                setattr(self, name, value)
            if value is not None and value not in ACTIONS:
                raise InputError(f"monitor option {name} must be one of {', '.join(ACTIONS)}, got {value!r}")
        for name in ("on_warning", "on_loop"):
            if getattr(self, name) == "skip":
                raise InputError(f"monitor option {name}: 'skip' acts on a bad step; only on_spike / "
                                 "on_nonfinite can skip")
        if not 0 < self.lr_cut <= 1 or not 0 < self.rollback_lr_cut <= 1:
            raise InputError("lr_cut and rollback_lr_cut must lie in (0, 1]")


def _replace_path(obj, path: list[str], value):
    """A copy of the dataclass `obj` with the attribute at `path` set to `value` (rebuilt, so
    its __post_init__ checks run)."""
    name = path[0]
    if name not in {f.name for f in fields(obj)}:
        raise TypeError(f"{type(obj).__name__} has no argument {name!r}")
    if len(path) > 1:
        value = _replace_path(getattr(obj, name), path[1:], value)
    return replace(obj, **{name: value})


@dataclass
class RunVerdict:
    """One line about the whole run: `status` ok | warned | failed (`verdict.RunStatus`), and the reasons."""

    status: RunStatus
    reasons: list
    not_measured: str | None = None  # the monitor's coverage gaps (Coverage.line()), if any

    def line(self) -> str:
        text = run_line(self.status, self.reasons)
        return text + (f" ({self.not_measured})" if self.not_measured else "")


class StabilityMonitor:
    """Watches a training run through hooks; see the module docstring.

    model: any nn.Module (a DistributedDataParallel wrapper is unwrapped). optimizer: any
    torch.optim.Optimizer (None: forward signals only, each `record_loss` is a step). loop: a
    LoopedModel (default: found inside `model`). config: a MonitorConfig; keyword arguments
    override its fields (`jsonl=` is an alias of `alerts_path=`). sinks: extra Sink objects.
    lr_cut: how to cut the learning rate (an `actions.LRCut`; default: the param groups).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: MonitorConfig | None = None, sinks: Iterable[Sink] = (), *, loop=None,
                 lr_cut: LRCut | None = None, **overrides: Any):
        cfg = copy.deepcopy(config) if config is not None else MonitorConfig()
        if "jsonl" in overrides:  # alias: the JSON Lines alerts file
            overrides["alerts_path"] = overrides.pop("jsonl")
        for key, value in overrides.items():
            cfg.set(key, value)
        if cfg.on_nonfinite is None:
            cfg.on_nonfinite = cfg.on_spike
        if cfg.on_loop is None:
            cfg.on_loop = cfg.on_warning
        cfg.validate()
        self.config = cfg
        self.rank, self.world_size = world()
        inner = getattr(optimizer, "optimizer", None)  # a wrapper (accelerate's AcceleratedOptimizer): its optimiser
        if isinstance(inner, torch.optim.Optimizer) and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            optimizer = inner
        self.optimizer = optimizer
        self.disabled: dict[str, str] = {}
        self._sinks: list[Sink] = []
        self._closed = False
        self.bus = SignalBus(model, optimizer, cfg, loop, guard=self._guard, listener=self)
        self.bus.disabled = self.disabled
        self.model, self.loop = self.bus.model, self.bus.loop
        self._undetected: list[tuple[str, int, float]] = []
        self._coverage_told = False
        snapshots = (SnapshotRing(self.model, optimizer, cfg.snapshot_ring, cfg.snapshot_device)
                     if optimizer is not None else None)
        self.policy = Policy(cfg, optimizer, snapshots, lr_cut or (ParamGroupLRCut(optimizer) if optimizer else None),
                             emit=self._emit, guard=self._guard, positions=self.bus.positions)
        if "rollback" not in self.policy.wanted_actions:
            self.policy.snapshots = None
        self._make_sinks(sinks)
        self.bus.attach()

    def _make_sinks(self, extra: Iterable[Sink]) -> None:
        c = self.config
        main = self.rank == 0
        if c.console and main:
            self._sinks.append(ConsoleSink())
        if c.alerts_path and main:
            self._sinks.append(JsonlSink(c.alerts_path))
        if c.tensorboard_dir and main:
            self._sinks.append(TensorBoardSink(c.tensorboard_dir))
        self._sinks.extend(extra)

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    # ---- public state --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.bus.step

    @property
    def alerts(self) -> list[Alert]:
        return self.policy.alerts

    @property
    def stop_requested(self) -> bool:
        return self.policy.stop_requested

    @property
    def stop_reason(self) -> str | None:
        return self.policy.stop_reason

    @property
    def last_step_skipped(self) -> bool:
        return self.bus.last_step_skipped

    @property
    def skipped_steps(self) -> int:
        return self.policy.skipped_steps

    @property
    def rollbacks(self) -> list[tuple[int, int]]:
        return self.policy.rollbacks

    @property
    def early_warning(self):
        return self.policy.early_warning

    @property
    def skip_mode(self) -> bool:
        return self.policy.skip_mode

    @property
    def history(self) -> History:
        """Recorded signals (reading it moves pending device values to the host: one sync)."""
        self._flush_host()
        return History(self.bus.buffer.store)

    @property
    def recovers_nonfinite(self) -> bool:
        """True when a non-finite loss is handled by skip/rollback (the trainer may go on)."""
        return self.config.on_nonfinite in ("skip", "rollback") and not self.stop_requested

    # ---- public API --------------------------------------------------------------------------
    def record_loss(self, loss) -> None:
        """Give the loss of the current step (or of the step just taken, if called after
        optimizer.step()) when the model output has no `.loss`. Ignored for a step whose
        forward already exposed `.loss`."""
        done = self._guard("loss", self.bus.record_loss, loss)
        if done:
            self.after_step(self.bus.step)

    def record_inputs(self, idx) -> None:
        """The current batch's token ids (B, S), for the probe pass, when no hook or integration
        sees them (e.g. a compiled model called with embeddings, a custom training step)."""
        self.bus.record_inputs(idx)

    @property
    def compile_safe(self) -> bool:
        """True when the activations come from the monitor's own eager probe pass (no hook on a
        compiled module): chosen when the model or a module inside it is torch.compile'd."""
        return self.bus.compile_safe

    def coverage(self) -> Coverage:
        """What is measured in this run and what is not (the missing piece and the fix)."""
        return coverage(self.bus)

    def record_grad_norm(self, norm) -> None:
        """The total gradient norm before clipping (what clip_grad_norm_ returns) for this step."""
        self.bus.record_grad_norm(norm)

    def record_batch(self, position) -> None:
        """Where the current step's batch comes from (any JSON-able value: an index, a file
        offset, a sampler state), named in alerts and rollback snapshots so it can be replayed.
        Without it, the position is the count of training forward passes before the step."""
        self.bus.record_batch(position)

    @contextlib.contextmanager
    def pause(self):
        """Forward passes inside this block are not recorded (e.g. extra evaluation forwards in
        training mode)."""
        with self.bus.pause():
            yield self

    def set_console_writer(self, write) -> None:
        """Send console lines through `write` (e.g. tqdm.write, so a progress bar stays intact)."""
        for sink in self._sinks:
            if isinstance(sink, ConsoleSink):
                sink.write = write

    def flush(self) -> list[Alert]:
        """Read pending values, run the detectors and act now; returns the new alerts. Under
        torch.distributed every rank must call it (the decision is agreed across ranks)."""
        new = self._detect()
        self._sync_point()
        return new

    def verdict(self, val_loss: float | None = None, baseline: float | None = None,
                diverged: str | None = None) -> RunVerdict:
        """One line about the run: failed (non-finite, stopped, validation loss above the
        baseline), warned (spikes, spike warnings, loop instability) or ok."""
        self._detect()
        p = self.policy
        failed, reasons = [], []
        if diverged:
            failed.append(diverged)
        below = validation_failure(val_loss, baseline)
        if below:
            failed.append(below)
        nonfinite = p.first("nonfinite")
        if nonfinite is not None:
            (failed if not self.recovers_nonfinite else reasons).append(
                f"non-finite {nonfinite.signal} at step {nonfinite.step}")
        if p.stop_requested:
            failed.append(f"stopped by the monitor ({p.stop_reason})")
        since = p.loop_unstable_since
        if since is not None:
            last = max((a for a in p.alerts if a.kind == "loop_instability"), key=lambda a: a.step)
            reasons.append(f"loop unstable since step {since} ({last.signal} = {last.value:.3g} at step {last.step})")
        spikes = [a for a in p.alerts if a.kind == "spike"]
        if spikes:
            reasons.append(f"{len(spikes)} loss spike{'s' if len(spikes) > 1 else ''} (first at step {spikes[0].step})")
        warning = p.first("spike_warning")
        if warning is not None and not spikes:
            reasons.append(f"spike warning at step {warning.step} ({warning.signal})")
        acted = []
        if p.skipped_steps:
            acted.append(f"{p.skipped_steps} steps skipped")
        if p.rollbacks:
            acted.append(f"{len(p.rollbacks)} rollbacks")
        if p.lr_cuts:
            acted.append(f"{len(p.lr_cuts)} learning-rate cut{'s' if len(p.lr_cuts) > 1 else ''}")
        if acted:
            reasons.append(", ".join(acted))
        status, reasons = run_status(failed, reasons)
        cov = self.coverage()
        return RunVerdict(status, reasons, cov.line() if cov.missing else None)

    def close(self) -> None:
        """Final sync, detach every hook, close the sinks. Idempotent."""
        if self._closed:
            return
        self._guard("sync", self._detect)  # last alerts are reported; no action at close
        self.bus.detach()
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.close()
        self._closed = True

    def __enter__(self) -> "StabilityMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            if not self._closed:
                self.bus.detach()

    # ---- the bus's listener ---------------------------------------------------------------------
    def before_optimizer_step(self, _can_skip: bool = True) -> None:
        """Gradient signals, learning-rate precursors and the skip decision for the coming step.
        Called by the step pre-hook; integrations whose optimizer.step(closure) computes the
        gradients inside the step (Lightning) call it once the gradients exist."""
        step = self.bus.pre_step()
        if step is None:
            return
        self.policy.last_step_skipped = False
        if self.config.early_warning is not None:
            self._guard("optimizer", lambda: self.policy.pre_step(step, self.bus.optimizer_view()))
        skipped = self.policy.last_step_skipped  # a pre-step stop drops this step's gradients
        if self.policy.skip_mode and _can_skip and not skipped:
            self.bus.commit(step)
            new = self._detect()
            skipped = bool(self._guard("skip", self.policy.skip_decision, step, new))
        if skipped:
            self.bus.last_step_skipped = True
            self.bus.add("skipped", step, 1.0)

    def after_step(self, step: int) -> None:
        """Detect every step on what has reached the host; act at once in one process, under
        torch.distributed only at agreed points."""
        self.policy.step = step
        if not self._coverage_told:
            self._coverage_told = True
            cov = self._guard("coverage", self.coverage)
            if cov is not None and cov.missing and self.rank == 0:
                log.warning(cov.line())
        cadence = step % self.config.sync_every == 0
        self._detect(block=cadence)
        if self.world_size == 1 or cadence or self.policy.watch or self.policy.skip_mode:
            self._sync_point()

    # ---- sync, detection, actions ---------------------------------------------------------------
    def _flush_host(self, block: bool = True) -> None:
        values = self.bus.flush(block=block)
        if not values:
            return
        self._undetected.extend(values)
        latest = {name: v for name, _, v in values}
        for sink in list(self._sinks):
            self._guard_sink(sink, sink.signals, self.bus.step, latest)

    def _detect(self, block: bool = True) -> list[Alert]:
        self._flush_host(block)
        values, self._undetected = self._undetected, []
        new = (self._guard("detectors", self.policy.observe, values, self.bus.step) or []) if values else []
        for alert in new:
            self._emit(alert)
        self.policy.unacted.extend(new)
        return new

    def _sync_point(self) -> None:
        alerts, self.policy.unacted = self.policy.unacted, []
        self.policy.act(alerts)

    def _emit(self, alert: Alert) -> None:
        quiet = self.policy.action_for(alert) == "log" if hasattr(self, "policy") else False
        for sink in list(self._sinks):
            if not (quiet and isinstance(sink, ConsoleSink)):
                self._guard_sink(sink, sink.emit, alert)

    def _guard_sink(self, sink: Sink, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:
            self._sinks.remove(sink)
            warnings.warn(f"loopdyn alert sink {type(sink).__name__} disabled after an error: {err!r}",
                          RuntimeWarning, stacklevel=3)

    def _guard(self, name: str, fn, *args):
        if name in self.disabled:
            return None
        try:
            return fn(*args)
        except InstabilityError:
            raise
        except Exception as err:  # a probe must never crash the run: disable it, warn once
            self.disabled[name] = repr(err)
            warnings.warn(f"loopdyn probe {name!r} disabled after an internal error: {err!r}; training continues",
                          RuntimeWarning, stacklevel=2)
            alert = Alert(self.bus.step if hasattr(self, "bus") else 0, "probe_error", "info", name, math.nan,
                          math.nan, f"probe {name} disabled: {err!r}")
            if hasattr(self, "policy"):
                self.policy.alerts.append(alert)
            self._emit(alert)
            return None

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Detector statistics, alerts, history and warm starts (plain types and tensors:
        loadable with torch.load(weights_only=True))."""
        self._detect()
        return {"version": 2, **self.bus.state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 2:
            from loopdyn.models.errors import InputError
            raise InputError(f"unknown monitor state version {state.get('version')!r}")
        self.bus.load_state_dict(state)
        self.policy.load_state_dict(state["policy"], self.bus.step)
