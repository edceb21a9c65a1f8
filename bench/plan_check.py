"""`loopdyn plan` against measured runs on this machine: peak memory and time of a forward pass
at T loops and of a training step with gradients through k loops, across presets and the three
families (loopdyn/Parcae presets, a Huginn-shaped and an Ouro-shaped model at reduced width).

Each case runs in three fresh child processes (random weights, built in the compute dtype): one
for the peak resident memory (VmHWM, reset through /proc/self/clear_refs after the imports) minus
the resident memory before the model exists, run with MALLOC_MMAP_THRESHOLD_=65536 so that freed
activations leave the process; one for the wall times (forward: best of 5, training step: best
of 5, each after a warm-up one: the steady state the plan models) with the allocator as loopdyn's
commands set it (loopdyn/allocator.py: freed memory kept for the next pass); and one for the same
times with glibc's defaults (LOOPDYN_ALLOCATOR=system, printed beside, not judged: a pass there
faults freed memory in again, by an amount that depends on the heap's history). The plan's device
rates are measured for each case in the parent (`plan --measure`'s calibration at the case's own
matmul shapes, the allocator set as `loopdyn plan` sets it), right before the case runs. Ratios
measured/planned are printed side by side; targets: memory within 15 %, time within 25 %.

    python bench/plan_check.py [--cases tiny-like,...] [--threads 2] [--seq-len 128] [--batch 4]

Ends with `RESULT plan_check memory_worst=… time_worst=…`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

CASES = {  # name: (spec, overrides, dtype, T, k)
    "parcae-140m-f32": ("parcae-140m", {}, "float32", 8, 4),
    "parcae-370m-bf16": ("parcae-370m", {}, "bfloat16", 8, 4),
    "small-f32-T16": ("small", {"mean_loops": 16}, "float32", 16, 16),
    "huginn-mini-bf16": ("huginn-0125", {"n_embd": 1056, "n_heads": 11, "intermediate_size": 3584,
                                         "vocab_size": 8192}, "bfloat16", 8, 4),
    "ouro-mini-f32": ("ouro-1.4b", {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                                    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 8192},
                      "float32", 4, 4),
}

CHILD = r"""
import json, os, sys, time, resource
import torch
spec, overrides, dtype, T, k, B, S, threads = json.loads(sys.argv[1])
from loopdyn.allocator import keep_freed_memory
allocator = keep_freed_memory()  # as loopdyn's commands (left alone under MALLOC_* or LOOPDYN_ALLOCATOR=system)
torch.set_num_threads(threads)

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

from loopdyn.models.precision import precision
prec = precision(dtype)
family = "huginn" if spec == "huginn-0125" else "ouro" if spec.startswith("ouro") else "loopdyn"
import gc
idx = torch.randint(0, 256, (B, S))
out = {}
base = rss(); reset()
if family == "loopdyn":
    from loopdyn.models import LoopConfig, LoopedLM
    cfg = LoopConfig.preset(spec, **overrides)
    torch.manual_seed(0)
    model = LoopedLM(cfg)
elif family == "huginn":
    from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM
    torch.manual_seed(0)
    model = HuginnLM(HuginnConfig(**overrides))
else:
    from loopdyn.models.importers.ouro import OuroConfig, OuroLM
    torch.manual_seed(0)
    model = OuroLM(OuroConfig.ouro_1_4b(**overrides))
prec.apply(model)
gc.collect()
weights_rss = rss() - base
reset()
model.eval()
times = []
from loopdyn.models import protocol
with torch.no_grad(), prec.context("cpu"):
    for _ in range(1 + 5):  # a warm-up pass (oneDNN's primitives, the thread pool), then best of 5
        t = time.perf_counter()
        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)
        for _ in range(T):
            h = model.step(h, ctx)
        model.decode(h, ctx)
        del ctx, h
        times.append(time.perf_counter() - t)
