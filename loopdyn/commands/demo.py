"""`loopdyn demo`: the whole story on the embedded default corpus, in a few minutes on 2 CPU cores.

Trains the tiny model with the diagonal (Parcae), linear (Huginn/RDM) and additive injections
side by side at a moderate and a high learning rate, audits each trained model, writes the
compare report, and says in one sentence per finding what happened and why.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from loopdyn.commands.common import add_threads_option, check_threads
from loopdyn.iocheck import data_input
from loopdyn.models.checks import check_seed
from loopdyn.io import OutLock, check_outputs
from loopdyn.compare import grid, run_grid
from loopdyn.models.errors import InputError
from loopdyn.data import load_text
from loopdyn.report import format_matrix, write_outputs

DEMO_INJECTIONS = ["diagonal", "linear", "additive"]
DEMO_LRS = [0.01, 0.05]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole story in a few minutes: train, compare, audit, report",
                       description="Train a tiny looped LM on the Python standard library's sources with three "
                                   "injections at two learning rates, audit each, and write a report.")
    p.add_argument("--out", default="loopdyn-demo", metavar="DIR", help="output folder (default: ./loopdyn-demo)")
    p.add_argument("--steps", type=int, default=200, metavar="N", help="training steps per run (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --out (made with the same settings)")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="parallel processes (default: one per CPU core)")
    add_threads_option(p, "each process", default="CPU cores / jobs")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal, no progress lines otherwise")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    if args.steps < 1:
        raise InputError("--steps must be ≥ 1")
    if args.jobs is not None and args.jobs < 1:
        raise InputError("--jobs must be ≥ 1")
    check_threads(args.threads)
    check_seed(args.seed, "--seed")
    check_outputs(dirs={"--out": args.out}, inputs=[data_input("the corpus", None)])
    with OutLock(out):  # one process per --out folder, held through the report
        return _run(args, out, start)


def _run(args: argparse.Namespace, out: Path, start: float) -> int:
    data = load_text()
    print(f"corpus: {data.source}: {data.n_files} files, {len(data.train):,} training and {len(data.val):,} "
          f"validation bytes; unigram baseline {data.unigram_loss():.3f} nats/byte")
    specs = grid(DEMO_INJECTIONS, DEMO_LRS, [args.seed], preset="tiny", steps=args.steps)
    print(f"training {len(specs)} tiny looped models ({', '.join(DEMO_INJECTIONS)} injections × lr "
          f"{', '.join(f'{lr:g}' for lr in DEMO_LRS)}), {args.steps} steps each, same data and seed ...")
    result = run_grid(specs, out, resume=args.resume, jobs=args.jobs, progress=not args.no_progress,
                      threads=args.threads)
    from loopdyn.report import command_line

    cmd = command_line("demo", [("--out", args.out), ("--steps", args.steps), ("--seed", args.seed),
                                ("--jobs", args.jobs)], ["--resume"] if args.resume else [])
    summary = write_outputs(result, "png", cmd)
    print()
    print(format_matrix(summary))
    print()
    for line in summary["findings"]:
        print(f"- {line}")
    parcae = [r for r in summary["runs"] if r["injection"] == "diagonal" and r["outcome"] == "converged"]
    if parcae:
        best = min(parcae, key=lambda r: r["val_by_loops"][str(r["mean_loops"])])
        val = best["val_by_loops"][str(best["mean_loops"])]
        print(f"- The trained Parcae model {best['name']} reaches {val:.3f} nats/byte, "
              f"{data.unigram_loss() - val:.2f} below the unigram baseline; "
              f"it is saved in {out / 'runs' / best['name'] / 'model'} (try: loopdyn audit {out / 'runs' / best['name'] / 'model'}).")
    print(f"\nreport: {out / 'report.html'}  (summary.json, figures and every run's model, log and audit are in {out}/)")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
