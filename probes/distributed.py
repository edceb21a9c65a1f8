"""Every rank takes the same decision: decisions are reduced with MAX at the sync points.

Detectors run on each rank's own values (each rank sees its own batches), so ranks can
disagree; the monitor encodes what it wants to do as small integers (an action level, a
skip flag) and all-reduces them with MAX, so if any rank asks to stop, roll back or skip,
every rank does, at the same step. Outside torch.distributed this is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree_max(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """Element-wise MAX of `values` over all ranks (a collective: every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
