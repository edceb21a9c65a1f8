"""`loopdyn exits CHECKPOINT`: how many loops should each token run, and which exit criterion says so best?

Runs the loop on a probe to the long run (default 4 × the trained depth) and calibrates the exit
criteria (`loopdyn.dynamics.exits`: Huginn's six, the model's exit gate, the contraction
criterion) against the oracle loop per token: mean loops, loss change, top-1 agreement with the
long-run output, the threshold of each criterion that meets the loss budget with the fewest
loops, and the published defaults side by side. Also prints the per-loop lens and the best depth
per token with its dynamical reason. --json writes the record, --plots the figures (atomically).
Exit codes: 0, 1 (bad input), 2 (usage).
"""
from __future__ import annotations

from loopdyn.commands.common import add_data_option, add_device_option, add_threads_option, check_device, set_threads
from loopdyn.io import check_outputs
from loopdyn.models.errors import InputError

DEFAULT_SEQ_LEN = 128


def parse_budget(text: str) -> float:
    """'0.5%' → 0.005, '0.005' → 0.005 (a relative loss increase)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise InputError(f"--budget {text!r}: expected a relative loss increase such as 0.5% or 0.005") from None
    if not 0 <= value < 10:
        raise InputError(f"--budget {text!r}: must be ≥ 0 (and below 1000%)")
    return value


def register(subparsers) -> None:
    from loopdyn.dynamics.exits.criteria import CRITERIA

    p = subparsers.add_parser(
        "exits", help="exit criteria calibrated against an oracle; per-loop lens; best depth per token",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
    )
    p.add_argument("path", metavar="CHECKPOINT",
                   help="checkpoint folder (loopdyn, official Parcae, Huginn/Raven, Ouro) or its config.json; or "
                        "MODULE:FUNCTION / FILE.py:FUNCTION returning a LoopedModel")
    p.add_argument("--criteria", default="all", metavar="LIST",
                   help=f"comma-separated exit criteria: {', '.join(c for c in CRITERIA)}; 'all' = every criterion "
                        f"the model supports, 'huginn' = Huginn's six (default: all)")
    p.add_argument("--budget", default="0.5%", metavar="B",
                   help="loss budget: the largest relative loss increase over running every token the full loop "
                        "budget, e.g. 0.5%% or 0.005 (default: 0.5%%)")
    p.add_argument("--max-loops", type=int, default=None, metavar="T",
                   help="loop budget: the most loops a token may run; a criterion that has not fired exits at T "
                        "(default: the trained depth)")
    p.add_argument("--horizon", type=int, default=None, metavar="H",
                   help="the long run for the oracle and the best depth (default: 4 × max(trained depth, T))")
    p.add_argument("--oracle-kl", type=float, default=1e-3, metavar="EPS",
                   help="oracle: a token has settled once its prediction stays within this KL (nats) of the "
                        "long-run one (default: 1e-3)")
    p.add_argument("--jacobian-rate", action="store_true",
                   help="contraction criterion: also measure each token's Jacobian block norm at the trained depth "
                        "(a bound on the contraction rate; d products per token)")
    p.add_argument("--json", metavar="FILE", help="write the record as JSON (default: none)")
    p.add_argument("--no-per-token", action="store_true", help="leave the per-token arrays out of --json")
    p.add_argument("--plots", metavar="DIR", help="write figures into this folder (default: none)")
    p.add_argument("--format", default="png", type=str.lower, choices=["png", "pdf", "svg"],
                   help="figure format for --plots (default: png)")
    add_data_option(p, "text file or folder for the probe (default: the Python standard library's sources)")
    p.add_argument("--batch-size", type=int, default=2, metavar="N", help="probe sequences (default: 2)")
    p.add_argument("--seq-len", type=int, default=None, metavar="S",
                   help=f"probe tokens per sequence (default: min({DEFAULT_SEQ_LEN}, the model's context))")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial state draw (models with a random h_0)")
    add_device_option(p)
    add_threads_option(p, "the analysis")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run_exits(model, idx, args, probe: str, budget: float, progress=None):
    """The exits analysis with the command's options (shared with `audit --exits`)."""
    from loopdyn.dynamics.exits import check_criteria, exits

    criteria = [c for c in str(getattr(args, "criteria", "all")).split(",") if c.strip()] or ["all"]
    check_criteria(criteria, callable(getattr(model, "exit_gate", None)))
    return exits(model, idx, criteria=criteria, max_loops=getattr(args, "max_loops", None),
                 horizon=getattr(args, "horizon", None), budget=budget,
                 oracle_kl=getattr(args, "oracle_kl", 1e-3), jacobian_rate=getattr(args, "jacobian_rate", False),
                 seed=getattr(args, "seed", 0), probe=probe, progress=progress)


def run(args) -> int:
    from loopdyn.inputs import load_model, probe_batch
    from loopdyn.dynamics.loopmap import MAX_LOOPS
    from loopdyn.io import atomic_write_json

    budget = parse_budget(args.budget)
    if args.max_loops is not None and not 1 <= args.max_loops <= MAX_LOOPS:
        raise InputError(f"--max-loops must be in [1, {MAX_LOOPS}], got {args.max_loops}")
    if args.horizon is not None and not 2 <= args.horizon <= MAX_LOOPS:
        raise InputError(f"--horizon must be in [2, {MAX_LOOPS}], got {args.horizon}")
    if args.max_loops is not None and args.horizon is not None and args.horizon < args.max_loops:
        raise InputError(f"--horizon ({args.horizon}) must be at least --max-loops ({args.max_loops})")
    if not args.oracle_kl > 0:
        raise InputError(f"--oracle-kl must be > 0, got {args.oracle_kl}")
    from loopdyn.dynamics.exits.criteria import check_criteria

    check_criteria([c for c in args.criteria.split(",") if c.strip()] or ["all"], has_gate=True)  # names, early
    from loopdyn.inputs import model_input
    from loopdyn.iocheck import data_input

    check_outputs(files={"--json": args.json}, dirs={"--plots": args.plots},
                  inputs=[model_input("CHECKPOINT", args.path), data_input("--data", args.data)])
    check_device(args.device)
    set_threads(args.threads)
    model = load_model(args.path, args.device)
    if args.seq_len is None:
        from loopdyn.models.protocol import token_limits

        _, max_len = token_limits(model)
        args.seq_len = min(DEFAULT_SEQ_LEN, max_len or DEFAULT_SEQ_LEN)
    idx, probe = probe_batch(model, args.data, args.batch_size, args.seq_len, args.device)
    from loopdyn.progress import stages

    bar, update = stages("exits", enabled=not args.no_progress)
    try:
        report = run_exits(model, idx, args, probe, budget, progress=update)
    finally:
        if bar is not None:
            bar.close()
    print(report.to_text())
    if args.json:
        atomic_write_json(args.json, report.to_json(per_token=not args.no_per_token))
        print(f"wrote {args.json}")
    if args.plots:
        from loopdyn.plots.exits import write_exits_plots

        figures = write_exits_plots(report, args.plots, args.format)
        print(f"wrote {len(figures)} figures to {args.plots}:")
        for path, caption in figures:
            print(f"  {path.name}: {caption}")
    return 0
