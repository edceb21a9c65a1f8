"""Numbers as loopdyn shows and stores them, and the state norm every layer measures.

One home (the lowest layer that uses them: dynamics ← probes ← loopdyn):

* `fmt(x)` — three significant figures for text reports; complex numbers as a+bi; None and NaN
  as "n/a", ±∞ as "inf"/"-inf";
* `num(x)` — a JSON-safe float: the float, or None when it is NaN/±∞ (JSON has no such numbers);
  `nums(a)` the same elementwise, flattened to a list;
* `token_norms(x)` — ‖x_{b,s,:}‖₂ per token (the last axis is the state), and
  `mean_token_norm(x)` — their mean over batch and tokens, the `state_norm` of docs/design.md §7.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def fmt(x, spec: str = ".3g") -> str:
    """x formatted with `spec` (three significant figures by default); "n/a" for None/NaN,
    "inf"/"-inf", complex numbers as a+bi."""
    if x is None:
        return "n/a"
    if isinstance(x, complex) or isinstance(x, np.complexfloating):
        x = complex(x)
        return f"{x.real:{spec}}{x.imag:+{spec}}i" if abs(x.imag) > 1e-12 else fmt(x.real, spec)
    if not np.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "n/a")
    return format(x, spec)


def num(x) -> float | None:
    """A JSON-safe float: float(x), or None for None, NaN and ±∞."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def nums(a) -> list:
    """`num` of every element of an array, flattened."""
    return [num(x) for x in np.asarray(a, dtype=float).ravel()]


def token_norms(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """‖x‖₂ over the last axis (per token), computed in `dtype` (detached)."""
    return torch.linalg.vector_norm(x.detach().to(dtype), dim=-1)


def mean_token_norm(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The mean over batch and tokens of ‖x‖₂ per token (a 0-d tensor: no host sync)."""
    return token_norms(x, dtype).mean()


__all__ = ["fmt", "num", "nums", "token_norms", "mean_token_norm"]
