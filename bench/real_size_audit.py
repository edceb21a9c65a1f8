"""A full `loopdyn audit` at the published sizes on one machine, in bf16, from a sharded bf16
safetensors checkpoint with random weights that this script writes (nothing is downloaded).

Models: `huginn-0125` (Huginn-0125's published configuration: 3.56 B parameters, d = 5280,
32 loops; tests/huginn_reference.HUGINN_0125) and `ouro-2.6b` (48 layers, 4 loops). The
checkpoint is written shard by shard (≤ --shard-gib each), every tensor drawn N(0, σ²) in bf16
with σ = 0.02 (norm gains 1), so writing it never holds the model in memory. Then, in a fresh
child process: `loopdyn audit PATH --dtype bfloat16 --seq-len S --json ...` through the real
command, with the peak resident memory (VmHWM) after loading and over the audit, the audit's
wall time, and the median bf16 forward pass on the same probe timed right before and after
(same process, same threads): forward equivalents = audit seconds ÷ forward seconds.
Targets (issue 22): Huginn-0125 at 64 tokens: peak ≤ 12 GiB, ≤ 35 forward equivalents;
Ouro-2.6B at 256 tokens: ≤ 30 forward equivalents.

    python bench/real_size_audit.py --model huginn-0125 --seq-len 64 [--dir DIR] [--threads 2]
    python bench/real_size_audit.py --model ouro-2.6b --seq-len 256
    python bench/real_size_audit.py --model huginn-0125 --seq-len 16 --shrink 8   # a quick smoke run
    python bench/real_size_audit.py --model ouro-2.6b --plan --dir DIR   # plan --measure vs the forward

`--plan` runs no audit: it times the bf16 forward pass at the model's loops (32, 4) on the loaded
checkpoint (best of --reps) and, in its own process, `loopdyn plan CKPT --measure` for the same
pass, and prints measured/planned time (target: within 25 %; memory is bench/plan_check.py's);
ends with `RESULT real_size_plan …`.

`--shrink F` divides the widths by F (a smaller model of the same shape family, for a smoke
run of the script). `--keep` keeps the written checkpoint. Ends with
`RESULT real_size_audit model=… peak_gib=… forward_equivalents=… audit_s=…`.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared machine: idle OpenMP workers sleep

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a forward pass at T loops, timed: the start of both children's code
FORWARD_S = textwrap.dedent(r"""
    import time
    import torch

    def forward_s(model, idx, T):
        with torch.no_grad():
            t = time.perf_counter()
            ctx = model.encode(idx)
            h = model.init_state(ctx)
            for _ in range(T):
                h = model.step(h, ctx)
            model.decode(h, ctx)
            return time.perf_counter() - t
""")

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
    def reset_hwm():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    result = {}
    real_load, real_audit = lm.load, da.audit

    def timed_load(*args, **kwargs):
        t = time.perf_counter()
        model = real_load(*args, **kwargs)
        result.update(load_s=time.perf_counter() - t, load_peak_gib=hwm_gib(),
                      weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
                      dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
        reset_hwm()
        return model

    def timed_audit(model, idx, loops, *args, **kwargs):
        before = [forward_s(model, idx, loops) for _ in range(2)]
        t = time.perf_counter()
        report = real_audit(model, idx, loops, *args, **kwargs)
        seconds = time.perf_counter() - t
        after = [forward_s(model, idx, loops)]
        result.update(audit_s=seconds, forward_s=statistics.median(before + after), cost=report.cost.to_json(),
                      verdict=report.verdict, tokens=int(idx.numel()), loops=loops)
        return report

    lm.load, da.audit = timed_load, timed_audit
    code = main(["audit", sys.argv[1], "--seq-len", sys.argv[3], "--dtype", "bfloat16", "--no-progress",
                 "--json", sys.argv[2]])
    result["exit"] = code
    result["audit_peak_gib"] = hwm_gib()
    print("BENCH_JSON " + json.dumps(result))
""")

# --plan: the forward pass timed on the loaded checkpoint (best of --reps), for `loopdyn plan --measure`
CHILD_FORWARD = textwrap.dedent(r"""
    import json, os, sys, time
    import torch
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    import loopdyn.models as lm

    path, S, T, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    model = lm.load(path, dtype=torch.bfloat16).eval()
    idx = torch.randint(0, 256, (1, S), generator=torch.Generator().manual_seed(0))
    times = [forward_s(model, idx, T) for _ in range(reps)]
    print("BENCH_JSON " + json.dumps({"forward_s": min(times), "times": times}))
""")


def plan_against_forward(ckpt: Path, S: int, T: int, threads: int, reps: int) -> None:
    """`loopdyn plan CKPT --measure` (its own process) beside the forward pass it plans, timed on
    the loaded checkpoint in another (best of `reps`), one after the other."""
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", FORWARD_S + CHILD_FORWARD, str(ckpt), str(S), str(T), str(reps)],
                         capture_output=True, text=True, env=env)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH_JSON")), None)
    if line is None:
        print(res.stdout[-2000:], res.stderr[-2000:])
        raise SystemExit("the forward child failed")
    real = json.loads(line.split(" ", 1)[1])
    print(f"forward at {T} loops, {S} tokens, bf16: {', '.join(f'{x:.1f}' for x in real['times'])} s "
          f"({time.perf_counter() - t:.0f} s with the load)", flush=True)
    out = ckpt.parent / f"{ckpt.name}-plan.json"
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "loopdyn", "plan", str(ckpt), "--dtype", "bfloat16", "--seq-len",
                          str(S), "--loops", str(T), "--measure", "--threads", str(threads), "--json", str(out)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-2000:])
        raise SystemExit("loopdyn plan failed")
    p = json.loads(out.read_text())
    ratio = real["forward_s"] / p["forward_seconds"]
    print(f"plan --measure ({time.perf_counter() - t:.0f} s): forward {p['forward_seconds']:.1f} s planned vs "
          f"{real['forward_s']:.1f} s measured (×{ratio:.2f}); device: {p['device']['source']}")
    print(f"RESULT real_size_plan model={ckpt.name} seq_len={S} loops={T} time_ratio={ratio:.2f} "
          f"forward_s={real['forward_s']:.1f} planned_s={p['forward_seconds']:.1f} "
          f"threads={threads}")


