"""The policy: detectors → alert families → actions, the same decision on every rank.

Per step (host values, after the bus's flush):

    detectors                                    family / kind
    NonFiniteDetector (every signal)             spike / nonfinite
    SpikeDetector("loss")                        spike / spike
    SpikeDetector("grad_norm")                   no alert of its own: a skip-mode trigger and an
                                                 early-warning precursor that needs confirmation
    EarlyWarningDetector (+ OptimizerWatch)      spike / spike_warning
    LoopInstabilityDetector                      loop_instability / loop_instability

Actions (per kind: on_spike, on_nonfinite, on_warning, on_loop): warn | log | raise | stop |
skip | rollback | cut_lr. A learning-rate jump is seen in the optimiser's pre-hook, so its
warning — and its action — come before the update it would drive: cut_lr cuts that very step's
learning rate, stop drops its gradients and stops, rollback (nothing to undo yet) cuts the
learning rate. Skip and rollback hold for every bad step of a run, not only the first one the
detectors report. Escalations repeat the action when `repeat_actions` is on (default), at most
once per the detector's `escalation.every` steps.

Under torch.distributed every decision is reduced with MAX across ranks (`agree_max`) at
points every rank reaches at the same step, so all ranks act alike. Learning-rate precursors
read param_groups, which are identical on every rank, so they need no collective.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

from loopdyn.probes.actions import LRCut, SnapshotRing, drop_gradients
from loopdyn.probes.alerts import Alert, InstabilityError
from loopdyn.probes.detectors import NonFiniteDetector, SpikeDetector
from loopdyn.probes.distributed import agree_max

# Decision levels, reduced with MAX across ranks: the strongest action wins.
LEVEL = {"warn": 0, "log": 0, "skip": 0, "cut_lr": 1, "rollback": 2, "stop": 3, "raise": 4}
ACTION_OF_LEVEL = {1: "cut_lr", 2: "rollback", 3: "stop", 4: "raise"}
# The signals that condemn the step they belong to (its update is computed from them).
STEP_SIGNALS = ("loss", "grad_norm")
FINDINGS = ("spike", "nonfinite", "spike_warning", "loop_instability")


class Policy:
    def __init__(self, config, optimizer, snapshots: SnapshotRing | None, lr_cut: LRCut | None, *,
                 emit: Callable[[Alert], None], guard: Callable, positions: dict):
        self.config = c = config
        self.optimizer = optimizer
        self.snapshots = snapshots
        self.lr_cut = lr_cut
        self.emit = emit
        self.guard = guard
        self.positions = positions
        # Copies of the configured detectors: a config may serve many monitors.
        self.detectors: dict[str, list[SpikeDetector]] = {}
        for proto in (c.loss_spike, c.grad_spike):
            if proto is not None:
                self.detectors.setdefault(proto.signal, []).append(copy.deepcopy(proto))
        # The gradient-norm detector's spikes are precursors and skip triggers, not alerts.
        self.quiet = {id(d) for d in self.detectors.get(c.grad_spike.signal, ())} if c.grad_spike is not None else set()
        self.nonfinite: dict[str, NonFiniteDetector] = {}
        self.early_warning = copy.deepcopy(c.early_warning) if c.early_warning is not None else None
        self.loop_detector = copy.deepcopy(c.loop_instability) if c.loop_instability is not None else None
        self.alerts: list[Alert] = []
        self.step = 0
        self.anomalies: dict[int, dict[str, str]] = {}  # step → {signal: "spike" | "nonfinite"}, not acted on
        self.unacted: list[Alert] = []
        self.evaluated = 0
        self.watch = False
        self.quiet_syncs = 0
        self.stop_requested = False
        self.stop_reason: str | None = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.rollbacks: list[tuple[int, int]] = []
        self.rollbacks_since_clean = 0
        self.lr_cuts: list[int] = []
        self.last_snapshot_step = 0
        self.last_step_skipped = False

    # ---- configuration ----------------------------------------------------------------------------
    def action_for(self, alert: Alert) -> str:
        c = self.config
        action = {"spike": c.on_spike, "nonfinite": c.on_nonfinite, "spike_warning": c.on_warning,
                  "loop_instability": c.on_loop}.get(alert.kind, "warn")
        if alert.escalation and not c.repeat_actions and action not in ("log",):
            return "warn"
        return action

    def action_of_kind(self, kind: str) -> str:
        return self.config.on_nonfinite if kind == "nonfinite" else self.config.on_spike

    @property
    def skip_mode(self) -> bool:
        return "skip" in (self.config.on_spike, self.config.on_nonfinite)

    @property
    def wanted_actions(self) -> set:
        c = self.config
        return {c.on_spike, c.on_nonfinite, c.on_warning, c.on_loop}

    # ---- detection -------------------------------------------------------------------------------
    def observe(self, values: list[tuple[str, int, float]], now: int) -> list[Alert]:
        """Run the detectors on host values (name, step, value); returns the new alerts."""
        new: list[Alert] = []
        by_step: dict[int, list[tuple[str, float]]] = {}
        for name, step, v in values:
            by_step.setdefault(step, []).append((name, v))
        ew, loop = self.early_warning, self.loop_detector
        for step in sorted(by_step):
            for name, v in by_step[step]:
                det = self.nonfinite.get(name)
                if det is None:
                    det = self.nonfinite[name] = NonFiniteDetector(name)
                found = [det.forward(step, name, v)]
                spikes = self.detectors.get(name, ())
                for d in spikes:
                    a = d.forward(step, name, v)
                    if id(d) not in self.quiet:
                        found.append(a)
                if name in STEP_SIGNALS:  # a bad step is bad at every step of a run, not only the first
                    if det.anomalous:
                        self.anomalies.setdefault(step, {})[name] = "nonfinite"
                    elif any(d.anomalous for d in spikes):
                        self.anomalies.setdefault(step, {}).setdefault(name, "spike")
                if ew is not None:
                    ew.update(step, name, v)
                if loop is not None:
                    loop.update(step, name, v)
                new.extend(a for a in found if a is not None)
            if step > self.evaluated:
                self.evaluated = step
                if ew is not None:
                    a = ew.compute(step)
                    if a is not None:
                        new.append(a)
                if loop is not None:
                    a = loop.compute(step)
                    if a is not None:
                        new.append(a)
        for a in new:
            a.detected_step = max(now, a.step)  # a pre-step read sees step t's evidence at step t
            if a.data_position is None:
                a.data_position = self.positions.get(a.step)
        self.alerts.extend(new)
        return new

    # ---- before the update ---------------------------------------------------------------------------
    def pre_step(self, step: int, optimizer_view: tuple[list[dict], int] | None) -> Alert | None:
        """Learning-rate / optimiser-setting precursors of the coming step: a spike_warning (and
        its action) before the update. Returns the alert, if any."""
        ew = self.early_warning
        if ew is None or optimizer_view is None:
            return None
        ew.update(step, "param_groups", optimizer_view)
        if not ew.optimizer.new:
            return None  # param_groups are the same on every rank: so is this early return
        alert = ew.compute(step, pre_step=True)
        if alert is not None:
            alert.detected_step = step
            alert.data_position = self.positions.get(step)
            self.alerts.append(alert)
            self.emit(alert)
        # The fused score also holds rank-local precursors: agree on the action (a collective
        # that every rank reaches, since the learning-rate change that got us here is global).
        mine = LEVEL.get(self.action_for(alert), 0) if alert is not None else 0
        (level,) = agree_max([mine])
        if level == 0:
            return alert
        action = ACTION_OF_LEVEL[level]
        if level > mine:  # another rank asked
            alert = Alert(step, "action", "info", "remote", math.nan, math.nan, "another rank asked")
        if action == "raise":
            raise InstabilityError(alert)
        if action in ("cut_lr", "rollback") and self.lr_cut is not None:
            factor = self.config.lr_cut if action == "cut_lr" else self.config.rollback_lr_cut
            self.lr_cuts.append(step)
            self.action_alert(step, alert.signal, f"before step {step}: {self.lr_cut.cut(factor)}")
        elif action == "stop":
            drop_gradients(self.optimizer)
            self.last_step_skipped = True
            self.request_stop(f"{alert.kind} on {alert.signal} before step {step} (step not taken)")
        return alert

    def skip_decision(self, step: int, new: list[Alert]) -> bool:
        """Skip mode: every step whose loss or gradient norm is non-finite or above its spike
        threshold is skipped, however many come in a row."""
        bad = self.anomalies.get(step, {})
        trigger = {sig: kind for sig, kind in bad.items() if self.action_of_kind(kind) == "skip"}
        for sig in trigger:  # handled here; anything else (e.g. on_nonfinite="rollback") waits for act()
            del bad[sig]
        if not bad:
            self.anomalies.pop(step, None)
        (flag,) = agree_max([1 if trigger else 0])
        if not flag:
            self.consecutive_skips = 0
            return False
        drop_gradients(self.optimizer)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if trigger:
            signal, kind = next(iter(trigger.items()))
            why = f"{kind} on {signal}"
        else:
            signal, why = "skip", "another rank asked"
        first = any(a.step == step and a.signal == signal for a in new)
        self.action_alert(step, signal, f"skipped step {step} ({why}): no parameter change"
                          + ("" if first or not trigger else " (the same episode continues)"))
        if self.consecutive_skips >= self.config.max_skips:
            self.request_stop(f"{self.consecutive_skips} consecutive steps skipped")
        return True

    # ---- at sync points ---------------------------------------------------------------------------
    def act(self, new: list[Alert]) -> None:
        """Decide on the alerts since the last sync point (a collective under torch.distributed)."""
        level = max((LEVEL.get(self.action_for(a), 0) for a in new), default=0)
        # A run of bad steps: the detectors alert at its first step only, but a rollback must
        # hold for every bad step (otherwise the second one in a row is applied).
        anomalies, self.anomalies = self.anomalies, {}
        rollback_steps = [s for s, bad in anomalies.items()
                          if any(self.action_of_kind(k) == "rollback" for k in bad.values())]
        if rollback_steps:
            level = max(level, LEVEL["rollback"])
        if self.optimizer is None and level in (LEVEL["cut_lr"], LEVEL["rollback"]):
            level = 0  # nothing to act on without an optimiser
        serious = [a for a in new if a.kind in FINDINGS]
        ew = self.early_warning
        watch = 1 if (ew is not None and ew.last_score > 0) else 0
        first_bad = min([a.step for a in serious] + list(anomalies), default=self.step + 1)
        # Every rank takes the same decision: the strongest action, heightened watch if any
        # rank is worried, a snapshot only if every rank is clean, the earliest bad step.
        level, watch, dirty, neg_first_bad = agree_max([level, watch, 1 if (serious or anomalies) else 0,
                                                        -first_bad])
        self._update_watch(bool(watch))
        if level == 0:
            if not dirty and self.snapshots is not None:
                self.rollbacks_since_clean = 0
                self._maybe_snapshot()
            return
        action = ACTION_OF_LEVEL[level]
        mine = [a for a in new if LEVEL.get(self.action_for(a), 0) == level]
        cause = max(mine, key=lambda a: a.level, default=None)  # None: another rank asked
        if cause is None and rollback_steps and level == LEVEL["rollback"]:
            sig, kind = next(iter(anomalies[min(rollback_steps)].items()))
            signal, why = sig, f"step {min(rollback_steps)}: {kind} on {sig} (the same episode continues)"
        else:
            signal = cause.signal if cause else "remote"
            why = cause.line() if cause else "another rank asked"
        if action == "raise":
            raise InstabilityError(cause or Alert(self.step, "action", "critical", "remote", math.nan, math.nan, why))
        if action == "stop":
            self.request_stop(why)
        elif action == "cut_lr":
            self.lr_cuts.append(self.step)
            self.action_alert(self.step, signal, self.lr_cut.cut(self.config.lr_cut))
        elif action == "rollback":
            self._rollback(-neg_first_bad, signal)

    def _rollback(self, first_bad: int, signal: str) -> None:
        # The loss and gradients of step t are computed with the parameters left by step t − 1,
        # so a spike at t condemns that state too: restore one from step t − 2 or earlier.
        snap = self.snapshots.latest_before(first_bad - 1) if self.snapshots is not None else None
        if snap is None:
            text = self.lr_cut.cut(self.config.rollback_lr_cut)
            self.action_alert(self.step, signal, f"no snapshot to roll back to; {text}")
            return
        self.snapshots.restore(snap)
        if snap.data_position is None:  # the batch after the snapshot was named after it was taken
            snap.data_position = self.positions.get(snap.step + 1)
        text = (self.lr_cut.cut(self.config.rollback_lr_cut) if self.config.rollback_lr_cut < 1
                else f"lr_scale {self.lr_cut.scale:.3g}")
        self.rollbacks.append((self.step, snap.step))
        self.rollbacks_since_clean += 1
        self.action_alert(self.step, signal, f"rolled back to the state after step {snap.step} "
                          f"({snap.nbytes / 2**20:.1f} MiB; replay from data position {snap.data_position}); {text}")
        if self.rollbacks_since_clean >= self.config.max_rollbacks:
            self.request_stop(f"{self.rollbacks_since_clean} rollbacks without recovery")

    def _maybe_snapshot(self) -> None:
        every = self.config.snapshot_every
        if self.step // every > self.last_snapshot_step // every or not len(self.snapshots):
            if self.step > 0:
                self.guard("snapshot", self.snapshots.take, self.step, self.positions.get(self.step + 1))
                self.last_snapshot_step = self.step

    def _update_watch(self, watch: bool) -> None:
        if watch:
            self.watch, self.quiet_syncs = True, 0
        elif self.watch:
            self.quiet_syncs += 1
            if self.quiet_syncs >= self.config.sync_every:
                self.watch = False

    def request_stop(self, why: str) -> None:
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_reason = why
            self.action_alert(self.step, "stop", f"stop requested: {why}")

    def action_alert(self, step: int, signal: str, message: str) -> None:
        alert = Alert(step, "action", "info", signal, math.nan, math.nan, message, detected_step=self.step,
                      data_position=self.positions.get(step))
        self.alerts.append(alert)
        self.emit(alert)

    # ---- what happened ---------------------------------------------------------------------------
    @property
    def loop_unstable_since(self) -> int | None:
        return None if self.loop_detector is None else self.loop_detector.first_step

    def first(self, kind: str) -> Alert | None:
        return next((a for a in self.alerts if a.kind == kind), None)

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "detectors": {name: [d.state_dict() for d in dets] for name, dets in self.detectors.items()},
            "nonfinite": {name: d.state_dict() for name, d in self.nonfinite.items()},
            "early_warning": None if self.early_warning is None else self.early_warning.state_dict(),
            "loop": None if self.loop_detector is None else self.loop_detector.state_dict(),
            "evaluated": self.evaluated,
            "alerts": [a.to_state() for a in self.alerts],
            "watch": self.watch,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict, step: int) -> None:
        self.step = step
        for name, states in state["detectors"].items():
            for det, s in zip(self.detectors.get(name, ()), states):
                det.load_state_dict(s)
        self.nonfinite = {}
        for name, s in state["nonfinite"].items():
            det = self.nonfinite[name] = NonFiniteDetector(name)
            det.load_state_dict(s)
        if self.early_warning is not None and state.get("early_warning"):
            self.early_warning.load_state_dict(state["early_warning"])
        if self.loop_detector is not None and state.get("loop"):
            self.loop_detector.load_state_dict(state["loop"])
        self.evaluated = int(state.get("evaluated", step))
        self.alerts = [Alert.from_state(a) for a in state["alerts"]]
        self.watch = bool(state.get("watch", False))
        self.skipped_steps = int(state.get("skipped_steps", 0))