out["forward_s"] = min(times[1:])
out["forward_bytes"] = hwm() - base
# training step: gradients through k of T loops
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
reset()
ts = []
for _ in range(1 + 5):  # a warm-up step (it also allocates AdamW's moments), then best of 5
    t = time.perf_counter()
    with prec.context("cpu"):
        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)
        with torch.no_grad():
            for _ in range(T - k):
                h = model.step(h, ctx)
        h = h.detach()
        for _ in range(k):
            h = model.step(h, ctx)
        logits = model.decode(h, ctx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
        del ctx, h, logits
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # as nanoGPT and Lightning: no gradients held through the next forward
    del loss
    ts.append(time.perf_counter() - t)
out["train_s"] = min(ts[1:])
out["train_bytes"] = hwm() - base
out["weights_rss"] = weights_rss
out["allocator"] = allocator
print("JSON" + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from loopdyn.allocator import keep_freed_memory
    from loopdyn.scaling.plan import plan

    keep_freed_memory()  # as `loopdyn plan --measure`

    worst_mem = worst_time = 0.0
    rows = []
    devices = {}
    for name in args.cases.split(","):
        spec, overrides, dtype, T, k = CASES[name]
        p = plan(spec, batch=args.batch, seq_len=args.seq_len, dtype=dtype, overrides=overrides)
        devices[name] = p.measure().device  # as `plan --measure`
        payload = json.dumps([spec, overrides, dtype, T, k, args.batch, args.seq_len, args.threads])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        # memory with freed activations returned to the system (resident memory follows the
        # tensors); time with the allocator as loopdyn's commands set it, and with glibc's defaults
        runs = {}
        for mode, extra in (("memory", {"MALLOC_MMAP_THRESHOLD_": "65536"}), ("time", {}),
                            ("system", {"LOOPDYN_ALLOCATOR": "system"})):
            res = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True,
                                 env={**env, **extra})
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("JSON")), None)
            if line is None:
                print(f"{name}: child failed: {res.stderr.strip().splitlines()[-1:] }")
                break
            runs[mode] = json.loads(line[4:])
        if len(runs) < 3:
            continue
        mem, tim, system = runs["memory"], runs["time"], runs["system"]
        if not tim["allocator"].startswith("freed memory kept"):
            print(f"{name}: the timed child's allocator was not set ({tim['allocator']}): its times are glibc's")
        m = {**mem, "forward_s": tim["forward_s"], "train_s": tim["train_s"]}
        roof = dataclasses.replace(p.device, kernel_seconds={})
        saved, p.device = p.device, roof
        rooflines = (p.forward_seconds(T), p.training_seconds(T, k))
        p.device = saved
        planned = {"forward_bytes": p.inference_bytes(T), "train_bytes": p.training_bytes(k),
                   "forward_s": p.forward_seconds(T), "train_s": p.training_seconds(T, k)}
        ratios = {key: m[key] / planned[key] for key in planned}
        worst_mem = max(worst_mem, *(abs(ratios[k2] - 1) for k2 in ("forward_bytes", "train_bytes")))
        worst_time = max(worst_time, *(abs(ratios[k2] - 1) for k2 in ("forward_s", "train_s")))
        rows.append((name, m, planned, ratios))
        print(f"{name:>18}: forward {m['forward_bytes'] / 2**30:.3f} GiB measured vs {planned['forward_bytes'] / 2**30:.3f} "
              f"planned (×{ratios['forward_bytes']:.2f}), {m['forward_s']:.3f} s vs {planned['forward_s']:.3f} "
              f"(×{ratios['forward_s']:.2f}); train {m['train_bytes'] / 2**30:.3f} vs {planned['train_bytes'] / 2**30:.3f} GiB "
              f"(×{ratios['train_bytes']:.2f}), {m['train_s']:.3f} s vs {planned['train_s']:.3f} (×{ratios['train_s']:.2f}); "
              f"roofline only: ×{m['forward_s'] / rooflines[0]:.2f} / ×{m['train_s'] / rooflines[1]:.2f}; "
              f"unplanned: forward {(m['forward_bytes'] - planned['forward_bytes']) / 2**20:+.0f} MiB, train "
              f"{(m['train_bytes'] - planned['train_bytes']) / 2**20:+.0f} MiB (weights resident "
              f"{m['weights_rss'] / 2**20:.0f} MiB, planned {p.weight_bytes / 2**20:.0f}); glibc's defaults "
              f"(not judged): {system['forward_s']:.3f} s (×{system['forward_s'] / planned['forward_s']:.2f}) / "
              f"{system['train_s']:.3f} s (×{system['train_s'] / planned['train_s']:.2f})", flush=True)
    for name, d in devices.items():
        print(f"device ({name}): {d.flops / 1e9:.1f} GFLOP/s, {d.bandwidth / 1e9:.1f} GB/s, "
              f"{d.overhead * 1e6:.1f} µs per operator, {d.source}")
    print(f"RESULT plan_check cases={len(rows)} memory_worst={worst_mem:.3f} time_worst={worst_time:.3f} "
          f"seq_len={args.seq_len} batch={args.batch} threads={args.threads} at={time.strftime('%H:%M')}")


if __name__ == "__main__":
    main()
