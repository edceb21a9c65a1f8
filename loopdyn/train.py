"""The training loop: AdamW with the official no-weight-decay groups, linear warm-up then cosine
decay, gradient clipping, periodic validation, a progress bar, JSON-Lines logging, and
checkpointing.

Under `torchrun` (WORLD_SIZE > 1) it joins a `torch.distributed` group by itself (gloo on the
CPU, NCCL on CUDA), wraps the model in DistributedDataParallel, gives every rank its own data
stream, and lets only rank 0 write files.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from loopdyn.dynamics.verdict import RunStatus, run_line, run_status, validation_failure
from loopdyn.models import LoopedLM, save
from loopdyn.models.errors import InputError
from loopdyn.io import JsonlWriter
from loopdyn.data import TextData


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int | None = None  # None: 10% of the steps, at most 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100  # validation every N steps (and at the end); 0: only at the end
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    log_path: str | None = None  # one JSON object per optimiser step
    save_dir: str | None = None
    progress: bool = True  # on stderr: a progress bar on a terminal, periodic log lines otherwise
    compile: bool = False  # training forward and backward through torch.compile (validation stays eager)
    dtype: str = "float32"  # loopdyn.models.precision: float32 | bfloat16 | float16 | bf16-mixed | fp16-mixed
    desc: str = "train"

    def validate(self) -> None:
        """Types and ranges of every field, named as the command line spells them (`--warmup`)."""
        from loopdyn.models import checks as v

        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            v.check_int(getattr(self, name), f"--{name.replace('_', '-')}", 1)
        v.check_float(self.lr, "--lr", 0, lo_open=True)
        v.check_int(self.eval_every, "--eval-every", 0)
        if self.warmup_steps is not None:
            v.check_int(self.warmup_steps, "--warmup", 0)
        v.check_seed(self.seed, "--seed")
        v.check_float(self.min_lr_ratio, "min_lr_ratio", 0, 1)
        v.check_float(self.weight_decay, "weight_decay", 0)
        v.check_float(self.grad_clip, "grad_clip", 0, lo_open=True)
        from loopdyn.models.precision import precision

        precision(self.dtype)  # an unknown name: one clear error before any work

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)


@dataclass
class TrainResult:
    steps: int  # optimiser steps taken
    tokens: int  # training tokens seen (all ranks)
    seconds: float
    losses: list[float] = field(default_factory=list)  # training loss per step
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    diverged: bool = False
    stop_reason: str | None = None
    verdict: str | None = None  # one line about the run (run_verdict)

    @property
    def final_val_loss(self) -> float | None:
        return self.val[-1][1] if self.val else None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr·min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; never on the injection (A_log, dt_bias, B, W), the
    readout C, norms, biases or gains (the official no-decay groups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # qk_bias is a bias too, although it is stored as a (2, 1, heads, s) tensor
        exempt = p.dim() < 2 or name.endswith("bias") or name.startswith(("injection.", "readout."))
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: LoopedLM, data: TextData, n_batches: int, batch_size: int, seq_len: int,
             n_loops: int | None = None, device: str | torch.device = "cpu") -> float:
    """Mean validation loss (nats per byte) on a fixed set of windows, in eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    batches = data.val_batches(n_batches, batch_size, seq_len)
    for x, y in batches:
        kwargs = {"n_loops": n_loops} if model.config.looped else {}
        total += float(model(x.to(device), y.to(device), **kwargs).loss)
    model.train(was_training)
    return total / len(batches)


