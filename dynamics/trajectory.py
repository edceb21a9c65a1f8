"""The measured recurrence: states h_0..h_T of the real loop on a probe batch, and their norms.

Norms (docs/design.md §7): `state_norm[t]` is the mean over batch and tokens of the token vector
norm ‖h_t‖₂; `rel_residual[t]` is the mean over batch and tokens of
‖h_t − h_{t−1}‖₂ / ‖h_t‖₂ (the paper's relative residual, per token). The whole-batch
Frobenius norms (`total_norm`, `total_residual`) are what the forecast extrapolates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from loopdyn.dynamics.loopmap import analysis, require_loop
from loopdyn.models import checks, protocol
from loopdyn.models.weights import all_finite
from loopdyn.dynamics.numbers import token_norms


@dataclass
class Trajectory:
    """Per-loop statistics of h_0..h_T; index t of every array is loop t (index 0 = h_0).

    Entries for loops at or after a non-finite state are NaN.
    """

    n_loops: int
    state_norm: np.ndarray  # mean token ‖h_t‖₂
    rel_residual: np.ndarray  # mean token ‖h_t − h_{t−1}‖₂/‖h_t‖₂ (NaN at t = 0)
    residual_norm: np.ndarray  # mean token ‖h_t − h_{t−1}‖₂ (NaN at t = 0)
    total_norm: np.ndarray  # ‖h_t‖ over the whole batch (Frobenius)
    total_residual: np.ndarray  # ‖h_t − h_{t−1}‖ over the whole batch (NaN at t = 0)
    nonfinite_at: int | None  # first loop whose state holds NaN/Inf
    states: list = field(default_factory=list, repr=False)  # h_0..h_T (float32 tensors), if kept
    ctx: object = field(default=None, repr=False)

    @property
    def loops(self) -> list[int]:
        return list(range(1, self.n_loops + 1))

    def to_json(self) -> dict:
        """The docs/design.md §7 `trajectory` record (loops 1..T)."""
        return {"loops": self.loops,
                "state_norm": [float(x) for x in self.state_norm[1:]],
                "rel_residual": [float(x) for x in self.rel_residual[1:]]}


def trajectory_stats(states: list[torch.Tensor], ctx=None, keep_states: bool = True) -> Trajectory:
    """Statistics of a list of states h_0..h_T (each (B, S, ds))."""
    checks.check_states(states, "states")
    T = len(states) - 1
    sn, rr, rn, tn, tr = (np.full(T + 1, math.nan) for _ in range(5))
    nonfinite_at = None
    for t, h in enumerate(states):
        if not all_finite(h):
            nonfinite_at = t
            break
        norms = token_norms(h)
        sn[t] = float(norms.mean())
        tn[t] = float(torch.linalg.vector_norm(h.to(torch.float64)))
        if t > 0:
            d = h.to(torch.float64) - states[t - 1].to(torch.float64)
            dn = token_norms(d)
            rn[t] = float(dn.mean())
            rr[t] = float((dn / norms.clamp_min(1e-30)).mean())
            tr[t] = float(torch.linalg.vector_norm(d))
    return Trajectory(T, sn, rr, rn, tn, tr, nonfinite_at, list(states) if keep_states else [], ctx)


def initial_state(model, ctx) -> torch.Tensor:
    """h_0 drawn deterministically (a fixed seed), also for a model in training mode: an analysis
    never consumes the global random stream of a training run (`protocol.initial_state`)."""
    return protocol.initial_state(model, ctx)


def run_loop(model, ctx, n_loops: int, h0: torch.Tensor | None = None, stop_nonfinite: bool = True,
             cost=None) -> list[torch.Tensor]:
    """h_0..h_T by plain loop steps (monitor hooks detached); stops after a non-finite state."""
    with analysis(model):
        h = initial_state(model, ctx) if h0 is None else h0
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise protocol.ProtocolError(f"LoopedModel.init_state must return a floating-point tensor, "
                                         f"got {type(h).__name__}")
        states = [h]
        for _ in range(n_loops):
            if stop_nonfinite and not all_finite(h):
                break
            h = checked_step(model, h, ctx)
            if cost is not None:
                cost.steps += 1
            states.append(h)
    return states


def checked_step(model, h: torch.Tensor, ctx) -> torch.Tensor:
    """model.step(h, ctx), with a ProtocolError naming `step` for a wrong signature or shape."""
    try:
        out = model.step(h, ctx)
    except TypeError as err:
        raise protocol.ProtocolError(f"LoopedModel.step(h, ctx) failed: {err}") from None
    if not isinstance(out, torch.Tensor) or out.shape != h.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise protocol.ProtocolError(f"LoopedModel.step must keep the state's shape: h has {tuple(h.shape)}, "
                                     f"step(h) gave {got}")
    return out


def check_pure(model, recomputed: torch.Tensor, measured: torch.Tensor, t: int) -> None:
    """Raise a ProtocolError when F(h_t) recomputed (by a linearisation) differs from the measured
    h_{t+1}: the step is not a pure function of h (random numbers, dropout in train mode, state)."""
    scale = float(measured.abs().max()) if measured.numel() else 0.0
    # the linearisation's kernels (math attention, autograd-recording paths) round differently from
    # the plain step's: a few units of the dtype's round-off (bf16: 2⁻⁸), never an O(1) difference
    eps = torch.finfo(measured.dtype).eps if measured.is_floating_point() else 0.0
    rtol, atol = max(1e-4, 8 * eps), max(1e-5, 8 * eps) * max(scale, 1.0)
    if not torch.allclose(recomputed, measured, rtol=rtol, atol=atol, equal_nan=True):
        raise protocol.ProtocolError(f"LoopedModel.step is not a pure function of h: recomputing loop {t + 1} "
                                     f"gave a different state (random numbers drawn each call? dropout in "
                                     f"train mode?)")


def encode_probe(model, idx: torch.Tensor):
    """The loop's context ctx = model.encode(idx), with a ProtocolError naming `encode`."""
    require_loop(model)
    checks.check_tokens(idx, "idx")
    with analysis(model):
        try:
            return model.encode(idx)
        except TypeError as err:
            raise protocol.ProtocolError(f"LoopedModel.encode(idx) failed: {err}") from None


def trajectory_of(states: list[torch.Tensor], ctx, n_loops: int, keep_states: bool = True) -> Trajectory:
    """The Trajectory of a run h_0..h_t of n_loops loops (t < n_loops when it stopped at a
    non-finite state: the loops not run are NaN)."""
    traj = trajectory_stats(states, ctx, keep_states)
    traj.n_loops = n_loops
    if len(traj.state_norm) < n_loops + 1:  # stopped early: pad with NaN
        pad = n_loops + 1 - len(traj.state_norm)
        for name in ("state_norm", "rel_residual", "residual_norm", "total_norm", "total_residual"):
            setattr(traj, name, np.concatenate([getattr(traj, name), np.full(pad, math.nan)]))
    return traj


def measure_trajectory(model, idx: torch.Tensor, n_loops: int, keep_states: bool = True, cost=None) -> Trajectory:
    """Run the loop n_loops times on idx and measure it (states past a non-finite one are not run)."""
    checks.check_int(n_loops, "n_loops", 0)
    ctx = encode_probe(model, idx)
    return trajectory_of(run_loop(model, ctx, n_loops, cost=cost), ctx, n_loops, keep_states)
