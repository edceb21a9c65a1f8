"""What `loopdyn audit` costs, from the tiny preset to a randomly initialised parcae-1.3b, and
how that cost grows with the model size and the probe length.

For each model size the parent writes a randomly initialised checkpoint to a temporary folder
(float32 for tiny/small/parcae-140m with the official initialisation; bfloat16 for the larger
paper sizes, filled with the official scales, so that the audit reads bf16 weights into a
float32 model), then for each probe length S runs `loopdyn audit PATH --seq-len S` through
`loopdyn.cli.main` in a fresh child process (the real command path: load, probe, audit,
report, JSON). Inside the child

* `loopdyn.models.load` is wrapped: load seconds and the peak resident memory of loading
  (VmHWM), after which the high-water mark is reset (/proc/self/clear_refs),
* `loopdyn.dynamics.auditing.audit` is wrapped so that the forward pass of the model on
  the same probe is timed right before and right after the audit (same process, same
  threads): forward equivalents = audit wall time ÷ median forward time, and the audit's
  peak memory (VmHWM from the reset on: weights, audit, forwards).

Variant `perturbed` (default): core output projections drawn N(0, 0.02²), a nonlinear core
with full-length Krylov runs (the expensive case); `init`: the official initialisation (every
core block is the identity). The fits are least squares of log(cost) on log(size) at one
probe length and on log(S) at one size. Targets (issue 15): parcae-1.3b at 256 tokens on
2 cores / 24 GiB: peak ≤ 10 GiB, ≤ 30 forward-pass equivalents.

    python bench/audit_cost.py [--sizes tiny,small,parcae-140m] [--seq-lens 64,256,1024]
                               [--threads 2] [--out FILE.jsonl] [--table FILE.jsonl ...]
                               [--store auto|f32|bf16] [--load-only]

`--store` chooses the stored dtype (auto: as above); `--load-only` times only
`loopdyn.models.load` of the written checkpoint in a fresh child (seconds and peak resident
memory, VmHWM), e.g. `--sizes parcae-1.3b --store f32 --load-only`.

Each finished case is appended to --out as one JSON line, so slow cases (parcae-770m and
-1.3b take many minutes each) can run on their own, in the background, and `--table` prints
the table and the fits from any number of such files without running anything.

Ends with: RESULT audit_cost forward_equivalents=<max> peak_gib=<max> ...
"""
from __future__ import annotations

import os

# OpenMP workers that spin while waiting for work starve each other on a shared machine (a
# 2-thread training step measured 25–40 s instead of 0.85 s at load 12): let them sleep. Set
# before torch is imported (and inherited by child processes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time

CHILD = textwrap.dedent(r"""
    import json, os, statistics, sys, time
    import torch
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    import loopdyn.models as lm
    import loopdyn.dynamics.auditing as da
    from loopdyn.cli import main

    def hwm_gib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
        return float("nan")

    def reset_hwm():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    result = {}
    real_load, real_audit = lm.load, da.audit

    def timed_load(*args, **kwargs):
        t = time.perf_counter()
        model = real_load(*args, **kwargs)
        result.update(load_s=time.perf_counter() - t, load_peak_gib=hwm_gib(),
                      weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
                      dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
        result["hwm_reset"] = reset_hwm()
        return model

    def fwd_times(model, idx, n):
        times = []
        with torch.no_grad():
            for _ in range(n):
                t = time.perf_counter()
                model(idx)
                times.append(time.perf_counter() - t)
        return times

    def timed_audit(model, idx, *args, **kwargs):
        if os.environ["BENCH_VARIANT"] == "perturbed":
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for blk in model.core:
                    blk.attn.c_proj.weight.normal_(0, 0.02, generator=g)
                    blk.mlp.proj.weight.normal_(0, 0.02, generator=g)
        n_fwd = int(os.environ["BENCH_FORWARDS"])
        before = fwd_times(model, idx, n_fwd)
        t = time.perf_counter()
        report = real_audit(model, idx, *args, **kwargs)
        seconds = time.perf_counter() - t
        after = fwd_times(model, idx, max(n_fwd - 1, 1))
        result.update(audit_s=seconds, forward_s=statistics.median(before + after), cost=report.cost.to_json(),
                      verdict=report.verdict, tokens=int(idx.numel()), params=model.num_params())
        return report

    lm.load, da.audit = timed_load, timed_audit
    code = main(["audit", sys.argv[1], "--seq-len", sys.argv[3], "--no-progress", "--json", sys.argv[2]])
    result["exit"] = code
    result["audit_peak_gib"] = hwm_gib()
    print("BENCH_JSON " + json.dumps(result))
""")

