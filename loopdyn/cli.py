"""The `loopdyn` command line.

Exit codes (shared/DESIGN.md §6): 0 success; 1 bad input (one line on stderr, no traceback);
2 usage; 3 `--strict` and the verdict is not `stable`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from loopdyn.models.errors import InputError
from loopdyn.commands import COMMANDS

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_UNSTABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopdyn",
        description="Stability of looped language models: train, audit, compare, alert.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"loopdyn.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"loopdyn.commands.{name}":
                continue  # a command that is not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"loopdyn {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"loopdyn {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"loopdyn {args.command}: interrupted", file=sys.stderr)
        return 130
