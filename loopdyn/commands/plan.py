"""`loopdyn plan`: memory and time of a looped model before it runs (loopdyn/scaling/plan.py).

For a checkpoint folder (only its config.json is read), a preset, or a published configuration
(huginn-0125, ouro-1.4b, ouro-2.6b): parameters, weight bytes, activation and KV-cache bytes,
FLOPs per token for inference at T loops and for training with gradients through k of T loops
(per-sequence depth sampling included), at a batch size, sequence length and --dtype; the
largest T that fits --memory; time measured here (--measure: the passes' operator calls replayed,
the framework's cost on a narrow twin) or from a given device (--tflops, --bandwidth). Nothing
is allocated for the plan itself: the model is built on PyTorch's meta device.
"""
from __future__ import annotations

import argparse
import sys

from loopdyn.commands.common import add_dtype_option, add_hidden_alias, add_threads_option, parse_overrides, set_threads
from loopdyn.models.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory and time of a looped model before it runs (nothing is allocated)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint folder or config.json, a preset (tiny, parcae-140m, ...) or huginn-0125, "
                        "ouro-1.4b, ouro-2.6b")
    p.add_argument("--loops", type=int, default=None, metavar="T", help="loops T (default: the model's μ_rec)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="sequences per batch (default: 1)")
    add_hidden_alias(p, "--batch", "batch_size", type=int)
    p.add_argument("--seq-len", type=int, default=256, metavar="S", help="tokens per sequence (default: 256)")
    add_dtype_option(p, "the weights and the loop")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="a memory budget, e.g. 24GiB: report the largest T that fits (default: none)")
    p.add_argument("--measure", action="store_true",
                   help="measure this machine: every distinct operator call of the model's passes replayed and "
                        "timed, and the framework's cost per call on a narrow twin of the model (10-30 s; minutes at "
                        "billions of parameters)")
    p.add_argument("--tflops", type=float, default=None, metavar="X",
                   help="the device's matmul rate in TFLOP/s in --dtype, for a device that is not here")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBS",
                   help="the device's memory bandwidth in GB/s (with --tflops)")
    p.add_argument("--op-overhead", type=float, default=5.0, metavar="US",
                   help="the device's fixed cost per operator in µs, with --tflops (default: 5, a GPU kernel launch)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (presets and loopdyn configs), repeatable (default: none)")
    p.add_argument("--json", metavar="FILE", help="write the plan as JSON (default: none)")
    add_threads_option(p, "--measure")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loopdyn.io import atomic_write_json, check_outputs
    from loopdyn.scaling.plan import given_device, parse_bytes, plan

    memory = parse_bytes(args.memory) if args.memory is not None else None
    if args.loops is not None and args.loops < 1:
        raise InputError(f"--loops must be ≥ 1, got {args.loops}")
    if (args.tflops is None) != (args.bandwidth is None):
        raise InputError("give --tflops and --bandwidth together (or --measure)")
    if args.tflops is not None and args.measure:
        raise InputError("--measure and --tflops/--bandwidth are alternatives: give one")
    for name in ("tflops", "bandwidth", "op_overhead"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {v:g}")
    check_outputs(files={"--json": args.json})
    set_threads(args.threads)
    device = given_device(args.tflops, args.bandwidth, args.op_overhead) if args.tflops is not None else None
    p = plan(args.model, batch=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, loops=args.loops,
             overrides=parse_overrides(args.set), device=device)
    if args.measure:
        print("measuring this machine: the passes' operator calls and a width-64 twin of the model "
              "(10-30 s; minutes at billions of parameters)", file=sys.stderr, flush=True)
        p.measure()
    print(p.to_text(args.loops, memory))
    if args.json:
        atomic_write_json(args.json, p.to_json(args.loops, memory))
        print(f"wrote {args.json}")
    return 0
