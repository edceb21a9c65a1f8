"""Options and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
import json

from loopdyn.models import LoopConfig
from loopdyn.models.errors import InputError


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    g.add_argument("--injection", choices=["diagonal", "linear", "additive", "autonomous", "none"],
                   help="injection kind (default: the preset's; 'none' = the fixed-depth twin)")
    g.add_argument("--mean-loops", type=int, help="μ_rec, the mean loop count")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any LoopConfig field, e.g. --set d_model=128 (repeatable)")


def config_from_args(args: argparse.Namespace) -> LoopConfig:
    overrides = parse_overrides(args.set)
    if args.injection is not None:
        overrides["injection"] = args.injection
    if args.mean_loops is not None:
        overrides["mean_loops"] = args.mean_loops
    return LoopConfig.preset(args.preset, **overrides)


def parse_overrides(items: list[str]) -> dict:
    """FIELD=VALUE pairs; VALUE is read as JSON when it parses (numbers, true, null), else as text."""
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise InputError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[field.strip()] = value
    return out


def add_train_options(parser: argparse.ArgumentParser, steps: int = 300) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default: {steps})")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 10%% of steps, ≤ 100)")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data", default=None, help="a text file or folder (default: the Python standard library's sources)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
