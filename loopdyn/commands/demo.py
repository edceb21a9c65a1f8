"""`loopdyn demo`: the main job on the embedded default corpus, in a few minutes on 2 CPU cores."""
from __future__ import annotations

import argparse
import time

import torch

from models import LoopConfig, LoopedLM
from loopdyn.data import load_text
from loopdyn.train import TrainConfig, train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny Parcae model on the Python standard library's sources")
    p.add_argument("--out", default="loopdyn-demo", help="output folder (default: ./loopdyn-demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    data = load_text()
    baseline = data.unigram_loss()
    print(f"corpus: {data.source}, {data.n_files} files, {len(data.train):,} training bytes, "
          f"{len(data.val):,} validation bytes; unigram baseline {baseline:.3f} nats/byte")
    torch.manual_seed(args.seed)
    config = LoopConfig.preset("tiny")
    model = LoopedLM(config)
    print(f"model: tiny Parcae ({config.injection} injection, {model.num_params():,} parameters, "
          f"{config.n_prelude}/{config.n_core}/{config.n_coda} prelude/core/coda blocks, μ_rec = {config.mean_loops})")
    cfg = TrainConfig(steps=args.steps, seed=args.seed, progress=not args.no_progress,
                      save_dir=f"{args.out}/model", log_path=f"{args.out}/train.jsonl", desc="tiny Parcae")
    result = train(model, data, cfg)
    val = result.final_val_loss
    print(f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.seconds:.0f} s: "
          f"validation loss {val:.3f} nats/byte, {baseline - val:.3f} below the unigram baseline")
    print(f"saved the model to {args.out}/model and the training log to {args.out}/train.jsonl "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0
