"""Probe overhead: training step time with a StabilityMonitor at its default settings divided by
the time without, on the `small` preset, measured interleaved in one run.

Two identical models (same initialisation, same batches, same optimiser settings) train in
alternating blocks of `--block` steps: one always has the monitor attached, the other never.
The block order flips every round so drifts (machine load, warm-up) cancel. Reported:
the median over rounds of (monitored block time / plain block time), and the ratio of the
total times (which also carries the every-N-steps probes in proportion).

The monitor's probe methods (on its SignalBus and Policy) are timed individually (subclasses
wrap them with perf_counter; on the CPU every call is synchronous, so the times are exact),
which gives the cost of each signal as a fraction of a plain step.

    python bench/probe_overhead.py [--steps 200] [--block 10] [--preset small] [--batch 8 --seq 64]
                                   [--warmup-steps 210]

The timed steps are the steady state: the first `--warmup-steps` (210) run untimed on both
models, past the monitor's one-time costs — its dense start (the update ratio every step for
the first 50 steps: +0.3–0.8 % of a step while it lasts) and the first loop-Jacobian estimate
at step 200 (cold-started: 5× the iterations of the later, warm-started ones, ~0.1 s on
`small`). The timed window then holds the warm Jacobian at step 400, as every 200 steps after.

`--compile` compiles both models (torch.compile, `--backend`, default inductor): the monitor is
then in compile-safe mode (its own eager probe pass, no hook on compiled code) and the ratio is
compiled+monitored over compiled. Dynamo's counters (graphs compiled, graph breaks,
recompilations) are printed for the plain compiled model, for the monitored one, over the
timed steps, and — `--hooks-steps N` (default 60, 0: skip) — for a third copy monitored through
hooks inside the compiled graph (`compile_safe=False`, the monitor's behaviour before
compile-safe mode existed).

ends with `RESULT probe_overhead ratio=<median ratio> ratio_total=… step_ms=…` (and with
--compile `graphs_plain=… graphs_monitored=… graph_breaks=… recompiles_timed=…`).
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

import loopdyn.probes.monitor as monitor_module  # noqa: E402
from loopdyn.probes.bus import SignalBus  # noqa: E402
from loopdyn.probes.policy import Policy  # noqa: E402

# (class, method) → the signal (or piece of machinery) whose cost it is
TIMED = {
    (SignalBus, "_record_grad_norm"): "grad_norm",
    (SignalBus, "_copy_params"): "update_ratio",
    (SignalBus, "_record_update_ratio"): "update_ratio",
    (SignalBus, "_record_loop_state"): "state_norm / rel_residual / growth",
    (SignalBus, "_tap"): "state_norm_max (per loop)",
    (SignalBus, "_record_logz"): "logz",
    (SignalBus, "_attn_pre"): "attn_logit_max",
    (SignalBus, "_record_attention"): "attn_logit_max",
    (SignalBus, "_record_spectral"): "injection spectrum",
    (SignalBus, "_record_embedding"): "embed_outliers",
    (SignalBus, "_record_jacobian"): "jacobian_norm",
    (SignalBus, "_record_loop_probe"): "loop probe unroll",
    (SignalBus, "optimizer_view"): "lr / optimiser precursors",
    (Policy, "pre_step"): "lr / optimiser precursors",
    (Policy, "observe"): "detectors (host)",
    (SignalBus, "flush"): "host transfer",
    (SignalBus, "commit"): "bookkeeping",
    (Policy, "act"): "decisions / actions",
}
ENTRY_POINTS = ("_root_pre", "_root_post", "_tap", "_attn_pre", "_head_post", "_opt_pre", "_opt_post")


class Timer:
    """Wall time of the monitor's probe methods and of its hook entry points (the total)."""

    def __init__(self):
        self.costs = defaultdict(float)
        self.calls = defaultdict(int)
        self.total = 0.0
        self.depth = 0

    def clear(self):
        self.costs.clear()
        self.calls.clear()
        self.total = 0.0


TIMER = Timer()


