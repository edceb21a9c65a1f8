"""Probe overhead: training step time with a StabilityMonitor at its default settings divided by
the time without, on the `small` preset, measured interleaved in one run.

Two identical models (same initialisation, same batches, same optimiser settings) train in
alternating blocks of `--block` steps: one always has the monitor attached, the other never.
The block order flips every round so drifts (machine load, warm-up) cancel. Reported:
the median over rounds of (monitored block time / plain block time), and the ratio of the
total times (which also carries the every-N-steps probes in proportion).

The monitored model's probe methods are timed individually (a subclass wraps them with
perf_counter; on the CPU every call is synchronous, so the times are exact), which gives the
cost of each signal as a fraction of a plain step.

    python bench/probe_overhead.py [--steps 200] [--block 10] [--preset small] [--batch 8 --seq 64]

ends with `RESULT probe_overhead ratio=<median ratio> ratio_total=… step_ms=…`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loopdyn.models import LoopConfig, LoopedLM  # noqa: E402
from loopdyn.probes import StabilityMonitor  # noqa: E402

# method → the signal (or piece of machinery) whose cost it is
TIMED = {
    "_record_grad_norm": "grad_norm",
    "_copy_params": "update_ratio",
    "_record_update_ratio": "update_ratio",
    "_record_loop_state": "state_norm / rel_residual",
    "_tap": "state_norm_max (per loop)",
    "_record_logz": "logz",
    "_attn_pre": "attn_logit_max",
    "_record_attention": "attn_logit_max",
    "_record_spectral": "injection spectrum",
    "_record_embedding": "embed_outliers",
    "_record_jacobian": "jacobian_norm",
    "_run_detectors": "detectors (host)",
    "_flush_host": "host transfer",
    "_commit": "bookkeeping",
    "_act": "decisions / actions",
}
ENTRY_POINTS = ("_root_pre", "_root_post", "_tap", "_attn_pre", "_head_post", "_opt_pre", "_opt_post")


class TimedMonitor(StabilityMonitor):
    """StabilityMonitor whose probe methods and hook entry points accumulate their wall time."""

    def __init__(self, *args, **kwargs):
        self.costs = defaultdict(float)
        self.calls = defaultdict(int)
        self.total = 0.0
        self._depth_timer = 0
        super().__init__(*args, **kwargs)


def _timed(name, method, entry):
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        if entry:
            self._depth_timer += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            if name in TIMED:
                self.costs[TIMED[name]] += dt
                self.calls[TIMED[name]] += 1
            if entry:
                self._depth_timer -= 1
                if self._depth_timer == 0:
                    self.total += dt
    wrapper.__name__ = name
    return wrapper


for _name in set(TIMED) | set(ENTRY_POINTS):
    setattr(TimedMonitor, _name, _timed(_name, getattr(StabilityMonitor, _name), _name in ENTRY_POINTS))


def make(preset: str, seed: int):
    torch.manual_seed(seed)
    model = LoopedLM(LoopConfig.preset(preset)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def run_block(model, opt, batches, monitor=None) -> float:
    t0 = time.perf_counter()
    for x, y in batches:
        loss = model(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if monitor is not None:
            monitor.record_grad_norm(gn)
        opt.step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=200, help="steps per model (after warm-up)")
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, plain_opt = make(args.preset, 0)
    watched, watched_opt = make(args.preset, 0)
    monitor = TimedMonitor(watched, watched_opt, console=False)
    gen = torch.Generator().manual_seed(0)
    V = plain.config.vocab_size

    def batches(n):
        data = torch.randint(0, V, (n, args.batch, args.seq + 1), generator=gen)
        return [(d[:, :-1], d[:, 1:]) for d in data]

    warm = batches(3)  # warm-up (allocator, first-call costs), not timed
    run_block(plain, plain_opt, warm)
    run_block(watched, watched_opt, warm, monitor)
    monitor.costs.clear()
    monitor.calls.clear()
    monitor.total = 0.0

    ratios, t_plain, t_watched = [], 0.0, 0.0
    rounds = args.steps // args.block
    for r in range(rounds):
        data = batches(args.block)
        order = [(plain, plain_opt, None), (watched, watched_opt, monitor)]
        if r % 2:
            order.reverse()
        times = {}
        for model, opt, mon in order:
            times[mon is not None] = run_block(model, opt, data, mon)
        ratios.append(times[True] / times[False])
        t_plain += times[False]
        t_watched += times[True]
    monitor.close()
    n = rounds * args.block
    step_ms = 1e3 * t_plain / n
    ratio = statistics.median(ratios)
    ratio_total = t_watched / t_plain
    print(f"{args.preset}: {plain.num_params():,} parameters, batch {args.batch}×{args.seq}, "
          f"{args.threads} thread(s), {n} steps per model in {rounds} interleaved blocks of {args.block}")
    print(f"plain step {step_ms:.1f} ms; monitored/plain: median over blocks {ratio:.4f}, "
          f"total {ratio_total:.4f} (blocks: min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"time inside the monitor: {1e3 * monitor.total / n:.3f} ms/step = "
          f"{100 * monitor.total / t_plain:.2f} % of a plain step")
    print(f"{'signal':28} {'calls':>6} {'ms/call':>9} {'ms/step':>9} {'% of step':>9}")
    for name, cost in sorted(monitor.costs.items(), key=lambda kv: -kv[1]):
        calls = monitor.calls[name]
        print(f"{name:28} {calls:>6} {1e3 * cost / calls:>9.3f} {1e3 * cost / n:>9.3f} {100 * cost / t_plain:>9.3f}")
    print(f"RESULT probe_overhead ratio={ratio:.4f} ratio_total={ratio_total:.4f} step_ms={step_ms:.1f} "
          f"monitor_pct={100 * monitor.total / t_plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
