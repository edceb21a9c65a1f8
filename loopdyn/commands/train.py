"""`loopdyn train`: train a looped (or fixed-depth) model on text."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from loopdyn.models import LoopedLM
from loopdyn.commands.common import (add_model_options, add_train_options, check_device,
                                     config_from_args, hyphenated, set_threads)
from loopdyn.io import check_outputs
from loopdyn.data import load_text
from loopdyn.train import Distributed, TrainConfig, train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on text (the embedded corpus by default)",
                       description="Train a looped LM. Under torchrun it uses torch.distributed by itself.")
    add_model_options(p)
    add_train_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--log", "--log-file", dest="log", metavar="FILE",
                   help="JSON Lines, one object per optimiser step (under torchrun write --log-file: "
                        "torchrun's own parser takes --log for an abbreviation of its --log-dir) (default: none)")
    g.add_argument("--save", metavar="DIR", help="save the trained model here: writes config.json and "
                   "model.safetensors, keeps every other file in the folder (default: not saved)")
    m = p.add_argument_group("stability monitor (probes.StabilityMonitor; on when any of these is given)")
    m.add_argument("--alerts", metavar="FILE", help="JSON Lines, one object per alert (alerts also go to stderr) (default: none)")
    m.add_argument("--on-spike", choices=["warn", "skip", "rollback", "stop"], type=hyphenated,
                   help="what to do on a loss/gradient spike or a non-finite value (default: warn)")
    m.add_argument("--on-warning", choices=["warn", "stop", "cut-lr", "rollback"], type=hyphenated,
                   help="what to do on an early warning of a loss spike (default: warn)")
    m.add_argument("--on-loop", choices=["warn", "stop", "cut-lr", "rollback"], type=hyphenated,
                   help="what to do when the loop itself turns unstable (loop_instability: rho(A) > 1, "
                        "state growing with depth) even while the loss is fine (default: as --on-warning)")
    m.add_argument("--probes", action="store_true", help="attach the monitor (alerts on stderr only)")
    m.set_defaults(alerts=None)
    m.add_argument("--sync-every", type=int, metavar="N", help="at most N steps between blocking device→host reads of the probe values, and the "
                        "cadence of cross-rank decisions under torchrun (default: 10)")
    m.add_argument("--jacobian-every", type=int, metavar="N", help="loop-Jacobian σ_max every N steps (default: 200)")
    m.add_argument("--tensorboard", metavar="DIR",
                   help="also write signals and alerts for TensorBoard, needs tensorboard (default: none)")
    m.add_argument("--plots", metavar="DIR", help="after training, draw the monitor's signals with its alerts marked "
                   "into DIR/monitor.{format} (attaches the monitor) (default: none)")
    m.add_argument("--format", default="png", type=str.lower, choices=["png", "pdf", "svg"],
                   help="figure format for --plots: png (300 dpi), pdf or svg (default: png)")
    p.set_defaults(func=run)


def monitor_options(args: argparse.Namespace) -> dict | None:
    """StabilityMonitor keyword arguments from the command line, or None if no monitor is wanted."""
    wanted = (args.alerts or args.on_spike or args.on_warning or args.on_loop or args.probes or args.tensorboard
              or getattr(args, "plots", None)
              or args.sync_every is not None or args.jacobian_every is not None)
    if not wanted:
        return None
    opts: dict = {"alerts_path": args.alerts, "tensorboard_dir": args.tensorboard}
    if args.on_spike:
        opts["on_spike"] = args.on_spike
    if args.on_warning:
        opts["on_warning"] = args.on_warning.replace("-", "_")
    if args.on_loop:
        opts["on_loop"] = args.on_loop.replace("-", "_")
    if args.sync_every is not None:
        opts["sync_every"] = args.sync_every
    if args.jacobian_every is not None:
        opts["jacobian_every"] = args.jacobian_every
    return opts


def train_config_from_args(args: argparse.Namespace, **extra) -> TrainConfig:
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                       warmup_steps=args.warmup, eval_every=args.eval_every, seed=args.seed, device=args.device,
                       progress=not args.no_progress, compile=args.compile, dtype=args.dtype, **extra)


def check_paths(args: argparse.Namespace) -> None:
    """Every output path checked before any work: a bad --log, --alerts or --save costs nothing."""
    from loopdyn.models.checkpoint import check_save_target

    from loopdyn.iocheck import check_outputs_against_inputs, data_input, file_input

    data = data_input("--data", args.data)
    check_outputs(files={"--log": args.log, "--alerts": args.alerts},
                  dirs={"--tensorboard": args.tensorboard, "--plots": args.plots}, inputs=[data])
    if args.save:
        check_save_target(args.save, "--save")
        check_outputs_against_inputs({"--save": (args.save, "dir")}, [data])
        for name in ("config.json", "model.safetensors"):  # the files --save will replace
            check_outputs(files={"--save": os.path.join(args.save, name)},
                          inputs=[data, *(file_input(o, p) for o, p in (("--log", args.log), ("--alerts", args.alerts)))])


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    cfg = train_config_from_args(args, log_path=args.log, save_dir=args.save)
    cfg.validate()
    check_paths(args)
    check_device(args.device)
    set_threads(args.threads)
    config.check_fits(factor=4.0, what="training (weights, gradients and two Adam moments)")
    data = load_text(args.data)
    if os.environ.get("RANK", "0") == "0":
        print(f"data: {data.source}: {data.describe()}")
    torch.manual_seed(args.seed)
    model = LoopedLM(config)
    opts = monitor_options(args)
    monitors = []
    factory = None
    if opts is not None:
        from loopdyn.probes import MonitorConfig, StabilityMonitor

        mcfg = MonitorConfig(**opts)
        mcfg.validate()  # bad options fail before any training

        def make_monitor(model, optimizer):
            monitors.append(StabilityMonitor(model, optimizer, config=mcfg))
            return monitors[-1]

        factory = make_monitor
    dist = Distributed()
    try:
        result = train(model, data, cfg, monitor_factory=factory)
    finally:
        dist.close()
    if dist.enabled:  # one line per rank: evidence that every rank ran, and how far
        print(f"rank {dist.rank}/{dist.world}: {result.steps} steps"
              + (f", {len(monitors[0].alerts)} alerts" if monitors else ""), file=sys.stderr)
    if dist.is_main:
        print(f"{config.name} ({config.injection}, {model.num_params():,} parameters): {result.steps} steps, "
              f"{result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)")
        val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.3f}"
        print(f"train loss {result.losses[-1]:.3f}, validation loss {val} nats/byte "
              f"(unigram baseline {data.unigram_loss():.3f})")
        if result.stop_reason:
            print(f"stopped early: {result.stop_reason}")
        if monitors:
            print(monitor_summary(monitors[0], args.alerts))
        if monitors and args.plots:
            from loopdyn.plots.monitor import write_monitor_plot

            path, caption = write_monitor_plot(monitors[0], args.plots, args.format,
                                               title=f"{config.name} ({config.injection}), lr {args.lr:g}")
            print(f"wrote {path}: {caption}")
        if args.save:
            print(f"saved to {args.save}")
        print(result.verdict)
    return 0


def monitor_summary(monitor, path: str | None) -> str:
    counts: dict[str, int] = {}
    for alert in monitor.alerts:
        counts[alert.kind] = counts.get(alert.kind, 0) + 1
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"
    extra = []
    if monitor.skipped_steps:
        extra.append(f"{monitor.skipped_steps} steps skipped")
    if monitor.rollbacks:
        extra.append(f"{len(monitor.rollbacks)} rollbacks")
    where = f" (written to {path})" if path else ""
    return f"monitor: alerts {found}{'; ' + ', '.join(extra) if extra else ''}{where}"
