"""What `loopdyn audit` costs on a randomly initialised parcae-140m at 256 tokens.

The parent saves a freshly initialised `parcae-140m` (144M parameters, the official
initialisation) to a temporary folder, then runs `loopdyn audit PATH --seq-len 256` through
`loopdyn.cli.main` in a child process (the real command path: load, probe, audit, report,
JSON). Inside the child, `loopdyn.dynamics.audit_report.audit` is wrapped so that the forward pass of the
model on the same probe is timed right before and right after the audit (interleaved, same
process, same thread count), giving

* forward equivalents = audit wall time ÷ median forward time, and
* counted forward equivalents = the audit's counted work (steps, linearisations, J·v and Jᵀ·w
  products, sublayer work) priced with unit costs measured in the child at the same state,

and the child's peak resident memory (ru_maxrss, which includes loading the checkpoint and the
forward passes) is the peak memory. Two variants: `init` (the official initialisation: every
core block is the identity, so Arnoldi finds invariant subspaces early) and `perturbed` (core
output projections drawn N(0, 0.02²), a nonlinear core with full-length Krylov runs: the
expensive case). Targets: ≤ 60 forward passes, ≤ 4 GiB.

    python bench/audit_cost.py [--threads 1]

Ends with: RESULT audit_cost forward_equivalents=<max> counted=<max> peak_gib=<max>
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

CHILD = textwrap.dedent(r"""
    import json, os, resource, statistics, sys, time
    import torch
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    import loopdyn.dynamics.audit_report as da
    from loopdyn.dynamics.loopmap import Cost, Linearisation
    from loopdyn.cli import main

    real_audit = da.audit
    result = {}

    def fwd_time(model, idx, n=3):
        times = []
        with torch.no_grad():
            for _ in range(n):
                t = time.perf_counter()
                model(idx)
                times.append(time.perf_counter() - t)
        return times

    def unit_costs(model, idx):
        # seconds per step, linearisation, J·v and Jᵀ·w at a state of the real loop
        ctx = model.encode(idx)
        with torch.no_grad():
            h = model.step(model.init_state(ctx), ctx)
            t = time.perf_counter(); model.step(h, ctx); step = time.perf_counter() - t
        v = torch.randn_like(h)
        t = time.perf_counter(); lin = Linearisation(model, ctx, h); t_lin = time.perf_counter() - t
        t = time.perf_counter(); [lin.jvp(v) for _ in range(3)]; t_jvp = (time.perf_counter() - t) / 3
        t = time.perf_counter(); [lin.vjp(v) for _ in range(3)]; t_vjp = (time.perf_counter() - t) / 3
        return dict(step=step, linearisation=t_lin, jvp=t_jvp, vjp=t_vjp)

    def timed_audit(model, idx, *args, **kwargs):
        if os.environ["BENCH_VARIANT"] == "perturbed":
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for blk in model.core:
                    blk.attn.c_proj.weight.normal_(0, 0.02, generator=g)
                    blk.mlp.proj.weight.normal_(0, 0.02, generator=g)
        before = fwd_time(model, idx)
        t = time.perf_counter()
        report = real_audit(model, idx, *args, **kwargs)
        seconds = time.perf_counter() - t
        after = fwd_time(model, idx)
        units = unit_costs(model, idx)
        c = report.cost
        counted = (c.steps * units["step"] + c.linearisations * units["linearisation"]
                   + c.jvps * units["jvp"] + c.vjps * units["vjp"]
                   + 0.25 * (c.sublayer_linearisations * units["linearisation"]
                             + c.sublayer_jvps * units["jvp"] + c.sublayer_vjps * units["vjp"]))
        fwd = statistics.median(before + after)
        result.update(audit_s=seconds, forward_s=fwd, counted_s=counted, cost=c.to_json(), units=units,
                      verdict=report.verdict, tokens=int(idx.numel()))
        return report

    da.audit = timed_audit
    code = main(["audit", sys.argv[1], "--seq-len", "256", "--no-progress", "--json", sys.argv[2]])
    result["exit"] = code
    result["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("BENCH_JSON " + json.dumps(result))
""")


def run_child(path: str, variant: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, BENCH_VARIANT=variant, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", CHILD, path, os.path.join(tmp, "audit.json")],
                              capture_output=True, text=True, env=env, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if line is None:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child failed ({variant})")
    return json.loads(line[len("BENCH_JSON "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from loopdyn.models import LoopConfig, LoopedLM, save

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LoopedLM(LoopConfig.preset("parcae-140m"))
        print(f"parcae-140m: {model.num_params():,} parameters, μ_rec {model.config.mean_loops}; "
              f"probe 1 × 256 tokens; {args.threads} thread(s)")
        path = os.path.join(tmp, "parcae-140m")
        save(model, path)
        del model
        rows = []
        for variant in ("init", "perturbed"):
            t = time.perf_counter()
            r = run_child(path, variant, args.threads)
            fe = r["audit_s"] / r["forward_s"]
            counted = r["counted_s"] / r["forward_s"]
            gib = r["maxrss_kib"] / 2 ** 20
            rows.append((fe, counted, gib))
            c = r["cost"]
            u = r["units"]
            print(f"{variant:>9}: audit {r['audit_s']:.1f} s = {fe:.1f} forward passes "
                  f"(forward {r['forward_s']:.2f} s); counted {counted:.1f} "
                  f"[{c['steps']} steps, {c['linearisations']} linearisations, {c['jvps']} J·v, {c['vjps']} Jᵀ·w, "
                  f"sublayers {c['sublayer_linearisations']}/{c['sublayer_jvps']}/{c['sublayer_vjps']}; "
                  f"unit costs in forwards: step {u['step'] / r['forward_s']:.3f}, linearisation "
                  f"{u['linearisation'] / r['forward_s']:.3f}, J·v {u['jvp'] / r['forward_s']:.3f}, "
                  f"Jᵀ·w {u['vjp'] / r['forward_s']:.3f}]; peak RSS {gib:.2f} GiB; verdict {r['verdict']}; "
                  f"exit {r['exit']} ({time.perf_counter() - t:.0f} s)")
    fe, counted, gib = (max(x) for x in zip(*rows))
    ok = fe <= 60 and gib <= 4
    print(f"worst case: {fe:.1f} forward passes (target ≤ 60), peak {gib:.2f} GiB (target ≤ 4): "
          f"{'OK' if ok else 'OVER BUDGET'}")
    print(f"RESULT audit_cost forward_equivalents={fe:.1f} counted={counted:.1f} peak_gib={gib:.2f}")


if __name__ == "__main__":
    main()