DEFAULT_SIZES = "tiny,small,parcae-140m"
DEFAULT_SEQ_LENS = "64,256,1024"
FLOAT32_SIZES = ("tiny", "small", "parcae-140m")  # official init in float32; larger: bf16 at the official scales


def write_checkpoint(size: str, path: str, store: str = "auto") -> str:
    """A randomly initialised `size` at `path`: float32 official init (auto for the small sizes),
    or the official scales stored in bf16 (auto for parcae-370m and up) or f32. Returns the
    stored dtype ("f32" | "bf16")."""
    import torch

    from loopdyn.models import LoopConfig, LoopedLM, save

    torch.manual_seed(0)
    config = LoopConfig.preset(size)
    if store == "auto" and size in FLOAT32_SIZES:
        save(LoopedLM(config), path)
        return "f32"
    store = "bf16" if store == "auto" else store
    # Built on the meta device (no float32 copy, no orthogonal QR of every matrix), then
    # materialised in the stored dtype and filled with the official scales: matrices
    # N(0, 2/(5·width)), output projections zero, norm gains 1, value embeddings N(0, 1),
    # injection as official.
    with torch.device("meta"):
        model = LoopedLM(config)
    model = model.to(torch.bfloat16 if store == "bf16" else torch.float32).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("value_embeds."):
                p.normal_(0, 1, generator=g)
            elif name.endswith(("c_proj.weight", "mlp.proj.weight")) or name.endswith(".bias") or "qk_bias" in name:
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif name.startswith("injection."):
                continue
            elif name.endswith("ve_gate.weight"):
                p.uniform_(-32 ** -0.5, 32 ** -0.5, generator=g)  # PyTorch's default, as official
            else:
                width = config.d_state if name.startswith("core.") else config.d_model
                p.normal_(0, math.sqrt(2 / (5 * width)), generator=g)
        model.injection.reset_parameters()
    save(model, path)
    return store


LOAD_CHILD = textwrap.dedent(r"""
    import json, os, sys, time
    import torch
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    import loopdyn.models as lm

    t = time.perf_counter()
    model = lm.load(sys.argv[1])
    seconds = time.perf_counter() - t
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2 ** 20
    print("BENCH_JSON " + json.dumps(dict(
        load_s=seconds, load_peak_gib=hwm, params=model.num_params(),
        weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30)))
""")


def run_load_child(path: str, threads: int) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, path], capture_output=True, text=True, env=env,
                          check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"load child failed ({path})")
    return json.loads(line[len("BENCH_JSON "):])