class Distributed:
    """torch.distributed set up from torchrun's environment (a no-op for one process)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(model: LoopedLM, data: TextData, cfg: TrainConfig,
          monitor_factory: Callable[[nn.Module, torch.optim.Optimizer], Any] | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `model` in place and return what happened.

    `monitor_factory(model, optimizer)` may attach a probe (e.g. probes.StabilityMonitor); it is
    closed at the end, and training stops early when it sets `stop_requested`. The trainer
    gives it the pre-clipping gradient norm (`record_grad_norm`) and honours the learning-rate
    cuts it makes through `group["lr_scale"]`. `on_step(step, record)` sees each step's log
    record. Training also stops when the loss stops being finite (the run is marked diverged),
    unless the monitor recovers from it (`recovers_nonfinite`: it skips such steps or rolls back).
    """
    cfg.validate()
    if cfg.seq_len > model.config.block_size:
        raise InputError(f"seq-len {cfg.seq_len} is longer than the model supports "
                         f"(block_size {model.config.block_size})")
    from loopdyn.models.precision import precision

    prec = precision(cfg.dtype)
    dist = Distributed()
    device = torch.device(cfg.device)
    prec.apply(model)  # pure bf16/fp16: the weights in that dtype; mixed: float32 weights, autocast below
    model.to(device).train()
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model)
    if cfg.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(model, cfg)
    # A compiled run hands the monitor the torch.compile wrapper: it sees that the model is
    # compiled and reads the activations in its own eager probe pass (no hook on compiled code).
    monitor = monitor_factory(net if cfg.compile else model, optimizer) if monitor_factory else None
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank)
    log = JsonlWriter(cfg.log_path) if cfg.log_path and dist.is_main else None
    result = TrainResult(steps=0, tokens=0, seconds=0.0)
    bar = _progress(cfg, dist)
    if bar is not None and hasattr(monitor, "set_console_writer") and not _is_line_progress(bar):
        monitor.set_console_writer(bar.write)  # alert lines above the bar, not through it
    start = time.perf_counter()
    try:
        for step in range(cfg.steps):
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # a probe may cut lr_scale
            x, y = data.batch(cfg.batch_size, cfg.seq_len, generator)
            if monitor is not None and hasattr(monitor, "record_batch"):
                # replay: re-seed a generator with `seed` and draw `batch` + 1 batches
                monitor.record_batch({"batch": step, "seed": cfg.seed * 1000 + dist.rank})
            with prec.context(device):
                loss = net(x.to(device), y.to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if monitor is not None and hasattr(monitor, "record_grad_norm"):
                monitor.record_grad_norm(grad_norm)  # the norm before clipping
            used_lr = optimizer.param_groups[0]["lr"]  # a monitor may cut lr_scale inside step()
            optimizer.step()
            loss_value = float(loss.detach())
            result.steps = step + 1
            result.tokens += cfg.batch_size * cfg.seq_len * dist.world
            result.losses.append(loss_value)
            record = {"step": step + 1, "loss": loss_value, "lr": used_lr,
                      "grad_norm": float(grad_norm), "tokens": result.tokens,
                      "time_s": round(time.perf_counter() - start, 3)}
            if monitor is not None and getattr(monitor, "last_step_skipped", False):
                record["skipped"] = True
            last = step + 1 == cfg.steps
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                with prec.context(device):
                    val = evaluate(model, data, cfg.eval_batches, cfg.batch_size, cfg.seq_len, device=device)
                result.val.append((step + 1, val))
                record["val_loss"] = val
            if log:
                log.write(record)
            if on_step:
                on_step(step + 1, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", **({"val": f"{result.val[-1][1]:.3f}"} if result.val else {}))
            if not math.isfinite(loss_value) and not getattr(monitor, "recovers_nonfinite", False):
                result.diverged, result.stop_reason = True, f"loss became {loss_value} at step {step + 1}"
                break
            if monitor is not None and getattr(monitor, "stop_requested", False):
                result.stop_reason = f"stopped by the monitor at step {step + 1}"
                break
    finally:
        result.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if log:
            log.close()
        if monitor is not None:
            monitor.close()
    result.verdict = run_verdict(result, data.unigram_loss(), monitor)
    # provenance, read back by `loopdyn sweep-loops` for the scaling-law CSV
    model.config.extra["train_tokens"] = model.config.extra.get("train_tokens", 0) + result.tokens
    if cfg.save_dir and dist.is_main:
        save(model, cfg.save_dir)
    return result


def run_verdict(result: TrainResult, baseline: float | None, monitor=None) -> str:
    """One line about the whole run, e.g. "run failed: validation loss 5.61 above the unigram
    baseline 4.86; loop unstable since step 9 (injection_radius = 4.9 at step 71)".

    failed: the loss diverged, the monitor stopped the run, or the final validation loss is not
    below the unigram baseline; warned: the monitor saw spikes, spike warnings or loop
    instability (or acted) but the run ended well; ok: nothing of the kind."""
    diverged = "loss became non-finite" if result.diverged else None
    if monitor is not None and hasattr(monitor, "verdict"):
        return monitor.verdict(result.final_val_loss, baseline, diverged=diverged).line()
    val = result.final_val_loss
    status, failed = run_status([x for x in (diverged, validation_failure(val, baseline)) if x], [])
    if status == RunStatus.FAILED:
        return run_line(status, failed)
    if val is not None and baseline is not None:
        return f"run ok: validation loss {val:.3f} below the unigram baseline {baseline:.3f} (no monitor attached)"
    return "run ok (no validation, no monitor attached)"


def _progress(cfg: TrainConfig, dist: Distributed):
    """A bar on a terminal, periodic log lines otherwise (loopdyn.progress); rank 0 only."""
    from loopdyn.progress import progress

    return progress(cfg.steps, cfg.desc, "step", enabled=cfg.progress and dist.is_main)


def _is_line_progress(bar) -> bool:
    from loopdyn.progress import LineProgress

    return isinstance(bar, LineProgress)
