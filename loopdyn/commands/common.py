"""Options and helpers shared by several subcommands.

One spelling per concept across commands: `--data PATH`, `--batch-size N`, `--seq-len S`,
`--device DEV`, `--threads N`, `--no-progress`; choices are written with hyphens (`cut-lr`), the
underscore spelling being accepted silently. Every output path is checked before any work
(`loopdyn.io.check_outputs`), and `--device` against this PyTorch build (`check_device`).
"""
from __future__ import annotations

import argparse
import json

from loopdyn.models import LoopConfig
from loopdyn.models.config import INJECTION_ALIASES, INJECTIONS
from loopdyn.models.errors import InputError

DATA_HELP = "a text file or folder of text files (default: the Python standard library's sources)"


def hyphenated(text: str) -> str:
    """argparse `type` for choices written with hyphens: `cut_lr` is read as `cut-lr`."""
    return text.replace("_", "-")


def add_hidden_alias(parser_or_group, alias: str, dest: str, **kwargs) -> None:
    """An old spelling that still works but is not shown in --help."""
    parser_or_group.add_argument(alias, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_data_option(parser, help: str = DATA_HELP) -> None:
    parser.add_argument("--data", default=None, metavar="PATH", help=help)


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="torch device: cpu, cuda, cuda:1, mps (default: cpu)")


def add_dtype_option(parser, what: str = "the loop") -> None:
    """`--dtype`: the compute precision (loopdyn.models.precision: pure float32/bfloat16/float16,
    or bf16-mixed/fp16-mixed as in training). Checked at parse time (exit 2 with the choices)."""
    from loopdyn.models.precision import CHOICES, DTYPE_HELP

    def parse(text: str) -> str:
        from loopdyn.models.precision import precision

        try:
            return precision(text).name
        except InputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parser.add_argument("--dtype", default="float32", type=parse, metavar="|".join(CHOICES),
                        help=f"{DTYPE_HELP}; for {what} (default: float32)")


def add_threads_option(parser, what: str = "training",
                       default: str = "PyTorch's choice, one per core; on a shared machine use 1") -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"CPU threads for {what} (default: {default})")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    g.add_argument("--injection", choices=[*INJECTIONS, *INJECTION_ALIASES],
                   help="injection kind (default: the preset's; 'fixed' = the fixed-depth twin, 'none' "
                        "is accepted for it)")
    g.add_argument("--mean-loops", type=int, metavar="N", help="μ_rec, the mean loop count (default: the preset's)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any LoopConfig field, e.g. --set d_model=128; repeatable (default: none)")


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
        except (json.JSONDecodeError, RecursionError):
            out[field.strip()] = value
    return out


def add_train_options(parser: argparse.ArgumentParser, steps: int = 300) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, metavar="N", help="optimiser steps")
    g.add_argument("--lr", type=float, default=3e-3, metavar="X", help="peak learning rate")
    g.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per batch")
    g.add_argument("--seq-len", type=int, default=64, metavar="S", help="tokens (bytes) per sequence")
    g.add_argument("--warmup", type=int, default=None, metavar="N", help="warm-up steps (default: 10%% of steps, ≤ 100)")
    g.add_argument("--eval-every", type=int, default=100, metavar="N",
                   help="validation every N steps and at the end; 0: only at the end")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--compile", action="store_true",
                   help="train through torch.compile (inductor): compiling takes ~25 s, then steps ran 1.14× "
                        "faster at a fixed depth and 1.01–1.04× with per-sequence depths on a 2-core CPU "
                        "(README, benchmarks); the stability monitor then reads the activations in its own "
                        "eager probe pass every 10 steps (no hook on compiled code)")
    add_data_option(g)
    add_device_option(g)
    add_dtype_option(g, "training")
    add_threads_option(g)
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal, no progress lines otherwise")


def check_device(name: str) -> str:
    """Refuse a device this PyTorch build or machine does not have, before any work."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {name!r}: not a device name (try cpu, cuda, cuda:0 or mps)") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise InputError(f"--device {name}: this PyTorch build ({torch.__version__}) has no CUDA support; "
                             f"use --device cpu or install a CUDA build of PyTorch")
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise InputError(f"--device {name}: unsupported device type {device.type!r} (use cpu, cuda or mps)")
    return name


def max_threads() -> int:
    """The largest `--threads`: 4 threads per CPU core, at least 64 (more only fails in OpenMP)."""
    import os

    return max(64, 4 * (os.cpu_count() or 1))


def check_threads(n: int | None) -> int | None:
    if n is not None:
        from loopdyn.models.checks import check_int

        check_int(n, "--threads", 1, max_threads())
    return n


def set_threads(n: int | None) -> None:
    """`--threads N`: intra-op threads for this process (and OpenMP's, for its own pools)."""
    if check_threads(n) is None:
        return
    import torch

    torch.set_num_threads(n)
