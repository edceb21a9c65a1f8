"""Training throughput: looped models vs their fixed-depth twins with the same forward FLOPs.

For each preset (tiny, small) it builds the looped model and `config.fixed_depth_twin("flops")`
(P + R·μ_rec + C blocks, no loop), then alternates blocks of training steps between the two,
so both see the same machine load, and reports the median time per step. The looped model
runs its first loops without gradients (truncated backprop), so it can be faster than its twin.

    python bench/throughput.py [--rounds 5 --steps-per-round 5 --batch 8 --seq 64]

Ends with: RESULT throughput tiny_steps_per_s=... tiny_ratio=... small_ratio=...
(ratio = looped tokens/s ÷ twin tokens/s).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.data import load_text
from loopdyn.train import TrainConfig, make_optimizer


def step_times(model, optimizer, data, generator, batch, seq, n):
    times = []
    for _ in range(n):
        x, y = data.batch(batch, seq, generator)
        t = time.perf_counter()
        loss = model(x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return times


def compare(preset: str, data, args) -> dict:
    torch.manual_seed(0)
    looped_cfg = LoopConfig.preset(preset)
    runs = {"looped": LoopedLM(looped_cfg), "twin": LoopedLM(looped_cfg.fixed_depth_twin("flops"))}
    opts = {k: make_optimizer(m.train(), TrainConfig()) for k, m in runs.items()}
    gen = torch.Generator().manual_seed(0)
    for k in runs:  # warm-up
        step_times(runs[k], opts[k], data, gen, args.batch, args.seq, 2)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k in runs:
            times[k] += step_times(runs[k], opts[k], data, gen, args.batch, args.seq, args.steps_per_round)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    print(f"{preset:6s} looped ({looped_cfg.effective_depth} effective blocks, {runs['looped'].num_params():,} params): "
          f"{1 / med['looped']:6.2f} steps/s, {tokens / med['looped']:8,.0f} tokens/s")
    print(f"{'':6s} twin   ({runs['twin'].config.n_prelude} blocks, {runs['twin'].num_params():,} params): "
          f"{1 / med['twin']:6.2f} steps/s, {tokens / med['twin']:8,.0f} tokens/s")
    ratio = med["twin"] / med["looped"]
    print(f"{'':6s} looped/twin tokens/s ratio {ratio:.2f}")
    return {"steps_per_s": 1 / med["looped"], "ratio": ratio}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--presets", default="tiny,small")
    args = p.parse_args()
    data = load_text()
    print(f"batch {args.batch} × {args.seq} tokens, {torch.get_num_threads()} threads")
    results = {name: compare(name, data, args) for name in args.presets.split(",")}
    fields = " ".join(f"{n}_steps_per_s={r['steps_per_s']:.2f} {n}_ratio={r['ratio']:.2f}" for n, r in results.items())
    print(f"RESULT throughput {fields}")


if __name__ == "__main__":
    main()
