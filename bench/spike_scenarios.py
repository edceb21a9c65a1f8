"""Spike scenarios: does the early warning come before the loss breaks, and how often does the
monitor cry wolf on a healthy run?

Each scenario trains the `tiny` preset on the embedded corpus (batch 8 × 64, AdamW, linear
warm-up then a constant learning rate 1e-2) with a StabilityMonitor attached at its
defaults, through a plain PyTorch loop (the monitor sees only hooks). Unstable scenarios
change one thing at step `trigger` (60):

  inj-lr-jump      linear (RDM-style) injection; the injection's learning rate ×20: ρ(Ā)
                   climbs through 1 within ~3 steps, the state explodes, the loss breaks
  inj-lr-jump-x10  the same ×10 (slower)
  inj-lr-jump-x7   the same ×7 (slower still: the loss breaks ~20 steps after the trigger)
  parcae-jump      the same ×20 jump on a Parcae (diagonal) injection: ρ(Ā) < 1 always
  parcae           Parcae, no jump
  linear           linear injection, no jump
(the last three are meant to stay stable).

Ground truth, from the loss alone and independent of the monitor: the loss breaks at the first
step t where both the loss and the median of the 8 losses from t on exceed the median of
steps t−25 … t−6 by more than `BREAK_NATS` (a sustained rise, not one hard batch). Lead
time = break step − the step at which the monitor *reported* its first early warning at or
after the trigger (its detected_step: on the CPU the step itself). False alarms: any spike,
trend, non-finite or early-warning alert in a run meant to be stable, or before the trigger.
Unstable runs whose loss did not break within the run are reported apart (the loop did go
unstable there: ρ(Ā) > 1 and the state exploded; the loss rose less than BREAK_NATS).

    python bench/spike_scenarios.py [--seeds 4] [--steps 130] [--trigger 60]

ends with `RESULT spike_scenarios lead_median=… detected=k/n false_alarms=… stable_runs=…`.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopdyn.models import LoopConfig, LoopedLM  # noqa: E402
from loopdyn.data import load_text  # noqa: E402
from loopdyn.probes import StabilityMonitor  # noqa: E402

BREAK_NATS = 0.3
SCENARIOS = {
    # name: (injection, injection-LR factor at the trigger (None: no trigger), unstable?)
    "inj-lr-jump": ("linear", 20.0, True),
    "inj-lr-jump-x10": ("linear", 10.0, True),
    "inj-lr-jump-x7": ("linear", 7.0, True),
    "parcae-jump": ("diagonal", 20.0, False),
    "parcae": ("diagonal", None, False),
    "linear": ("linear", None, False),
}
ALARM_KINDS = ("spike", "trend", "early_warning", "nonfinite")


@dataclass
class ScenarioRun:
    name: str
    seed: int
    losses: list[float]
    alerts: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    trigger: int | None = None  # the step the scenario changed something (None: no trigger)

    @property
    def break_step(self) -> int | None:
        return loss_break(self.losses)

    def first(self, kind: str, after: int = 0):
        hits = [a for a in self.alerts if a.kind == kind and a.step >= after]
        return min(hits, key=lambda a: a.detected_step) if hits else None

    @property
    def lead(self) -> int | None:
        """Break step − the step the first early warning at or after the trigger was reported
        (positive: before the break). Warnings before the trigger are false alarms."""
        ew, brk = self.first("early_warning", after=self.trigger or 0), self.break_step
        if ew is None or brk is None:
            return None
        return brk - ew.detected_step

    @property
    def alarms(self) -> list:
        return [a for a in self.alerts if a.kind in ALARM_KINDS]

    @property
    def false_alarms(self) -> list:
        """Alarms in a run whose loss never breaks, or before the trigger of one that does."""
        if self.break_step is None:
            return self.alarms
        return [a for a in self.alarms if self.trigger is not None and a.step < self.trigger]


def loss_break(losses, window: int = 20, gap: int = 5, ahead: int = 8, nats: float = BREAK_NATS) -> int | None:
    """First (1-based) step t whose loss, and the median of the `ahead` losses from t on, both
    exceed the median of steps t−window−gap … t−gap−1 by more than `nats` (a sustained rise,
    not one hard batch); a non-finite loss is a break at once."""
    x = np.asarray(losses, dtype=np.float64)
    for t in range(window + gap, len(x)):
        if not math.isfinite(x[t]):
            return t + 1
        base = np.median(x[t - window - gap: t - gap])
        if x[t] - base > nats and np.median(x[t: t + ahead]) - base > nats and t + ahead <= len(x):
            return t + 1
    return None


def make_optimizer(model, lr: float, weight_decay: float = 0.1):
    """AdamW with three groups: matrices (decayed), other no-decay parameters, the injection."""
    decay, no_decay, injection = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("injection."):
            injection.append(p)
        elif p.dim() < 2 or name.startswith("readout."):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
              {"params": injection, "weight_decay": 0.0, "name": "injection"}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


_DATA = {}


def data():
    if "text" not in _DATA:
        _DATA["text"] = load_text(max_bytes=2_000_000)
    return _DATA["text"]


def run_scenario(name: str, seed: int = 0, steps: int = 140, trigger: int = 60, lr: float = 1e-2,
                 warmup: int = 10, batch: int = 8, seq: int = 64, monitor_options: dict | None = None) -> ScenarioRun:
    injection, factor, _ = SCENARIOS[name]
    torch.manual_seed(seed)
    model = LoopedLM(LoopConfig.preset("tiny", injection=injection)).train()
    opt = make_optimizer(model, lr)
    gen = torch.Generator().manual_seed(seed * 1000)
    text = data()
    losses = []
    options = dict(console=False)
    options.update(monitor_options or {})
    start = time.perf_counter()
    with StabilityMonitor(model, opt, **options) as monitor:
        for step in range(steps):
            scale = min(1.0, (step + 1) / warmup)
            for g in opt.param_groups:
                jump = factor if (factor and g["name"] == "injection" and step >= trigger) else 1.0
                g["lr"] = lr * scale * jump
            x, y = text.batch(batch, seq, gen)
            loss = model(x, y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            monitor.record_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            opt.step()
            losses.append(float(loss.detach()))
    return ScenarioRun(name, seed, losses, list(monitor.alerts), monitor.history.as_dict(),
                       time.perf_counter() - start, trigger if factor else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=130)
    ap.add_argument("--trigger", type=int, default=60)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    leads, detected, n_broke = [], 0, 0
    stable_runs, stable_alarms, stable_breaks = 0, 0, 0
    pre_trigger_alarms, quiet_unstable, quiet_unstable_warned = 0, 0, 0
    print(f"{'scenario':16} {'seed':>4} {'break':>6} {'warn@':>6} {'lead':>5} {'false':>5}  first alerts")
    for name in args.scenarios.split(","):
        unstable = SCENARIOS[name][2]
        for seed in range(args.seeds):
            run = run_scenario(name, seed, args.steps, args.trigger)
            ew = run.first("early_warning", after=run.trigger or 0)
            brk = run.break_step
            firsts = "; ".join(f"{a.kind}:{a.signal}@{a.detected_step}" for a in run.alarms[:3])
            print(f"{name:16} {seed:>4} {str(brk):>6} {str(ew.detected_step if ew else None):>6} "
                  f"{str(run.lead):>5} {len(run.false_alarms):>5}  {firsts}  ({run.seconds:.0f} s)", flush=True)
            if not unstable:
                stable_runs += 1
                stable_alarms += len(run.alarms)
                stable_breaks += brk is not None
                continue
            pre_trigger_alarms += len([a for a in run.alarms if a.step < args.trigger])
            if brk is None:  # the loop was pushed, the loss did not rise 0.3 nats within the run
                quiet_unstable += 1
                quiet_unstable_warned += ew is not None
                continue
            n_broke += 1
            if run.lead is not None and run.lead > 0:
                detected += 1
                leads.append(run.lead)
    lead_med = statistics.median(leads) if leads else float("nan")
    print(f"early warning before the loss broke in {detected}/{n_broke} runs that broke; lead times {leads}")
    print(f"runs meant to be stable: {stable_runs}, alarms in them {stable_alarms}, loss breaks in them {stable_breaks}")
    print(f"unstable scenarios: alarms before the trigger {pre_trigger_alarms}; {quiet_unstable} runs whose loss "
          f"did not break within {args.steps} steps, {quiet_unstable_warned} of them warned (ρ(Ā) > 1 or a spike)")
    print(f"RESULT spike_scenarios lead_median={lead_med:g} detected={detected}/{n_broke} "
          f"false_alarms={stable_alarms + pre_trigger_alarms} stable_runs={stable_runs} "
          f"unbroken_warned={quiet_unstable_warned}/{quiet_unstable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