def run_child(path: str, seq_len: int, variant: str, threads: int, forwards: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, BENCH_VARIANT=variant, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   BENCH_FORWARDS=str(forwards))
        proc = subprocess.run([sys.executable, "-c", CHILD, path, os.path.join(tmp, "audit.json"), str(seq_len)],
                              capture_output=True, text=True, env=env, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed ({path}, S={seq_len}, {variant})")
    result = json.loads(line[len("BENCH_JSON "):])
    if "audit_s" not in result:  # the command refused: show its one-line reason
        sys.stderr.write(proc.stderr[-4000:])
    return result


def fit_exponent(xs, ys) -> float:
    """b in y ≈ a·x^b (least squares on logs); nan with fewer than two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def fe(r: dict) -> float:
    return r["audit_s"] / r["forward_s"]


def print_table(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["params"], r["seq_len"], r["variant"]))
    print(f"{'size':>12} {'params':>14} {'file':>5} {'weights':>8} {'S':>5} {'variant':>9} {'load s':>7} {'load GiB':>8} "
          f"{'forward s':>9} {'audit s':>8} {'fwd eq.':>7} {'peak GiB':>8}  verdict")
    for r in rows:
        peak = max(r["load_peak_gib"], r["audit_peak_gib"])
        disk = r.get("stored") or ("f32" if r["size"] in FLOAT32_SIZES else "bf16")
        print(f"{r['size']:>12} {r['params']:>14,} {disk:>5} {r['dtype']:>8} {r['seq_len']:>5} {r['variant']:>9} "
              f"{r['load_s']:>7.1f} {r['load_peak_gib']:>8.2f} {r['forward_s']:>9.3f} {r['audit_s']:>8.1f} "
              f"{fe(r):>7.1f} {peak:>8.2f}  {r['verdict']}")
    print()
    for variant in sorted({r["variant"] for r in rows}):
        sub = [r for r in rows if r["variant"] == variant]
        by_s: dict = {}
        for r in sub:
            by_s.setdefault(r["seq_len"], []).append(r)
        for (S, rs), big in [(item, big) for item in sorted(by_s.items()) for big in (False, True)]:
            if big:  # the paper sizes alone: the audit's fixed costs do not dominate
                rs = [r for r in rs if r["params"] >= 1e8]
            if len({r["params"] for r in rs}) >= 2 and (not big or len(rs) < len(by_s[S])):
                xs = [r["params"] for r in rs]
                print(f"[{variant}] S = {S}, over {len(rs)} sizes{' ≥ 100M' if big else ''}: audit time ∝ params^{fit_exponent(xs, [r['audit_s'] for r in rs]):.2f}, "
                      f"forward time ∝ params^{fit_exponent(xs, [r['forward_s'] for r in rs]):.2f}, "
                      f"forward equivalents ∝ params^{fit_exponent(xs, [fe(r) for r in rs]):.2f}, "
                      f"peak memory ∝ params^{fit_exponent(xs, [r['audit_peak_gib'] for r in rs]):.2f}")
        by_size: dict = {}
        for r in sub:
            by_size.setdefault(r["size"], []).append(r)
        for size, rs in by_size.items():
            if len({r["seq_len"] for r in rs}) >= 2:
                xs = [r["seq_len"] for r in rs]
                extra = [max(r["audit_peak_gib"] - r["weights_gib"] * 4 / _bytes(r["dtype"]), 1e-3) for r in rs]
                print(f"[{variant}] {size}, over S = {sorted(xs)}: audit time ∝ S^{fit_exponent(xs, [r['audit_s'] for r in rs]):.2f}, "
                      f"forward time ∝ S^{fit_exponent(xs, [r['forward_s'] for r in rs]):.2f}, "
                      f"forward equivalents ∝ S^{fit_exponent(xs, [fe(r) for r in rs]):.2f}, "
                      f"peak memory above the weights ∝ S^{fit_exponent(xs, extra):.2f}")


def _bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"presets, comma separated (default {DEFAULT_SIZES})")
    ap.add_argument("--seq-lens", default=DEFAULT_SEQ_LENS, help=f"probe lengths (default {DEFAULT_SEQ_LENS})")
    ap.add_argument("--variant", default="perturbed", choices=("perturbed", "init"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forwards", type=int, default=3, help="timed forward passes before the audit (one fewer after)")
    ap.add_argument("--out", default=None, help="append each case as a JSON line to this file")
    ap.add_argument("--table", nargs="+", default=None, metavar="FILE", help="only print the table of these files")
    ap.add_argument("--store", default="auto", choices=("auto", "f32", "bf16"),
                    help="stored dtype of the written checkpoints (auto: f32 up to parcae-140m, bf16 above)")
    ap.add_argument("--load-only", action="store_true", help="time only loading each written checkpoint")
    args = ap.parse_args()
    if args.load_only:
        return load_only(args)

    from loopdyn.models import LoopConfig

    rows: list[dict] = []
    if args.table:
        for name in args.table:
            with open(name) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    else:
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        for size in args.sizes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, size)
                t = time.perf_counter()
                stored = write_checkpoint(size, path, args.store)
                print(f"{size}: {stored} checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
                block_size = LoopConfig.preset(size).block_size
                for S in seq_lens:
                    if S > block_size:
                        print(f"  S={S}: skipped (longer than the model's context, {block_size})")
                        continue
                    t = time.perf_counter()
                    r = run_child(path, S, args.variant, args.threads, args.forwards)
                    if "audit_s" not in r:
                        raise SystemExit(f"{size}, S={S}: the audit exited with {r.get('exit')}")
                    r.update(size=size, seq_len=S, variant=args.variant, threads=args.threads,
                             wall_s=time.perf_counter() - t, stored=stored)
                    rows.append(r)
                    print(f"  S={S}: audit {r['audit_s']:.1f} s = {fe(r):.1f} forward passes (forward "
                          f"{r['forward_s']:.3f} s), load {r['load_s']:.1f} s, peak "
                          f"{max(r['load_peak_gib'], r['audit_peak_gib']):.2f} GiB, verdict {r['verdict']} "
                          f"({r['wall_s']:.0f} s)", flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(r) + "\n")
    print()
    print_table(rows)
    worst_fe = max(fe(r) for r in rows)
    worst_peak = max(max(r["load_peak_gib"], r["audit_peak_gib"]) for r in rows)
    big = [r for r in rows if r["size"] == "parcae-1.3b" and r["seq_len"] == 256]
    target = ""
    if big:
        b = big[-1]
        peak = max(b["load_peak_gib"], b["audit_peak_gib"])
        ok = fe(b) <= 30 and peak <= 10
        target = f" parcae_1_3b_fe={fe(b):.1f} parcae_1_3b_peak_gib={peak:.2f} target={'OK' if ok else 'OVER'}"
        print(f"\nparcae-1.3b at 256 tokens: {fe(b):.1f} forward passes (≤ 30), peak {peak:.2f} GiB (≤ 10): "
              f"{'OK' if ok else 'OVER BUDGET'}")
    print(f"RESULT audit_cost forward_equivalents={worst_fe:.1f} peak_gib={worst_peak:.2f}{target}")


def load_only(args) -> None:
    """Write each size in the stored dtype and time `loopdyn.models.load` of it in a fresh child."""
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, size)
            stored = write_checkpoint(size, path, args.store)
            file_gib = os.path.getsize(os.path.join(path, "model.safetensors")) / 2 ** 30
            r = run_load_child(path, args.threads)
            r.update(size=size, stored=stored, file_gib=file_gib, threads=args.threads)
            rows.append(r)
            print(f"{size}: load of the {stored} checkpoint ({file_gib:.2f} GiB file, {r['weights_gib']:.2f} GiB "
                  f"float32 weights): {r['load_s']:.1f} s, peak {r['load_peak_gib']:.2f} GiB", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(dict(r, load_only=True)) + "\n")
    worst = max(rows, key=lambda r: r["load_peak_gib"])
    print(f"RESULT audit_cost_load load_s={worst['load_s']:.1f} load_peak_gib={worst['load_peak_gib']:.2f} "
          f"weights_gib={worst['weights_gib']:.2f} size={worst['size']} stored={worst['stored']}")


if __name__ == "__main__":
    main()
