"""`loopdyn sweep-loops CHECKPOINT`: validation loss at T = 1..N loops, as a CSV for `loopdyn fit`.

One unroll per batch: the prelude runs once, the loop steps N times, and the readout/coda/head
decode the state after every step, so the sweep costs N loop steps and N decodes per batch
instead of the N(N+1)/2 steps of N separate `model(idx, n_loops=T)` calls. Each loss equals
`loopdyn.train.evaluate(model, data, K, B, S, n_loops=T)`: the mean over the same K fixed
validation batches of the mean cross-entropy per token (nats; bytes for the default corpus).

The CSV (written atomically) has the header `loops,mean_recurrence,params,tokens,loss`:
`mean_recurrence` is the trained μ_rec, `params` the unrolled parameter count N(μ_rec)
(`loopdyn.scaling.flops.unrolled_params`, embeddings included), `tokens` the training tokens D:
`--tokens`, else what loopdyn's trainer recorded in the checkpoint
(`config.extra["train_tokens"]`), else empty (the test-time law does not need it, the unified
law does). `loopdyn fit CSV --law testtime` reads the file as is.
A non-finite loss (a loop count where the model blows up) is written as `nan`/`inf` and named
in a warning: `loopdyn fit` refuses such rows, so lower `--max-loops` to fit.

Loops past the trained depth. The sweep also says whether the model *overthinks* — the loss rises
past the trained depth μ (by more than 0.5%, `loopdyn.dynamics.overthinking.overthinking`) — and
the best test-time loop count, with the dynamical reason from a forecast of the loop on the first
validation sequence to N loops and its per-token phases (`--no-dynamics` skips that forecast).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopdyn.scaling.flops import unrolled_params
from loopdyn.dynamics.loopmap import MAX_LOOPS  # larger --max-loops values are refused as a typo
from loopdyn.dynamics.overthinking import loop_overthinking, sweep_losses  # noqa: F401 - sweep_losses re-exported
from loopdyn.models import LoopConfig, LoopedLM, load, protocol
from loopdyn.models.errors import InputError
from loopdyn.io import atomic_write_text, check_outputs
from loopdyn.commands.common import add_device_option, add_threads_option, check_device, set_threads

CSV_HEADER = ("loops", "mean_recurrence", "params", "tokens", "loss")
DEFAULT_CSV = "loop-sweep.csv"


@dataclass
class LoopSweep:
    """Validation loss (nats per token) at T = loops[i] loops for one model."""

    loops: np.ndarray  # 1..N
    loss: np.ndarray
    mean_recurrence: int  # trained μ_rec
    params: int | None  # unrolled parameters N(μ_rec); None when the model is not a loopdyn config
    tokens: float | None  # training tokens D, if known
    eval_tokens: int  # validation tokens per loss value
    overthinking: object = None  # loopdyn.dynamics.overthinking.Overthinking

    def to_csv(self) -> str:
        buf = io.StringIO()
        buf.write(",".join(CSV_HEADER) + "\n")
        tokens = "" if self.tokens is None else f"{self.tokens:.17g}"
        params = "" if self.params is None else str(self.params)
        for T, loss in zip(self.loops, self.loss):
            buf.write(f"{int(T)},{self.mean_recurrence},{params},{tokens},{float(loss):.9g}\n")
        return buf.getvalue()

    def table(self) -> str:
        """A text table: T, loss, change against T = μ_rec (or the largest T, if smaller)."""
        mu = self.mean_recurrence
        ref_T = min(mu, len(self.loss))
        ref = float(self.loss[ref_T - 1])
        lines = [f"{'loops':>5}  {'loss':>9}  {f'vs T={ref_T}':>8}"]
        for T, loss in zip(self.loops, self.loss):
            rel = 100.0 * (float(loss) / ref - 1.0) if math.isfinite(ref) and ref else math.nan
            note = "  <- trained mean" if T == mu else ""
            lines.append(f"{int(T):>5}  {float(loss):>9.5f}  {rel:>+7.2f}%{note}")
        return "\n".join(lines)


def _require_loop(model) -> None:
    try:
        protocol.require_looped(model)
    except protocol.ProtocolError as err:
        raise InputError(str(err)) from None


def sweep_loops(model: LoopedLM, data, max_loops: int | None = None, *, n_batches: int = 16,
                batch_size: int = 16, seq_len: int = 64, tokens: float | None = None,
                progress: bool = False, dynamics: bool = True) -> LoopSweep:
    """Sweep T = 1..max_loops (default 3·μ_rec) on `n_batches` fixed validation batches of
    `data` (a loopdyn.data.TextData) and return a LoopSweep; its `overthinking` says whether the loss
    rises past μ_rec and the best loop count (with the dynamical reason when dynamics=True)."""
    _require_loop(model)
    mu = model.mean_loops
    _, max_len = protocol.token_limits(model)
    if max_loops is None:
        max_loops = 3 * mu
    _check_positive("max-loops", max_loops)
    if max_loops > MAX_LOOPS:
        raise InputError(f"--max-loops {max_loops} is too large (at most {MAX_LOOPS})")
    for name, v in (("batches", n_batches), ("batch-size", batch_size), ("seq-len", seq_len)):
        _check_positive(name, v)
    if max_len is not None and seq_len > max_len:
        raise InputError(f"--seq-len {seq_len} is longer than the model supports ({max_len} tokens)")
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise InputError(f"--tokens must be a positive number, got {tokens:g}")
    config = getattr(model, "config", None)
    if tokens is None and isinstance(config, LoopConfig):
        tokens = config.extra.get("train_tokens")  # recorded by loopdyn's trainer
    batches = data.val_batches(n_batches, batch_size, seq_len)
    from loopdyn.progress import progress as progress_bar

    bar = progress_bar(n_batches * max_loops, "sweep-loops") if progress else None
    try:
        loss = sweep_losses(model, batches, max_loops, on_step=(bar.update if bar else None))
    finally:
        if bar is not None:
            bar.close()
    params = unrolled_params(config, mu) if isinstance(config, LoopConfig) else None
    sweep = LoopSweep(loops=np.arange(1, max_loops + 1), loss=loss, mean_recurrence=mu, params=params, tokens=tokens,
                      eval_tokens=n_batches * batch_size * seq_len)
    sweep.overthinking = loop_overthinking(model, sweep.loops, sweep.loss, mu, batches[0][0][:1] if dynamics else None)
    return sweep


def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"--{name} must be a positive integer, got {v!r}")


# -- command line ------------------------------------------------------------------------------

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
        _check_positive("max-loops", args.max_loops)
        if args.max_loops > MAX_LOOPS:
            raise InputError(f"--max-loops {args.max_loops} is too large (at most {MAX_LOOPS})")
    for name in ("batches", "batch_size", "seq_len"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    if args.tokens is not None and not (math.isfinite(args.tokens) and args.tokens > 0):
        raise InputError(f"--tokens must be a positive number, got {args.tokens:g}")
    out = Path(args.csv)
    if not out.parent.is_dir() and not out.parent.exists():
        raise InputError(f"--csv {out}: the folder {out.parent} does not exist")
    check_outputs(files={"--csv": args.csv}, inputs={"--data": args.data})
    check_device(args.device)
    set_threads(args.threads)
    model = load(args.checkpoint, device=args.device)
    try:
        _require_loop(model)
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
    print(f"model: {args.checkpoint} ({protocol.injection_name(model)} injection, mu_rec = {model.mean_loops}, {size})")
    print(f"data: {data.source}, {sweep.eval_tokens:,} validation tokens "
          f"({args.batches} x {args.batch_size} x {args.seq_len}) per loop count")
    print(sweep.table())
    if sweep.overthinking is not None:
        print(f"loops past the trained depth: {sweep.overthinking.summary()}")
    bad = [int(T) for T, v in zip(sweep.loops, sweep.loss) if not math.isfinite(v)]
    if bad:
        print(f"loopdyn sweep-loops: warning: the loss is not finite at T = {_spans(bad)}; "
              f"`loopdyn fit` rejects those rows (lower --max-loops)", file=sys.stderr)
    atomic_write_text(args.csv, sweep.to_csv())
    print(f"wrote {args.csv}")
    return 0


def _spans(values: list[int]) -> str:
    """1, 2, 3, 7 -> "1, 2, 3, 7"; 4..9 when contiguous."""
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
