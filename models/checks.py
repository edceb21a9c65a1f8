"""The validation boundary: every argument, config value and API input checked with its type and
range, in one vocabulary, before any work.

Each check raises `InputError` (a `ValueError`) whose message starts with the argument's name —
the Python name in the API (`idx`, `h`, `states`), the option on the command line (`--seed`) —
and says what was expected and what was given. Rules shared by all:

- an integer is an `int` (or a NumPy integer), never a `bool` and never a float, even a whole one;
- a real number is finite unless said otherwise (NaN and ±Inf are refused), never a `bool`;
- a count is ≥ 0 or ≥ 1 as stated; a seed lies in [0, 2⁶³ − 1];
- token ids are a non-empty 2-D integer tensor (batch, sequence) within the vocabulary;
- a state is a floating-point tensor of the loop's state shape; a list of states is not empty.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from loopdyn.models.errors import InputError

SEED_MAX = 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int, refusing bools, floats and values outside [lo, hi]."""
    if not _is_int(value):
        raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo or hi is not None and value > hi:
        if hi is None:
            raise InputError(f"{name} must be ≥ {lo}, got {value}")
        if lo is None:
            raise InputError(f"{name} must be ≤ {hi}, got {value}")
        raise InputError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, finite: bool = True) -> float:
    """`value` as a float: a real number (not a bool), finite, ≥ lo (> lo if lo_open), ≤ hi."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise InputError(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InputError(f"{name} must be {'>' if lo_open else '≥'} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise InputError(f"{name} must be ≤ {hi:g}, got {value:g}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(value, name, 0, SEED_MAX)


def check_tokens(idx: Any, name: str = "idx", vocab_size: int | None = None, max_len: int | None = None) -> None:
    """Token ids: a torch integer tensor of shape (batch ≥ 1, sequence ≥ 1), ids in [0, vocab_size)
    (read only on the CPU: reading values would sync an accelerator), sequence ≤ max_len."""
    import torch

    if not isinstance(idx, torch.Tensor):
        raise InputError(f"{name} (token ids) must be a torch integer tensor of shape (batch, sequence), "
                         f"got {type(idx).__name__}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise InputError(f"{name} (token ids) must have an integer dtype, got {idx.dtype}")
    if idx.dim() != 2:
        raise InputError(f"{name} (token ids) must have shape (batch, sequence), got {tuple(idx.shape)}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise InputError(f"{name} (token ids) is empty: shape {tuple(idx.shape)}; need at least one token")
    if max_len is not None and idx.shape[1] > max_len:
        raise InputError(f"{name}: a sequence of {idx.shape[1]} tokens is longer than the model supports "
                         f"({max_len})")
    if vocab_size is not None and idx.device.type == "cpu" and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise InputError(f"{name}: token ids must lie in [0, {vocab_size}), got [{int(idx.min())}, {int(idx.max())}]")


def state_shape(model: Any, ctx: Any) -> tuple:
    """The loop's state shape for this context where it can be told without running the model:
    (B, S, width) with None for what is unknown."""
    e = getattr(ctx, "e", None)
    lead = tuple(e.shape[:-1]) if e is not None and hasattr(e, "shape") else (None, None)
    config = getattr(model, "config", None)
    width = getattr(config, "d_state", None)
    if not isinstance(width, int):
        width = getattr(config, "hidden_size", None) if e is None else e.shape[-1]
    if getattr(config, "injection", None) == "autonomous" and e is not None:
        width = e.shape[-1]
    return (*lead, width if isinstance(width, int) else None)


def check_state(h: Any, name: str = "h", shape: Sequence[int | None] | None = None) -> None:
    """A state: a floating-point tensor, with `shape` where given (None entries are free)."""
    import torch

    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        got = h.dtype if isinstance(h, torch.Tensor) else type(h).__name__
        raise InputError(f"{name} (a loop state) must be a floating-point tensor, got {got}")
    if shape is not None:
        shape = tuple(shape)
        if h.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, h.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise InputError(f"{name} (a loop state) must have shape {want}, got {tuple(h.shape)}")
    if h.numel() == 0:
        raise InputError(f"{name} (a loop state) is empty: shape {tuple(h.shape)}")


def check_states(states: Any, name: str = "states") -> None:
    """A trajectory: a non-empty list (or tuple) of floating-point tensors of one shape."""
    if not isinstance(states, (list, tuple)):
        raise InputError(f"{name} must be a list of state tensors, got {type(states).__name__}")
    if not states:
        raise InputError(f"{name} is empty: need at least one state")
    check_state(states[0], f"{name}[0]")
    first = tuple(states[0].shape)
    for i, h in enumerate(states[1:], 1):
        check_state(h, f"{name}[{i}]", first)
