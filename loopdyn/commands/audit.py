"""`loopdyn audit PATH`: is this checkpoint's recurrence stable, why, and for how many loops?

Loads a loopdyn or official Parcae checkpoint, draws a probe batch from the embedded corpus
(or --data), and runs `loopdyn.dynamics.audit`: the injection spectrum, the measured trajectory, the
loop Jacobian along it, Lyapunov exponents, the gain graph and the forecast to --horizon
loops. Prints a report that names the evidence that decided the verdict; --json writes the
docs/design.md §7 record, --plots a folder of figures (both atomically). Exit codes: 0, 1 (bad
input), 3 (--strict and the verdict is not `stable`).

The model and the probe batch come from `loopdyn.inputs` (probe tokens are bytes of text).
"""
from __future__ import annotations

import argparse

from loopdyn.commands.common import (add_data_option, add_device_option, add_dtype_option, add_hidden_alias,
                                     add_threads_option, check_device, set_threads)
from loopdyn.inputs import DEFAULT_SEQ_LEN
from loopdyn.io import atomic_write_json, check_outputs
from loopdyn.models.errors import InputError

EXIT_UNSTABLE = 3


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
    p.add_argument("--precision", action="store_true",
                   help="precision audit: the same probe in float32 (float64 for --dtype float32) and in --dtype "
                        "from the same h_0; per loop the state divergence, changed argmax, KL and exit loops; "
                        "entries of Ā that round to modulus ≥ 1; the verdict in --dtype beside float32's. Costs one "
                        "more audit in float32 and two plain runs (JSON key `precision`, figure precision.*)")
    add_device_option(p)
    add_dtype_option(p, "the audited loop (the analysis itself runs in float64 on its products)")
    add_threads_option(p, "the audit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from loopdyn.dynamics.auditing import MAX_HORIZON, MAX_LOOPS, audit
    from loopdyn.inputs import load_model, probe_batch

    if args.loops is not None and not 1 <= args.loops <= MAX_LOOPS:
        raise InputError(f"--loops must be in [1, {MAX_LOOPS}], got {args.loops}")
    if args.horizon is not None and not 1 <= args.horizon <= MAX_HORIZON:
        raise InputError(f"--horizon must be in [1, {MAX_HORIZON}], got {args.horizon}")
    if args.lyapunov_k < 0:
        raise InputError(f"--lyapunov-k must be ≥ 0, got {args.lyapunov_k}")
    from loopdyn.commands.common import check_threads
    from loopdyn.models.checks import check_float

    check_float(args.exit_threshold, "--exit-threshold", 0, 1, lo_open=True)
    check_float(args.explosion_factor, "--explosion-factor", 1, lo_open=True)
    check_threads(args.threads)
    if args.exits:
        from loopdyn.commands.exits import parse_budget

        budget = parse_budget(args.budget)
    from loopdyn.inputs import model_input
    from loopdyn.iocheck import data_input

    check_outputs(files={"--json": args.json}, dirs={"--plots": args.plots},
                  inputs=[model_input("PATH", args.path), data_input("--data", args.data)])
    check_device(args.device)
    set_threads(args.threads)
    model = load_model(args.path, device=args.device, dtype=args.dtype)
    loops = args.loops if args.loops is not None else min(model.mean_loops, MAX_LOOPS)
    horizon = args.horizon if args.horizon is not None else min(4 * loops, MAX_HORIZON)
    if horizon < loops:
        raise InputError(f"--horizon ({horizon}) must be at least --loops ({loops})")
    idx, probe = probe_batch(model, args.data, args.batch_size, args.seq_len, args.device)
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
    if args.precision:
        from loopdyn.dynamics.precision import audit_with_precision

        audit_with_precision(model, idx, report, loops=loops, horizon=horizon, dtype=args.dtype,
                             exit_threshold=args.exit_threshold,
                             audit_kwargs=dict(lyapunov_k=args.lyapunov_k, explosion_factor=args.explosion_factor))
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
        from loopdyn.plots.audit import write_audit_plots

        figures = write_audit_plots(report, args.plots, args.format)
        if exits_report is not None:
            from loopdyn.plots.exits import write_exits_plots

            figures += write_exits_plots(exits_report, args.plots, args.format)
        print(f"wrote {len(figures)} figures to {args.plots}:")
        for path, caption in figures:
            print(f"  {path.name}: {caption}")
    verdict = report.verdict if report.precision is None or report.precision.verdict is None \
        else report.precision.verdict  # --precision: the verdict in the dtype the model runs in
    if args.strict and verdict != "stable":
        return EXIT_UNSTABLE
    return 0
