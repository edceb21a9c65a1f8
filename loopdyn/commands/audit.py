"""`loopdyn audit PATH`: is this checkpoint's recurrence stable, why, and for how many loops?

Loads a loopdyn or official Parcae checkpoint, draws a probe batch from the embedded corpus
(or --data), and runs `loopdyn.dynamics.audit`: the injection spectrum, the measured trajectory, the
loop Jacobian along it, Lyapunov exponents, the gain graph and the forecast to --horizon
loops. Prints a report that names the evidence that decided the verdict; --json writes the
docs/design.md §7 record, --plots a folder of figures (both atomically). Exit codes: 0, 1 (bad
input), 3 (--strict and the verdict is not `stable`).

Probe tokens are bytes of text (ids 0..255). For a model with a larger vocabulary (the
official models have 32768 ids) byte ids are valid ids of its embedding, though not what its
tokenizer would produce from that text: the audit probes the loop's dynamics on real
embeddings, not the model's language modelling. For a vocabulary smaller than 256 (test
models) the ids are taken modulo the vocabulary size.
"""
from __future__ import annotations

import argparse
import warnings

import torch

from loopdyn.commands.common import (add_data_option, add_device_option, add_hidden_alias, add_threads_option,
                                     check_device, check_outputs, set_threads)
from loopdyn.models.errors import InputError

EXIT_UNSTABLE = 3
DEFAULT_SEQ_LEN = 256
CORPUS_BYTES = 4_000_000  # enough of the default corpus for a probe window, and fast to read