def write_checkpoint(model: str, directory: Path, shrink: int, shard_gib: float) -> int:
    """Write config.json + sharded bf16 safetensors with random weights; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if model == "huginn-0125":
        from loopdyn.models.importers.huginn import HuginnConfig, official_shapes
        from tests import huginn_reference as ref

        over = dict(ref.HUGINN_0125)
        if shrink > 1:
            over.update(n_embd=over["n_embd"] // shrink // over["n_heads"] * over["n_heads"] or over["n_heads"],
                        intermediate_size=over["intermediate_size"] // shrink, vocab_size=over.get("vocab_size", 65536) // shrink)
        cfg_json = ref.raven_config(dtype="bfloat16", **over)
        cfg, _ = HuginnConfig.from_json(cfg_json)
    else:
        from loopdyn.models.importers.ouro import OuroConfig, official_shapes
        from tests import ouro_reference as ref

        over = dict(ref.OURO_2_6B)
        if shrink > 1:
            over.update(hidden_size=over["hidden_size"] // shrink, intermediate_size=over["intermediate_size"] // shrink,
                        vocab_size=over["vocab_size"] // shrink, head_dim=128 // shrink)
        cfg_json = ref.ouro_config(dtype="bfloat16", **over)
        cfg, _ = OuroConfig.from_json(cfg_json)
    required, optional = official_shapes(cfg)
    shapes = dict(required)
    (directory / "config.json").write_text(json.dumps(cfg_json, indent=2))
    g = torch.Generator().manual_seed(0)
    limit = shard_gib * 2 ** 30
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        if key.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_3.weight", "norm_4.weight",
                         "ln_f.weight")) or len(shape) == 1 and "norm" in key:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16)
            for row in range(0, shape[0], 1024):  # drawn in slices: no float32 copy of a whole tensor
                t[row:row + 1024] = (torch.randn((min(1024, shape[0] - row), *shape[1:]), generator=g) * 0.02)
        if current and size + t.numel() * 2 > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += t.numel() * 2
    shards.append(current)
    index, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        for key, t in shard.items():
            index[key] = name
            total += t.numel()
        shard.clear()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": index}, indent=1))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["huginn-0125", "ouro-2.6b"], default="huginn-0125")
    ap.add_argument("--seq-len", type=int, default=None, help="probe tokens (default: 64 Huginn, 256 Ouro)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--shrink", type=int, default=1)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--plan", action="store_true",
                    help="no audit: `loopdyn plan --measure` against the forward pass it plans, timed here")
    ap.add_argument("--reps", type=int, default=2, help="--plan: timed forward passes (the best is kept)")
    args = ap.parse_args()
    S = args.seq_len or (64 if args.model == "huginn-0125" else 256)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="loopdyn-real-"))
    ckpt = root / args.model
    t = time.perf_counter()
    if not (ckpt / "model.safetensors.index.json").is_file():
        n = write_checkpoint(args.model, ckpt, args.shrink, args.shard_gib)
        print(f"wrote {ckpt}: {n:,} parameters in bf16 shards ({time.perf_counter() - t:.0f} s)", flush=True)
    try:
        if args.plan:
            T = 32 if args.model == "huginn-0125" else 4
            return plan_against_forward(ckpt, S, T, args.threads, args.reps)
        out = root / f"{args.model}-audit.json"
        env = {**os.environ, "BENCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-c", FORWARD_S + CHILD, str(ckpt), str(out), str(S)], capture_output=True,
                             text=True, env=env)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH_JSON")), None)
        if line is None:
            print(res.stdout[-2000:], res.stderr[-2000:])
            raise SystemExit("the audit child failed")
        r = json.loads(line.split(" ", 1)[1])
        fe = r["audit_s"] / r["forward_s"]
        print(f"{args.model} at {S} tokens, bf16: load {r['load_s']:.0f} s (peak {r['load_peak_gib']:.2f} GiB, weights "
              f"{r['weights_gib']:.2f} GiB {r['dtype']}); audit {r['audit_s']:.0f} s, peak {r['audit_peak_gib']:.2f} GiB; "
              f"bf16 forward at {r['loops']} loops {r['forward_s']:.1f} s → {fe:.1f} forward equivalents; "
              f"verdict {r['verdict']}; cost {r['cost']}")
        print(f"RESULT real_size_audit model={args.model} shrink={args.shrink} seq_len={S} peak_gib="
              f"{max(r['audit_peak_gib'], r['load_peak_gib']):.2f} forward_equivalents={fe:.1f} "
              f"audit_s={r['audit_s']:.0f} forward_s={r['forward_s']:.1f} threads={args.threads}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