def _timed(label, method, entry):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        if entry:
            TIMER.depth += 1
        try:
            return method(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            if label is not None:
                TIMER.costs[label] += dt
                TIMER.calls[label] += 1
            if entry:
                TIMER.depth -= 1
                if TIMER.depth == 0:
                    TIMER.total += dt
    wrapper.__name__ = method.__name__
    return wrapper


class TimedBus(SignalBus):
    pass


class TimedPolicy(Policy):
    pass


for (_cls, _name), _label in TIMED.items():
    if not hasattr(_cls, _name):
        continue
    _target = TimedBus if _cls is SignalBus else TimedPolicy
    setattr(_target, _name, _timed(_label, getattr(_cls, _name), _name in ENTRY_POINTS))
for _name in ENTRY_POINTS:
    if (SignalBus, _name) not in TIMED:
        setattr(TimedBus, _name, _timed(None, getattr(SignalBus, _name), True))


def TimedMonitor(*args, **kwargs):
    """A StabilityMonitor whose bus and policy time their methods (into TIMER)."""
    monitor_module.SignalBus, monitor_module.Policy = TimedBus, TimedPolicy
    try:
        return StabilityMonitor(*args, **kwargs)
    finally:
        monitor_module.SignalBus, monitor_module.Policy = SignalBus, Policy


def make(preset: str, seed: int):
    torch.manual_seed(seed)
    model = LoopedLM(LoopConfig.preset(preset)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def run_block(model, opt, batches, monitor=None, net=None) -> float:
    net = model if net is None else net
    t0 = time.perf_counter()
    for x, y in batches:
        loss = net(x, y).loss
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
    ap.add_argument("--warmup-steps", type=int, default=210,
                    help="untimed steps first: allocator and first-call costs, the monitor's dense start (the "
                         "update ratio every step for its first 50 steps) and its first, cold-started loop "
                         "Jacobian (5× the iterations, at step 200); 3 times all of them")
    ap.add_argument("--compile", action="store_true", help="both models through torch.compile")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend with --compile")
    ap.add_argument("--hooks-steps", type=int, default=60,
                    help="with --compile: steps of a third copy monitored through hooks (compile_safe=False) "
                         "to count what that costs in graphs (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain, plain_opt = make(args.preset, 0)
    watched, watched_opt = make(args.preset, 0)
    gen = torch.Generator().manual_seed(0)
    V = plain.config.vocab_size

    def batches(n):
        data = torch.randint(0, V, (n, args.batch, args.seq + 1), generator=gen)
        return [(d[:, :-1], d[:, 1:]) for d in data]

    plain_net = watched_net = None
    counts = {}
    if args.compile:
        from torch._dynamo.utils import counters

        def dynamo(label):
            stats = counters["stats"]
            counts[label] = {"graphs": stats.get("unique_graphs", 0),
                             "graph_breaks": sum(counters["graph_break"].values()),
                             "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}
            counters.clear()

        torch._dynamo.reset()
        counters.clear()
        plain_net = torch.compile(plain, backend=args.backend)
        run_block(plain, plain_opt, batches(3), net=plain_net)
        dynamo("plain compiled (first 3 steps)")
        watched_net = torch.compile(watched, backend=args.backend)
        monitor = TimedMonitor(watched_net, watched_opt, console=False)
        run_block(watched, watched_opt, batches(3), monitor, net=watched_net)
        dynamo("compiled + monitor, compile-safe (first 3 steps)")
        print(f"monitor mode: {'compile-safe' if monitor.compile_safe else 'hooks'}")
    else:
        monitor = TimedMonitor(watched, watched_opt, console=False)

    left = max(3, args.warmup_steps)  # not timed
    while left > 0:
        warm = batches(min(10, left))
        run_block(plain, plain_opt, warm, net=plain_net)
        run_block(watched, watched_opt, warm, monitor, net=watched_net)
        left -= len(warm)
    TIMER.clear()

    ratios, t_plain, t_watched = [], 0.0, 0.0
    rounds = args.steps // args.block
    for r in range(rounds):
        data = batches(args.block)
        order = [(plain, plain_opt, None), (watched, watched_opt, monitor)]
        if r % 2:
            order.reverse()
        times = {}
        for model, opt, mon in order:
            times[mon is not None] = run_block(model, opt, data, mon, net=watched_net if mon else plain_net)
        ratios.append(times[True] / times[False])
        t_plain += times[False]
        t_watched += times[True]
    monitor.close()
    if args.compile:
        dynamo(f"both, over the {args.warmup_steps} warm-up + {rounds * args.block} timed steps")
        if args.hooks_steps > 0:
            hooked, hooked_opt = make(args.preset, 0)
            hooked_net = torch.compile(hooked, backend=args.backend)
            with StabilityMonitor(hooked_net, hooked_opt, console=False, compile_safe=False) as legacy:
                run_block(hooked, hooked_opt, batches(args.hooks_steps), legacy, net=hooked_net)
            dynamo(f"compiled + monitor through hooks (compile_safe=False), {args.hooks_steps} steps")
        for label, c in counts.items():
            print(f"dynamo {label}: {c['graphs']} graphs, {c['graph_breaks']} graph breaks, "
                  f"{c['recompiles']} recompilations")
    n = rounds * args.block
    step_ms = 1e3 * t_plain / n
    ratio = statistics.median(ratios)
    ratio_total = t_watched / t_plain
    print(f"{args.preset}: {plain.num_params():,} parameters, batch {args.batch}×{args.seq}, "
          f"{args.threads} thread(s), {n} steps per model in {rounds} interleaved blocks of {args.block}")
    print(f"plain step {step_ms:.1f} ms; monitored/plain: median over blocks {ratio:.4f}, "
          f"total {ratio_total:.4f} (blocks: min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"time inside the monitor: {1e3 * TIMER.total / n:.3f} ms/step = "
          f"{100 * TIMER.total / t_plain:.2f} % of a plain step")
    print(f"{'signal':28} {'calls':>6} {'ms/call':>9} {'ms/step':>9} {'% of step':>9}")
    for name, cost in sorted(TIMER.costs.items(), key=lambda kv: -kv[1]):
        calls = TIMER.calls[name]
        print(f"{name:28} {calls:>6} {1e3 * cost / calls:>9.3f} {1e3 * cost / n:>9.3f} {100 * cost / t_plain:>9.3f}")
    extra = ""
    if args.compile:
        c = list(counts.values())
        extra = (f" compiled=1 graphs_plain={c[0]['graphs']} graphs_monitored={c[1]['graphs']} "
                 f"graphs_timed={c[2]['graphs']} graph_breaks={c[1]['graph_breaks'] + c[2]['graph_breaks']} "
                 f"recompiles_timed={c[2]['recompiles']}"
                 + (f" graphs_hooks={c[3]['graphs']}" if len(c) > 3 else ""))
    print(f"RESULT probe_overhead ratio={ratio:.4f} ratio_total={ratio_total:.4f} step_ms={step_ms:.1f} "
          f"monitor_pct={100 * TIMER.total / t_plain:.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
