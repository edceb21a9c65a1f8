"""`loopdyn sweep-loops CHECKPOINT`: validation loss at T = 1..N loops, as a CSV for `loopdyn fit`.

The sweep, its CSV and the overthinking line are `loopdyn.scaling.sweep` (docs/design.md §7).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from loopdyn.commands.common import add_device_option, add_dtype_option, add_threads_option, check_device, set_threads
from loopdyn.io import atomic_write_text, check_outputs
from loopdyn.models import load, protocol
from loopdyn.models.errors import InputError
from loopdyn.scaling.sweep import MAX_LOOPS, check_positive, require_loop, spans, sweep_loops
from loopdyn.iocheck import checkpoint_input, data_input

DEFAULT_CSV = "loop-sweep.csv"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep-loops",
        help="validation loss at T = 1..N loops, written as a CSV for `loopdyn fit --law testtime`",
        description=(
            "Load a checkpoint and measure validation loss at T = 1..N loops (default N = 3x the "
            "trained mean) with one unroll per batch (the prelude runs once; the state is decoded "
            "after every loop). Writes a CSV with columns loops, mean_recurrence, params (unrolled "
            "parameters at the trained mean), tokens (training tokens: --tokens, else as recorded by loopdyn train, "
            "else empty), loss."
        ),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a loopdyn or official Parcae checkpoint")
    p.add_argument("--max-loops", type=int, default=None, metavar="N",
                   help=f"largest loop count (default: 3 x the trained mean; at most {MAX_LOOPS})")
    p.add_argument("--csv", default=DEFAULT_CSV, metavar="FILE", help=f"output CSV (default: {DEFAULT_CSV})")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a text file or folder (default: the Python standard library's sources)")
    p.add_argument("--batches", type=int, default=16, metavar="K", help="validation batches (default 16)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per batch (default: 16)")
    p.add_argument("--seq-len", type=int, default=64, metavar="S",
                   help="tokens per sequence (default 64, as loopdyn train)")
    p.add_argument("--tokens", type=float, default=None, metavar="D",
                   help="training tokens of the checkpoint, for the CSV's tokens column (default: as recorded by "
                        "loopdyn train in the checkpoint, else empty)")
    add_device_option(p)
    add_dtype_option(p, "the swept loop")
    add_threads_option(p, "the sweep")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal, no progress lines otherwise")
    p.add_argument("--no-dynamics", action="store_true",
                   help="skip the forecast of the loop that gives the dynamical reason for overthinking")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loopdyn.data import load_text

    # cheap argument checks first, so a typo does not wait for the model and the corpus
    if args.max_loops is not None:
        check_positive("max-loops", args.max_loops)
        if args.max_loops > MAX_LOOPS:
            raise InputError(f"--max-loops {args.max_loops} is too large (at most {MAX_LOOPS})")
    for name in ("batches", "batch_size", "seq_len"):
        check_positive(name.replace("_", "-"), getattr(args, name))
    if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
        raise InputError(f"--tokens must be a positive number, got {args.tokens:g}")
    out = Path(args.csv)
    if not out.parent.is_dir() and not out.parent.exists():
        raise InputError(f"--csv {out}: the folder {out.parent} does not exist")
    check_outputs(files={"--csv": args.csv},
                  inputs=[checkpoint_input("CHECKPOINT", args.checkpoint), data_input("--data", args.data)])
    check_device(args.device)
    set_threads(args.threads)
    from loopdyn.models.precision import precision

    model = precision(args.dtype).wrap(load(args.checkpoint, device=args.device, dtype=args.dtype))
    try:
        require_loop(model)
    except InputError as err:
        raise InputError(f"{args.checkpoint}: {err}") from None
    vocab, max_len = protocol.token_limits(model)
    if max_len is not None and args.seq_len > max_len:
        raise InputError(f"--seq-len {args.seq_len} is longer than {args.checkpoint} supports "
                         f"({max_len} tokens)")
    if vocab is not None and vocab < 256:
        raise InputError(f"{args.checkpoint}: the model's vocabulary ({vocab}) is smaller "
                         f"than the 256 byte values of the data")
    nonfinite = getattr(getattr(model, "checkpoint_info", None), "nonfinite", [])
    if nonfinite:
        print(f"loopdyn sweep-loops: warning: {len(nonfinite)} parameter(s) hold NaN/Inf "
              f"(e.g. {nonfinite[0]}); losses will not be finite", file=sys.stderr)
    data = load_text(args.data)
    sweep = sweep_loops(model, data, args.max_loops, n_batches=args.batches,
                        batch_size=args.batch_size, seq_len=args.seq_len, tokens=args.tokens,
                        progress=not args.no_progress, dynamics=not args.no_dynamics)
    size = "unrolled parameters unknown" if sweep.params is None else f"{sweep.params:,} unrolled parameters at mu_rec"
    print(f"model: {args.checkpoint} ({protocol.injection_name(model)} injection, mu_rec = {model.mean_loops}, {size}, "
          f"computed in {args.dtype})")
    print(f"data: {data.source}, {sweep.eval_tokens:,} validation tokens "
          f"({args.batches} x {args.batch_size} x {args.seq_len}) per loop count")
    print(sweep.table())
    if sweep.overthinking is not None:
        print(f"loops past the trained depth: {sweep.overthinking.summary()}")
    bad = [int(T) for T, v in zip(sweep.loops, sweep.loss) if not math.isfinite(v)]
    if bad:
        print(f"loopdyn sweep-loops: warning: the loss is not finite at T = {spans(bad)}; "
              f"`loopdyn fit` rejects those rows (lower --max-loops)", file=sys.stderr)
    atomic_write_text(args.csv, sweep.to_csv())
    print(f"wrote {args.csv}")
    return 0
