"""One module per `loopdyn` subcommand.

Each module defines `register(subparsers)`, which adds its parser and sets
`func=run` on it; `run(args) -> int` returns the exit code. `loopdyn.cli` imports the
modules listed in COMMANDS lazily-enough (argparse needs them all to build `--help`).
"""

COMMANDS = ["demo", "train", "audit", "compare", "sweep_loops", "fit", "exits", "plan"]
