"""`loopdyn fit CSV --law testtime|parcae|unified|routed`: fit a scaling law to measurements.

Prints the parameters with bootstrap intervals and the fit errors (`loopdyn.scaling.report`);
`--json` writes the docs/design.md §7 record, `--plot` a figure (`loopdyn.plots.fit`). For
`testtime` the exponential law is also compared against the three power-law forms.
"""
from __future__ import annotations

import argparse
import sys

from loopdyn import scaling
from loopdyn.io import atomic_write_json, check_outputs
from loopdyn.models.errors import InputError

DEFAULT_RESTARTS = 64
DEFAULT_BOOTSTRAP = 50


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit a scaling law (test-time, Parcae, unified or routed) to a CSV",
        description=(
            "Fit a scaling law to a CSV with a header row. Columns by name: loops, "
            "mean_recurrence, params, tokens, experts, flops, loss. Laws and the columns "
            "they need: testtime (loops) L_inf + Z*exp(-z*T); parcae (params, tokens) "
            "E + A*N^-a + B*D^-b; unified (loops, mean_recurrence, params, tokens) "
            "E + X*N^-x + Y*D^-y + Z*exp(-z*T/mu_rec); routed (params, experts) Clark et al. "
            "2022. Fitting: Huber loss on log-loss residuals, L-BFGS-B from many seeded "
            "starts, bootstrap intervals."
        ),
    )
    p.add_argument("csv", metavar="CSV", help="measurements, one row per (model, setting)")
    p.add_argument("--law", required=True, choices=scaling.LAWS, help="which law to fit")
    p.add_argument("--json", metavar="FILE", help="write {law, params, ci, error} as JSON (default: none)")
    p.add_argument("--plot", metavar="FILE", help="write a figure, format from --format or the suffix (default: none)")
    p.add_argument("--format", type=str.lower, choices=["png", "pdf", "svg"], default=None,
                   help="figure format for --plot: png (300 dpi), pdf or svg (default: the suffix, else png)")
    p.add_argument("--unit", choices=["nats/byte", "nats/token"], default=None,
                   help="loss unit for the labels (default: the CSV's `unit` column, else plain nats)")
    p.add_argument("--holdout-above", type=float, metavar="T", default=None,
                   help="withhold rows with loops > T (or mean_recurrence > T when there is "
                        "no loops column) and report the error on them (default: none, fit every row)")
    p.add_argument("--restarts", type=_int_at_least(1), default=DEFAULT_RESTARTS, metavar="N",
                   help=f"optimiser starting points (default {DEFAULT_RESTARTS})")
    p.add_argument("--bootstrap", type=_int_at_least(0), default=DEFAULT_BOOTSTRAP, metavar="N",
                   help=f"bootstrap refits for the intervals (default {DEFAULT_BOOTSTRAP}; 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    plot_format = None
    if args.plot:
        from loopdyn.plots import fit as fit_plot

        plot_format = fit_plot.plot_format(args.plot, args.format)
    from loopdyn.iocheck import file_input
    from loopdyn.models.checks import check_float, check_seed

    if args.holdout_above is not None:
        check_float(args.holdout_above, "--holdout-above")
    check_seed(args.seed, "--seed")
    check_outputs(files={"--json": args.json, "--plot": args.plot}, inputs=[file_input("CSV", args.csv)])
    cols = scaling.read_law_csv(args.csv, args.law)
    kw = dict(holdout_above=args.holdout_above, restarts=args.restarts, seed=args.seed)
    if args.holdout_above is not None and "loops" not in cols and "mean_recurrence" not in cols:
        raise InputError("--holdout-above needs a loops (or mean_recurrence) column")
    fit = scaling.fit_law(args.law, cols, bootstrap=args.bootstrap, **kw)

    comparison = None
    if args.law == "testtime":
        others = [scaling.fit_law(form, cols, bootstrap=0, **kw) for form in scaling.TESTTIME_FORMS[1:]]
        comparison = scaling.TestTimeComparison.rank([fit, *others])

    print(scaling.format_fit(fit, comparison, holdout_above=args.holdout_above, seed=args.seed))
    for warning in scaling.fit_warnings(fit, cols, args.law):
        print(f"loopdyn fit: warning: {warning}", file=sys.stderr)

    if args.json:
        doc = fit.to_json()
        if comparison is not None:
            doc["comparison"] = comparison.to_json()
        atomic_write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        held = scaling.holdout_mask(cols, holdout_above=args.holdout_above)
        unit = args.unit or fit_plot.csv_unit(args.csv)
        caption = fit_plot.write_fit_plot(args.plot, plot_format, fit, cols, held, comparison, unit)
        print(f"wrote {args.plot}: {caption}")
    return 0
