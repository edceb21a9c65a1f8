"""What the monitor can do about an alert: skip a step, roll back, cut the learning rate.

- skip: `drop_gradients` sets every parameter's .grad to None right before the optimiser
  step. PyTorch optimisers (SGD, Adam, AdamW, ...) leave a parameter without a gradient
  untouched: no update, no weight decay, no moment or step-count change — the step is a
  no-op, exactly.
- rollback: `SnapshotRing` keeps the last few known-good (model, optimiser) states, copied
  to the CPU by default. Cost per snapshot: one device→host copy of the parameters, buffers
  and optimiser state (AdamW: 3× the parameter bytes plus step counters), and that much host
  memory per ring slot; taken only at sync points that found no alert.
- cut the learning rate: behind the small `LRCut` interface (`cut(factor) -> str`, `scale`).
  The default `ParamGroupLRCut` sets `group["lr_scale"] *= factor` (loopdyn's trainer sets
  lr = schedule(step)·lr_scale every step) and `group["lr"] *= factor` (for foreign loops
  without a scheduler). `SchedulerLRCut(scheduler)` also scales the scheduler's `base_lrs`, so
  a PyTorch LRScheduler that recomputes lr from its base values keeps the cut.
- replay: a snapshot holds the RNG states (torch CPU, and CUDA when initialised) at the time it
  was taken and the data position of the next batch, so the steps after it can be replayed.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

ACTIONS = ("warn", "log", "raise", "stop", "skip", "rollback", "cut_lr")


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Make the coming optimizer.step() a no-op (see the module docstring)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def cut_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's lr_scale and lr by `factor`; returns the new lr_scale of group 0."""
    for group in optimizer.param_groups:
        group["lr_scale"] = group.get("lr_scale", 1.0) * factor
        group["lr"] = group["lr"] * factor
    return optimizer.param_groups[0]["lr_scale"]


class LRCut:
    """How the monitor cuts the learning rate (one small interface; swap it for a scheduler or a
    framework that owns the learning rate)."""

    def cut(self, factor: float) -> str:
        """Apply the cut now (it must affect the coming optimizer.step()); a one-line summary."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """The product of all cuts so far."""
        raise NotImplementedError


class ParamGroupLRCut(LRCut):
    """lr_scale and lr of every param group (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def cut(self, factor: float) -> str:
        scale = cut_learning_rate(self.optimizer, factor)
        return f"learning rate cut by {factor:g} (lr_scale now {scale:.3g})"

    @property
    def scale(self) -> float:
        return float(self.optimizer.param_groups[0].get("lr_scale", 1.0))


class SchedulerLRCut(ParamGroupLRCut):
    """Also scales a torch.optim.lr_scheduler's base_lrs (schedulers recompute lr from them)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler):
        super().__init__(optimizer)
        self.scheduler = scheduler

    def cut(self, factor: float) -> str:
        base = getattr(self.scheduler, "base_lrs", None)
        if isinstance(base, list):
            self.scheduler.base_lrs = [b * factor for b in base]
        return super().cut(factor)


def rng_state() -> dict:
    """The global RNG states a training step draws from (depth sampling, dropout)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    step: int
    model: dict
    optimizer: dict
    lr_scales: list
    nbytes: int
    rng: dict | None = None  # RNG states when the snapshot was taken (replay the next step)
    data_position: object = None  # where the next batch comes from (see StabilityMonitor.record_batch)


class SnapshotRing:
    """The last `size` known-good states of a model and its optimiser."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, size: int = 2, device: str = "cpu"):
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self.ring: deque[Snapshot] = deque(maxlen=max(1, size))

    def take(self, step: int, data_position=None) -> Snapshot:
        model_state = _to(self.model.state_dict(), self.device)
        opt_state = _to(self.optimizer.state_dict(), self.device)
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(model_state)) + \
            sum(t.numel() * t.element_size() for t in _tensors(opt_state))
        snap = Snapshot(step, model_state, opt_state,
                        [g.get("lr_scale", 1.0) for g in self.optimizer.param_groups], nbytes,
                        rng=rng_state(), data_position=data_position)
        self.ring.append(snap)
        return snap

    def latest_before(self, step: int) -> Snapshot | None:
        for snap in reversed(self.ring):
            if snap.step < step:
                return snap
        return None

    @torch.no_grad()
    def restore(self, snap: Snapshot) -> None:
        """Copy the snapshot back in place (parameters keep their identity, so the optimiser
        and any DDP wrapper still point at them)."""
        own = self.model.state_dict(keep_vars=True)
        for name, value in snap.model.items():
            own[name].copy_(value)
        lrs = [(g["lr"], g.get("lr_scale", 1.0)) for g in self.optimizer.param_groups]
        # load_state_dict keeps tensors that already sit on the right device and dtype (it copies
        # the dict shallowly), and the optimiser then updates them in place: hand it a fresh copy,
        # so the snapshot stays intact for a second rollback to it.
        self.optimizer.load_state_dict(_to(snap.optimizer, self.device))
        for g, (lr, scale) in zip(self.optimizer.param_groups, lrs):
            g["lr"], g["lr_scale"] = lr, scale  # keep the current schedule; the caller may cut it
        # load_state_dict replaced the whole optimiser state; stale gradients must not be applied.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def __len__(self) -> int:
        return len(self.ring)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
