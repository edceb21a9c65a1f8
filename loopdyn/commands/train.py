"""`loopdyn train`: train a looped (or fixed-depth) model on text."""
from __future__ import annotations

import argparse

import torch

from models import LoopedLM
from loopdyn.commands.common import add_model_options, add_train_options, config_from_args
from loopdyn.data import load_text
from loopdyn.train import Distributed, TrainConfig, train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on text (the embedded corpus by default)",
                       description="Train a looped LM. Under torchrun it uses torch.distributed by itself.")
    add_model_options(p)
    add_train_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--log", metavar="FILE", help="JSON Lines, one object per optimiser step")
    g.add_argument("--save", metavar="DIR", help="save the trained model here (config.json + model.safetensors)")
    p.set_defaults(func=run)


def train_config_from_args(args: argparse.Namespace, **extra) -> TrainConfig:
    return TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                       warmup_steps=args.warmup, eval_every=args.eval_every, seed=args.seed, device=args.device,
                       progress=not args.no_progress, **extra)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    cfg = train_config_from_args(args, log_path=args.log, save_dir=args.save)
    cfg.validate()
    data = load_text(args.data)
    torch.manual_seed(args.seed)
    model = LoopedLM(config)
    dist = Distributed()
    try:
        result = train(model, data, cfg)
    finally:
        dist.close()
    if dist.is_main:
        print(f"{config.name} ({config.injection}, {model.num_params():,} parameters): {result.steps} steps, "
              f"{result.tokens:,} tokens in {result.seconds:.0f} s ({result.tokens_per_second:,.0f} tokens/s)")
        val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.3f}"
        print(f"train loss {result.losses[-1]:.3f}, validation loss {val} nats/byte "
              f"(unigram baseline {data.unigram_loss():.3f})")
        if result.stop_reason:
            print(f"stopped early: {result.stop_reason}")
        if args.save:
            print(f"saved to {args.save}")
    return 0
