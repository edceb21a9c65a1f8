"""`loopdyn compare`: train injection parameterizations side by side over a learning-rate grid."""
from __future__ import annotations

import argparse
from pathlib import Path

from loopdyn.models.errors import InputError
from loopdyn.commands.common import add_data_option, add_dtype_option, add_threads_option, check_threads
from loopdyn.iocheck import data_input
from loopdyn.io import OutLock, check_outputs
from loopdyn.compare import INJECTIONS, grid, run_grid
from loopdyn.launchers import add_launcher_options, launcher_from_args, launcher_options
from loopdyn.lease import Lease
from loopdyn.report import format_matrix, write_outputs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train diagonal / linear / additive / fixed-depth side by side over learning rates",
                       description="Train parameterizations side by side (same seed, data, token budget) over a grid "
                                   "of learning rates, with the monitor attached; write summary.json, a convergence "
                                   "matrix, plots and report.html.")
    p.add_argument("--injections", default="diagonal,linear,additive,fixed",
                   help=f"comma-separated, from {', '.join(INJECTIONS)} (default: all)")
    p.add_argument("--lrs", default="0.01,0.03,0.05", help="comma-separated learning rates (default: 0.01,0.03,0.05)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per run (default: 300)")
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=64, metavar="S", help="tokens (bytes) per sequence")
    add_data_option(p)
    add_dtype_option(p, "training every run")
    p.add_argument("--out", default="loopdyn-compare", metavar="DIR", help="output folder (default: ./loopdyn-compare)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished runs in --out (made with the same settings) and do only the rest")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="parallel processes (default: one per CPU core); with --launcher slurm, runs at once")
    add_threads_option(p, "each process", default="CPU cores / jobs")
    p.add_argument("--format", default="png", type=str.lower, choices=["png", "pdf", "svg"],
                   help="figure files: png (300 dpi), pdf or svg (vector); report.html embeds PNGs (default: png)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal, no progress lines otherwise")
    add_launcher_options(p)
    p.set_defaults(func=run)


def command(args: argparse.Namespace) -> str:
    """The exact command, every option spelled out (for the report's header)."""
    from loopdyn.report import command_line

    return command_line("compare", [("--injections", args.injections), ("--lrs", args.lrs), ("--seeds", args.seeds),
                                    ("--steps", args.steps), ("--preset", args.preset),
                                    ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                                    ("--data", args.data), ("--dtype", args.dtype), ("--out", args.out),
                                    ("--jobs", args.jobs), ("--format", args.format), *launcher_options(args)],
                        ["--resume"] if args.resume else [])


def _list(text: str, kind, what: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise InputError(f"--{what}: cannot read {text!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise InputError("--steps must be ≥ 1")
    if args.jobs is not None and args.jobs < 1:
        raise InputError("--jobs must be ≥ 1")
    specs = grid(_list(args.injections, str, "injections"), _list(args.lrs, float, "lrs"),
                 _list(args.seeds, int, "seeds"), preset=args.preset, steps=args.steps,
                 batch_size=args.batch_size, seq_len=args.seq_len, data=args.data, dtype=args.dtype)
    check_outputs(dirs={"--out": args.out}, inputs=[data_input("--data", args.data)])
    check_threads(args.threads)
    launcher = launcher_from_args(args)  # its options checked, its extra installed
    if args.launcher == "local":  # elsewhere the nodes' memory counts, not this machine's
        specs[0].config().check_fits(factor=4.0 * (args.jobs or 1), what="training")  # before any process starts
    out = Path(args.out)
    with Lease(out), OutLock(out):  # held through the report too
        result = run_grid(specs, out, resume=args.resume, progress=not args.no_progress, launcher=launcher,
                          on_update=lambda partial: write_outputs(partial, args.format, command(args), plots=False))
        data = write_outputs(result, args.format, command(args))
    print(format_matrix(data))
    for line in data["findings"]:
        print(f"- {line}")
    print(f"wrote {args.out}/summary.json, {args.out}/report.html and {len(data['figures'])} figures "
          f"({', '.join(data['figures'])})")
    failed = [r for r in (result.status or {}).get("runs", []) if r["state"] == "failed"]
    if failed:
        raise InputError(f"{len(failed)} run(s) failed: " + "; ".join(
            f"{r['name']} ({r['reason']}{'; log ' + r['log'] if r['log'] else ''})" for r in failed)
            + "; the others are in the report; rerun with --resume to retry the failed ones")
    return 0
