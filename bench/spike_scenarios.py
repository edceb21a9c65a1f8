"""Spike scenarios: runs that really break and runs that stay stable, and which detector warns
in time — loopdyn's StabilityMonitor against re-implementations of ZClip, OLMo-core's spike
detection and Lightning's SpikeDetection.

Every run trains the `tiny` preset on the embedded corpus (batch 8 × 64, AdamW β = (0.9, 0.95),
gradient clipping at 1, linear warm-up of 10 steps, then a constant learning rate 1e-2) through a
plain PyTorch loop with a StabilityMonitor attached at its defaults (it sees only hooks; the
baselines read the same run's recorded loss and gradient norm afterwards). A breaking run
changes one thing at step `trigger`:

  kind      scenario          what changes
  abrupt    lr-x5@80 …        every group's learning rate ×5, ×10, ×20, ×50 from the trigger on
                              (steps 40–150; Parcae and linear injections)
  abrupt    inj-lr-x20@60 …   only the injection's learning rate (linear injection)
  abrupt    short-warmup …    warm-up of 1 step to lr 0.06 (0.04 for the linear injection; trigger 1)
  abrupt    data-burst@70 …   4 (8 at step 120) batches of random bytes from the trigger on (a corrupted shard)
  gradual   lr-ramp@60 …      the learning rate ×1.04–×1.06 per step from the trigger on
  gradual   beta2-high        β2 = 0.9999 at lr 0.03, no clipping         } warm-up of 40 steps to a
  gradual   no-clip           no gradient clipping at lr 0.04             } learning rate the run
  gradual   linear-lr0.05     linear injection at lr 0.05 (ρ(Ā) > 1), 0.03 } does not survive
  gradual   no-qknorm         no QK-norm, lr 0.04: attention logits grow  } (trigger 1, 241 steps)

Stable runs: Parcae (diagonal) and linear injections at lr 1e-2 for `--stable-steps` (400).

Ground truth, from the loss alone: the loss of a breaking run minus the loss of its healthy twin
(the stable run with the same injection and seed: the same initialisation and the same batches,
so hard stretches of text cancel). The spike step is the first step t ≥ trigger where that excess
rises above the median of its 20 values before t by more than BREAK_NATS (0.3), either by more
than 1 nat (a burst) or for good (the median of the 5 values from t on is 0.3 above too: one
hard batch is not a spike); a non-finite loss is a spike at once. Without a twin in the run set
(--scenarios subsets), the raw loss is used. A run with no such step did not break and is reported apart.
The lead of a detector = spike step − the step of its first warning at or after the trigger
(for loopdyn: the first spike_warning / spike / nonfinite alert, by the step at which it was
reported; a warning taken before an update counts at that step; "loopdyn+loop" also counts its
loop_instability alerts). `csd(loss)` is a critical-slowing-down indicator (rising lag-1
autocorrelation and variance of the loss), evaluated here to decide whether the monitor should
use it. An abrupt trigger is "warned in
time" when lead ≥ 0 (no later than the spike step). False alarms: any alert of the spike family in
a stable run, or before the trigger of a breaking one, per 1000 stable steps. loopdyn's
loop_instability alerts are a different finding (the loop will explode at more loops) and are
counted apart.

    python bench/spike_scenarios.py [--quick] [--seeds 1] [--stable-steps 400] [--out FILE.json]

`--quick` runs a subset (7 breaking, 2 stable runs of 400 steps: ~2,200 steps, a few minutes on
an idle core). Ends with `RESULT spike_scenarios ...` (loopdyn's numbers; the table has all detectors).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopdyn.data import load_text  # noqa: E402
from loopdyn.models import LoopConfig, LoopedLM  # noqa: E402
from loopdyn.probes import StabilityMonitor  # noqa: E402

BREAK_NATS = 0.3
LR, WARMUP, BATCH, SEQ = 1e-2, 10, 8, 64
SPIKE_KINDS = ("spike_warning", "spike", "nonfinite")


@dataclass
class Scenario:
    name: str
    kind: str  # "abrupt" | "gradual" | "stable"
    trigger: int = 1
    injection: str = "diagonal"
    lr: float = LR
    warmup: int = WARMUP
    jump: float | None = None  # lr × jump from the trigger on
    jump_groups: str = "all"  # "all" | "injection"
    ramp: float | None = None  # lr × ramp^(step − trigger) from the trigger on
    betas: tuple = (0.9, 0.95)
    clip: float | None = 1.0
    qk_norm: bool = True
    burst: int = 0  # batches of random bytes from the trigger on
    seed: int = 0  # added to the --seeds index
    after: int | None = None  # steps after the trigger (None: --after)


BREAKING = [
    Scenario("lr-x5@80", "abrupt", 80, jump=5.0),
    Scenario("lr-x10@60", "abrupt", 60, jump=10.0),
    Scenario("lr-x20@100", "abrupt", 100, jump=20.0),
    Scenario("lr-x50@50", "abrupt", 50, jump=50.0),
    Scenario("lr-x5@150", "abrupt", 150, jump=5.0),
    Scenario("lr-x20-linear@40", "abrupt", 40, injection="linear", jump=20.0),
    Scenario("lr-x10-linear@70", "abrupt", 70, injection="linear", jump=10.0),
    Scenario("inj-lr-x20@60", "abrupt", 60, injection="linear", jump=20.0, jump_groups="injection"),
    Scenario("inj-lr-x7@90", "abrupt", 90, injection="linear", jump=7.0, jump_groups="injection"),
    Scenario("short-warmup", "abrupt", 1, lr=0.06, warmup=1, after=240),
    Scenario("short-warmup-linear", "abrupt", 1, injection="linear", lr=0.04, warmup=1, after=240),
    Scenario("data-burst@70", "abrupt", 70, burst=4),
    Scenario("data-burst-linear@90", "abrupt", 90, injection="linear", burst=4),
    Scenario("data-burst@120", "abrupt", 120, burst=8),
    Scenario("lr-ramp@60", "gradual", 60, ramp=1.06),
    Scenario("lr-ramp-linear@80", "gradual", 80, injection="linear", ramp=1.06),
    Scenario("lr-ramp@120", "gradual", 120, ramp=1.04, after=100),
    Scenario("lr-ramp-linear@40", "gradual", 40, injection="linear", ramp=1.05),
    Scenario("beta2-high", "gradual", 1, lr=0.03, warmup=40, betas=(0.9, 0.9999), clip=None, after=240),
    Scenario("no-clip", "gradual", 1, lr=0.04, warmup=40, clip=None, after=240),
    Scenario("linear-lr0.05", "gradual", 1, injection="linear", lr=0.05, warmup=40, after=240),
    Scenario("linear-lr0.03", "gradual", 1, injection="linear", lr=0.03, warmup=40, after=240),
    Scenario("no-qknorm", "gradual", 1, lr=0.04, warmup=40, qk_norm=False, after=240),
]
STABLE = [
    Scenario("parcae", "stable"), Scenario("linear", "stable", injection="linear"),
    Scenario("parcae-b", "stable", seed=1), Scenario("linear-b", "stable", injection="linear", seed=1),
    Scenario("additive", "stable", injection="additive", lr=5e-3), Scenario("parcae-c", "stable", seed=2),
]
QUICK = {"lr-x10@60", "inj-lr-x20@60", "inj-lr-x7@90", "short-warmup", "data-burst@70", "lr-ramp@60",
         "linear-lr0.05", "parcae", "linear"}
ALL = {s.name for s in BREAKING + STABLE}


@dataclass
class Run:
    scenario: Scenario
    seed: int
    losses: list
    grad_norms: list
    alerts: list = field(default_factory=list)
    seconds: float = 0.0

    twin: list | None = None  # losses of the healthy run on the same batches (same injection and seed)

    @property
    def spike_step(self) -> int | None:
        return spike_step(self.losses, self.scenario.trigger, reference=self.twin)


def spike_step(losses, trigger: int, window: int = 20, nats: float = BREAK_NATS, ahead: int = 5,
               big: float = 1.0, reference=None) -> int | None:
    """First (1-based) step t ≥ trigger whose loss exceeds the median of the `window` losses before
    it by more than `nats`, and either by more than `big` nats (a burst) or for good (the median
    of the `ahead` losses from t on is also `nats` above): one hard batch is not a spike. A
    non-finite loss is a spike at once."""
    x = np.asarray(losses, dtype=np.float64)
    if reference is not None:  # excess over a healthy twin on the same batches: hard stretches of text cancel
        ref = np.asarray(reference, dtype=np.float64)[: len(x)]
        x = np.concatenate([x[: len(ref)] - ref, x[len(ref):]]) if len(ref) < len(x) else x - ref
    for t in range(max(trigger - 1, 0), len(x)):
        if not math.isfinite(x[t]):
            return t + 1
        prev = x[max(0, t - window):t]
        prev = prev[np.isfinite(prev)]
        if len(prev) < 5:
            continue
        base = float(np.median(prev))
        if x[t] - base > nats:
            later = x[t: t + ahead]
            later = np.where(np.isfinite(later), later, np.inf)
            if x[t] - base > big or (len(later) == ahead and float(np.median(later)) - base > nats):
                return t + 1
    return None


def loss_break(losses, window: int = 20, gap: int = 5, ahead: int = 8, nats: float = BREAK_NATS) -> int | None:
    """First (1-based) step t whose loss, and the median of the `ahead` losses from t on, both
    exceed the median of steps t−window−gap … t−gap−1 by more than `nats` (a sustained rise)."""
    x = np.asarray(losses, dtype=np.float64)
    for t in range(window + gap, len(x)):
        if not math.isfinite(x[t]):
            return t + 1
        base = np.median(x[t - window - gap: t - gap])
        if x[t] - base > nats and np.median(x[t: t + ahead]) - base > nats and t + ahead <= len(x):
            return t + 1
    return None


def make_optimizer(model, lr: float, betas, weight_decay: float = 0.1):
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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


_DATA = {}


def data():
    if "text" not in _DATA:
        _DATA["text"] = load_text(max_bytes=2_000_000)
    return _DATA["text"]


def run_scenario(sc: Scenario, seed: int = 0, steps: int = 140, monitor_options: dict | None = None) -> Run:
    torch.manual_seed(seed)
    model = LoopedLM(LoopConfig.preset("tiny", injection=sc.injection, qk_norm=sc.qk_norm)).train()
    opt = make_optimizer(model, sc.lr, sc.betas)
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    noise = torch.Generator().manual_seed(seed * 1000 + 8)
    text = data()
    losses, grad_norms = [], []
    options = dict(console=False)
    options.update(monitor_options or {})
    start = time.perf_counter()
    with StabilityMonitor(model, opt, **options) as monitor:
        for step in range(1, steps + 1):
            lr = sc.lr * min(1.0, step / sc.warmup)
            if step >= sc.trigger and sc.ramp:
                lr *= sc.ramp ** (step - sc.trigger)
            for g in opt.param_groups:
                jump = sc.jump if (sc.jump and step >= sc.trigger
                                   and (sc.jump_groups == "all" or g["name"] == "injection")) else 1.0
                g["lr"] = lr * jump
            x, y = text.batch(BATCH, SEQ, gen)
            if sc.burst and sc.trigger <= step < sc.trigger + sc.burst:
                xy = torch.randint(0, 256, (BATCH, SEQ + 1), generator=noise)
                x, y = xy[:, :-1], xy[:, 1:]
            loss = model(x, y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sc.clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.clip)
            else:
                gn = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            monitor.record_grad_norm(gn)
            opt.step()
            losses.append(float(loss.detach()))
            grad_norms.append(float(gn))
            if not math.isfinite(losses[-1]) and step > sc.trigger + 5:
                break  # nothing more to learn from a dead run
    return Run(sc, seed, losses, grad_norms, list(monitor.alerts), time.perf_counter() - start)


# ---- baselines (re-implemented from their descriptions; run on the recorded series) ---------------

def zclip(grad_norms, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25) -> list[int]:
    """ZClip (Kumar et al. 2025): EMA mean/variance of the gradient norm; a step whose z-score
    exceeds z_thresh is a spike (ZClip clips it and feeds the clipped value to the EMA)."""
    out, mean, var = [], 0.0, 0.0
    for t, g in enumerate(grad_norms, start=1):
        if not math.isfinite(g):
            out.append(t)
            continue
        if t <= warmup:
            mean += (g - mean) / t
            var += ((g - mean) ** 2 - var) / t
            continue
        std = math.sqrt(max(var, 1e-24))
        z = (g - mean) / std
        if z > z_thresh:
            out.append(t)
            g = mean + z_thresh * std
        delta = g - mean
        mean += (1 - alpha) * delta
        var = alpha * (var + (1 - alpha) * delta * delta)
    return out


def olmo_core(losses, window: int = 128, sigmas: float = 6.0, warmup: int = 20) -> list[int]:
    """OLMo-core style loss spike detection: loss > mean + 6σ of the previous (up to) 128 losses."""
    out, hist = [], deque(maxlen=window)
    for t, v in enumerate(losses, start=1):
        if not math.isfinite(v):
            out.append(t)
            continue
        if len(hist) >= warmup:
            arr = np.asarray(hist)
            if v > arr.mean() + sigmas * arr.std():
                out.append(t)
        hist.append(v)
    return out


def lightning_spike(losses, window: int = 10, warmup: int = 1, rtol: float = 2.0) -> list[int]:
    """Lightning's SpikeDetection (defaults): not an improvement over the last value and
    |loss − running mean of 10| ≥ rtol·running mean; non-finite is a spike; spikes are not
    added to the statistics."""
    out, hist, last = [], deque(maxlen=window), 0.0
    for t, v in enumerate(losses, start=1):
        if t - 1 >= warmup:
            if not math.isfinite(v):
                out.append(t)
                continue
            mean = float(np.mean(hist)) if hist else 0.0
            if v - last > 0 and abs(v - mean) >= abs(rtol * mean):
                out.append(t)
                continue
        if math.isfinite(v):
            hist.append(v)
            last = v
    return out


def csd(series, window: int = 30, trend: int = 20, tau_min: float = 0.7, var_growth: float = 2.0,
        warmup: int = 40) -> list[int]:
    """Critical slowing down (Scheffer et al. 2009), a candidate precursor: over a rolling window
    of the detrended series (minus its rolling median), lag-1 autocorrelation and variance both
    rising (Kendall τ ≥ tau_min over the last `trend` windows) and the variance ≥ `var_growth` ×
    its value `trend` windows ago. Evaluated offline here; kept out of the monitor unless it helps."""
    x = np.asarray(series, dtype=np.float64)
    ar1, var, out = [], [], []
    for t in range(len(x)):
        if not math.isfinite(x[t]):
            out.append(t + 1)
            break
        if t + 1 < window:
            continue
        w = x[t + 1 - window: t + 1]
        r = w - np.median(w)
        v = float(r.var())
        a = float(np.corrcoef(r[:-1], r[1:])[0, 1]) if r[:-1].std() > 0 and r[1:].std() > 0 else 0.0
        ar1.append(a)
        var.append(v)
        if t + 1 < warmup or len(var) < trend:
            continue
        idx = np.arange(trend, dtype=float)
        i, j = np.triu_indices(trend, k=1)
        tau_a = float(np.sign((idx[j] - idx[i]) * (np.array(ar1[-trend:])[j] - np.array(ar1[-trend:])[i])).mean())
        tau_v = float(np.sign((idx[j] - idx[i]) * (np.array(var[-trend:])[j] - np.array(var[-trend:])[i])).mean())
        if tau_a >= tau_min and tau_v >= tau_min and var[-trend] > 0 and var[-1] / var[-trend] >= var_growth:
            out.append(t + 1)
    return out


def detections(run: Run) -> dict[str, list[int]]:
    """Step of each warning, per detector."""
    ours = sorted({a.detected_step for a in run.alerts if a.kind in SPIKE_KINDS})
    ours_any = sorted({a.detected_step for a in run.alerts if a.kind in SPIKE_KINDS + ("loop_instability",)})
    have_grads = any(math.isfinite(g) for g in run.grad_norms)
    return {"loopdyn": ours, "loopdyn+loop": ours_any, "zclip": zclip(run.grad_norms) if have_grads else None,
            "olmo-core": olmo_core(run.losses), "lightning": lightning_spike(run.losses),
            "csd(loss)": csd(run.losses)}


DETECTORS = ("loopdyn", "loopdyn+loop", "zclip", "olmo-core", "lightning", "csd(loss)")


def attach_twins(runs: list[Run]) -> None:
    """Give every breaking run the losses of the stable run with its injection and seed (the
    same batches, the same initialisation): its spike is measured as excess over that twin."""
    stable = {(r.scenario.injection, r.seed): r.losses for r in runs if r.scenario.kind == "stable"}
    for r in runs:
        if r.scenario.kind != "stable":
            r.twin = stable.get((r.scenario.injection, r.seed))


def summarise(runs: list[Run]) -> dict:
    attach_twins(runs)
    stats = {d: {"leads": [], "abrupt_in_time": 0, "abrupt": 0, "gradual5": 0, "gradual": 0, "fa": 0}
             for d in DETECTORS}
    stable_steps = sum(len(r.losses) for r in runs if r.scenario.kind == "stable")
    broke = [r for r in runs if r.scenario.kind != "stable" and r.spike_step is not None]
    for r in runs:
        det = detections(r)
        for d, steps in det.items():
            s = stats[d]
            if steps is None:  # not measurable for this run (no recorded gradient norms)
                s["missing"] = True
                continue
            if r.scenario.kind == "stable":
                s["fa"] += len(steps)
                continue
            s["fa"] += len([t for t in steps if t < r.scenario.trigger])
            if r.spike_step is None:
                continue
            after = [t for t in steps if t >= r.scenario.trigger]
            lead = (r.spike_step - after[0]) if after else None
            s["leads"].append(lead)
            if r.scenario.kind == "abrupt":
                s["abrupt"] += 1
                s["abrupt_in_time"] += lead is not None and lead >= 0
            else:
                s["gradual"] += 1
                s["gradual5"] += lead is not None and lead >= 5
    table = {}
    for d, s in stats.items():
        leads = s["leads"]
        n = len(leads)
        pos = [x for x in leads if x is not None and x >= 0]
        if s.get("missing"):
            n = 0
        table[d] = {
            "recall_lead1": sum(x is not None and x >= 1 for x in leads) / n if n else math.nan,
            "recall_lead5": sum(x is not None and x >= 5 for x in leads) / n if n else math.nan,
            "median_lead": statistics.median(pos) if pos else math.nan,
            "gradual_recall_lead5": s["gradual5"] / s["gradual"] if s["gradual"] else math.nan,
            "abrupt_in_time": f"{s['abrupt_in_time']}/{s['abrupt']}",
            "false_alarms_per_1000": 1000 * s["fa"] / stable_steps if stable_steps and n else math.nan,
        }
    loop_stable = sum(1 for r in runs if r.scenario.kind == "stable" for a in r.alerts if a.kind == "loop_instability")
    return {"table": table, "broke": len(broke), "breaking_runs": sum(r.scenario.kind != "stable" for r in runs),
            "stable_runs": sum(r.scenario.kind == "stable" for r in runs), "stable_steps": stable_steps,
            "loop_instability_in_stable_runs": loop_stable}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset: 7 breaking and 2 stable runs")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--after", type=int, default=60, help="steps a breaking run goes on after its trigger")
    ap.add_argument("--stable-steps", type=int, default=400)
    ap.add_argument("--scenarios", default=None, help="comma-separated names (default: all, or the quick set)")
    ap.add_argument("--out", default=None, help="also write every run's alerts and the table as JSON")
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                    help="a StabilityMonitor option for every run (repeatable), e.g. --set early_warning.warmup=15 (a dotted name sets a detector's argument)")
    ap.add_argument("--from", dest="source", default=None,
                    help="re-summarise the runs stored by earlier --out FILE[,FILE...] (no training; later "
                         "files replace runs of the same scenario and seed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.source:
        return report(load_runs(args.source), None)
    options = {}
    for item in args.options:
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value not in ("None", "") else None
    chosen = [*BREAKING, *STABLE]
    if args.scenarios:
        names = set(args.scenarios.split(","))
        chosen = [s for s in chosen if s.name in names]
    elif args.quick:
        chosen = [s for s in chosen if s.name in QUICK]
    runs = []
    print(f"{'scenario':22} {'kind':8} {'seed':>4} {'trig':>5} {'spike':>6} {'loopdyn':>8} {'lead':>5}  first alerts",
          flush=True)
    for sc in chosen:
        for seed in range(args.seeds):
            seed_ = seed + sc.seed
            steps = args.stable_steps if sc.kind == "stable" else sc.trigger + (sc.after or args.after)
            run = run_scenario(sc, seed_, steps, monitor_options=options)
            runs.append(run)
            ours = detections(run)["loopdyn"]
            after = [t for t in ours if t >= sc.trigger]
            spike = run.spike_step if sc.kind != "stable" else None
            lead = (spike - after[0]) if (spike is not None and after) else None
            firsts = "; ".join(f"{a.kind}:{a.signal}@{a.detected_step}" for a in run.alerts
                               if a.kind != "action")[:150]
            print(f"{sc.name:22} {sc.kind:8} {seed_:>4} {sc.trigger:>5} {str(spike):>6} "
                  f"{str(after[0] if after else None):>8} {str(lead):>5}  {firsts}  ({run.seconds:.0f} s)", flush=True)
    return report(runs, args.out)


def load_runs(path) -> list[Run]:
    """Runs stored by --out (alerts rebuilt from their records; without grad_norms, ZClip is NaN)."""
    from loopdyn.probes import Alert

    by_name = {s.name: s for s in BREAKING + STABLE}
    records = {}
    for one in str(path).split(","):  # later files replace earlier runs of the same scenario and seed
        for rec in json.loads(Path(one).read_text())["runs"]:
            records[rec["scenario"], rec["seed"]] = rec
    runs = []
    for rec in records.values():
        alerts = [Alert(a["step"], a["kind"], a["severity"], a["signal"], a["value"], a["threshold"], a["message"],
                        score=a.get("score"), detected_step=a.get("detected_step")) for a in rec["alerts"]]
        runs.append(Run(by_name[rec["scenario"]], rec["seed"], rec["losses"],
                        rec.get("grad_norms") or [math.nan] * len(rec["losses"]), alerts))
    return runs


def report(runs: list[Run], out) -> int:
    args = argparse.Namespace(out=out)
    summary = summarise(runs)
    print(f"\n{summary['broke']}/{summary['breaking_runs']} breaking runs broke; {summary['stable_runs']} stable runs, "
          f"{summary['stable_steps']} stable steps; loop_instability alerts in stable runs: "
          f"{summary['loop_instability_in_stable_runs']}")
    print(f"{'detector':12} {'recall@≥1':>9} {'recall@≥5':>9} {'median lead':>11} {'gradual@≥5':>10} "
          f"{'abrupt in time':>14} {'FA/1000':>8}")
    for d, row in summary["table"].items():
        print(f"{d:12} {row['recall_lead1']:>9.2f} {row['recall_lead5']:>9.2f} {row['median_lead']:>11.1f} "
              f"{row['gradual_recall_lead5']:>10.2f} {row['abrupt_in_time']:>14} {row['false_alarms_per_1000']:>8.2f}")
    if args.out:
        records = [{"scenario": r.scenario.name, "kind": r.scenario.kind, "seed": r.seed, "trigger": r.scenario.trigger,
                    "spike_step": r.spike_step, "losses": r.losses, "grad_norms": r.grad_norms,
                    "alerts": [a.record() for a in r.alerts]} for r in runs]
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": records}, default=str))
    ours = summary["table"]["loopdyn"]
    print(f"RESULT spike_scenarios recall_lead1={ours['recall_lead1']:.2f} recall_lead5={ours['recall_lead5']:.2f} "
          f"gradual_recall_lead5={ours['gradual_recall_lead5']:.2f} abrupt_in_time={ours['abrupt_in_time']} "
          f"median_lead={ours['median_lead']:g} false_alarms_per_1000={ours['false_alarms_per_1000']:.2f} "
          f"broke={summary['broke']}/{summary['breaking_runs']} stable_steps={summary['stable_steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