def register(subparsers) -> None:
    from loopdyn.dynamics.loopmap import MAX_HORIZON, MAX_LOOPS  # light: the parser is built on every start

    p = subparsers.add_parser(
        "audit", help="stability audit of a looped model's recurrence (spectra, Jacobians, forecast)",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
    )
    p.add_argument("path", metavar="PATH",
                   help="checkpoint folder (loopdyn, official Parcae, Huginn/Raven, Ouro) or its config.json; "
                        "or your own model as MODULE:FUNCTION or FILE.py:FUNCTION, a function returning a "
                        "LoopedModel (e.g. a loopdyn.models.LoopAdapter)")
    p.add_argument("--loops", type=int, default=None, metavar="T",
                   help=f"loops to measure (default: the model's μ_rec; 1..{MAX_LOOPS})")
    p.add_argument("--horizon", type=int, default=None, metavar="H",
                   help=f"loops to forecast (default: 4 × loops; loops..{MAX_HORIZON})")
    p.add_argument("--json", metavar="FILE", help="write the audit record (docs/design.md §7) as JSON (default: none)")
    p.add_argument("--plots", metavar="DIR", help="write figures into this folder, see --format (default: none)")
    p.add_argument("--format", default="png", type=str.lower, choices=["png", "pdf", "svg"],
                   help="figure format for --plots: png (300 dpi), pdf or svg (vector) (default: png)")
    p.add_argument("--strict", action="store_true", help="exit with code 3 unless the verdict is 'stable'")
    add_data_option(p, "text file or folder for the probe (default: the Python standard library's sources)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="probe sequences (default: 1)")
    add_hidden_alias(p, "--batch", "batch_size", type=int)  # the old spelling
    p.add_argument("--seq-len", type=int, default=None, metavar="S",
                   help=f"probe tokens per sequence (default: min({DEFAULT_SEQ_LEN}, the model's context))")
    p.add_argument("--lyapunov-k", type=int, default=4, metavar="K", help="Lyapunov exponents to compute (default 4)")
    p.add_argument("--explosion-factor", type=float, default=10.0, metavar="F",
                   help="a state more than F × its natural scale is unsafe (default 10)")
    p.add_argument("--exit-threshold", type=float, default=0.5, metavar="Q",
                   help="exit-gate audit (models with an exit gate, e.g. Ouro): a token exits once its cumulative "
                        "exit probability reaches Q (default 0.5)")
    p.add_argument("--exits", action="store_true",
                   help="add the exit-criteria section (`loopdyn exits`: criteria calibrated against the oracle "
                        "within --loops, the per-loop lens and the best depth per token to --horizon)")
    p.add_argument("--budget", default="0.5%", metavar="B",
                   help="with --exits: the loss budget, e.g. 0.5%% or 0.005 (default: 0.5%%)")
    add_device_option(p)
    add_threads_option(p, "the audit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _probe(args, model) -> tuple[torch.Tensor, str]:
    from loopdyn.data import load_text
    from loopdyn.models import protocol

    vocab, max_len = protocol.token_limits(model)
    S = args.seq_len if args.seq_len is not None else min(DEFAULT_SEQ_LEN, max_len or DEFAULT_SEQ_LEN)
    if S < 2:
        raise InputError(f"--seq-len must be at least 2, got {S}")
    if max_len is not None and S > max_len:
        raise InputError(f"a probe of {S} tokens is longer than the model's context ({max_len} tokens)")
    if not 1 <= args.batch_size <= 64:
        raise InputError(f"--batch-size must be in [1, 64], got {args.batch_size}")
    data = load_text(args.data, max_bytes=None if args.data else CORPUS_BYTES)
    x, _ = data.val_batches(1, args.batch_size, S)[0]
    note = ""
    if vocab is not None and vocab < 256:
        x = x % vocab
        note = f", byte ids modulo the vocabulary ({vocab})"
    elif vocab is not None and vocab > 256:
        note = f"; byte ids < 256 are valid ids of the {vocab}-id vocabulary (not its tokenizer's text)"
    return x.to(args.device), f"{args.batch_size} × {S} byte ids from {data.source}{note}"


def user_factory(spec: str):
    """For PATH = MODULE:FUNCTION or FILE.py:FUNCTION (and no such file or folder), the function;
    else None. The function is called with no arguments and must return a LoopedModel."""
    import importlib
    import importlib.util
    from pathlib import Path

    if ":" not in spec or Path(spec).exists():
        return None
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        return None
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise InputError(f"{spec}: no file {where}")
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as err:
        raise InputError(f"{spec}: cannot import {where}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"{spec}: {where} has no function {name}")

    def build():
        from loopdyn.models import protocol

        model = fn()
        if hasattr(model, "eval"):
            model.eval()
        if not protocol.is_looped(model):
            protocol.require_looped(model)  # raises the one-line reason
        return model
    return build


def run(args) -> int:
    from loopdyn.dynamics.audit_report import MAX_HORIZON, MAX_LOOPS, audit
    from loopdyn.models import load, protocol
    from loopdyn.models.fileio import atomic_write_json

    if args.loops is not None and not 1 <= args.loops <= MAX_LOOPS:
        raise InputError(f"--loops must be in [1, {MAX_LOOPS}], got {args.loops}")
    if args.horizon is not None and not 1 <= args.horizon <= MAX_HORIZON:
        raise InputError(f"--horizon must be in [1, {MAX_HORIZON}], got {args.horizon}")
    if args.lyapunov_k < 0:
        raise InputError(f"--lyapunov-k must be ≥ 0, got {args.lyapunov_k}")
    if not 0 < args.exit_threshold <= 1:
        raise InputError(f"--exit-threshold must be in (0, 1], got {args.exit_threshold}")
    if not args.explosion_factor > 1:
        raise InputError(f"--explosion-factor must be > 1, got {args.explosion_factor}")
    if args.exits:
        from loopdyn.commands.exits import parse_budget

        budget = parse_budget(args.budget)
    check_outputs(files={"--json": args.json}, dirs={"--plots": args.plots}, inputs={"--data": args.data})
    check_device(args.device)
    set_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite weights are reported in the verdict
        factory = user_factory(str(args.path))
        model = load(args.path, device=args.device) if factory is None else factory()
    try:
        protocol.require_looped(model)
    except protocol.ProtocolError as err:
        raise InputError(f"{args.path}: {err}") from None
    loops = args.loops if args.loops is not None else min(model.mean_loops, MAX_LOOPS)
    horizon = args.horizon if args.horizon is not None else min(4 * loops, MAX_HORIZON)
    if horizon < loops:
        raise InputError(f"--horizon ({horizon}) must be at least --loops ({loops})")
    idx, probe = _probe(args, model)
    from loopdyn.progress import stages

    bar, update = stages("audit", enabled=not args.no_progress)
    try:
        report = audit(model, idx, loops, horizon, lyapunov_k=args.lyapunov_k,
                       explosion_factor=args.explosion_factor, path=str(args.path), probe=probe,
                       exit_threshold=args.exit_threshold, progress=update)
    finally:
        if bar is not None:
            bar.close()
    exits_report = None
    if args.exits:
        from loopdyn.commands.exits import run_exits

        bar, update = stages("exits", enabled=not args.no_progress)
        try:
            exits_report = run_exits(model, idx, argparse.Namespace(max_loops=loops, horizon=max(horizon, 2)), probe, budget,
                                     progress=update)
        finally:
            if bar is not None:
                bar.close()
    print(report.to_text())
    if exits_report is not None:
        print()
        print(exits_report.to_text())
    if args.json:
        record = report.to_json()
        if exits_report is not None:
            record["exits"] = exits_report.to_json(per_token=False)
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    if args.plots:
        from loopdyn.plots_audit import write_audit_plots

        figures = write_audit_plots(report, args.plots, args.format)
        if exits_report is not None:
            from loopdyn.plots.exits import write_exits_plots

            figures += write_exits_plots(exits_report, args.plots, args.format)
        print(f"wrote {len(figures)} figures to {args.plots}:")
        for path, caption in figures:
            print(f"  {path.name}: {caption}")
    if args.strict and report.verdict != "stable":
        return EXIT_UNSTABLE
    return 0
