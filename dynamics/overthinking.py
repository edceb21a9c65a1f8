"""Loops past the trained depth: does more looping hurt? (docs/design.md §4)

The loss against the loop count T — of the probe itself (`probe_losses`, in the audit) or of
validation batches (`sweep_losses`, `loopdyn sweep-loops`) — and the overthinking rule
(`overthinking`): the loss rises past the trained depth μ by more than `OVERTHINK_TOL`, with the
dynamical reason from the forecast and the token phases when they are known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loopdyn.dynamics.loopmap import Cost, analysis, require_loop
from loopdyn.dynamics.numbers import fmt
from loopdyn.models.errors import InputError
from loopdyn.models.weights import all_finite

OVERTHINK_TOL = 5e-3  # relative rise of the loss past the trained depth that counts as overthinking


@dataclass
class Overthinking:
    """Loss against loop count past the trained depth μ: does more looping hurt, and what is best?

    overthinks: the loss rises past μ — max_{T>μ} L(T) > (1 + tol)·min_{μ≤T'≤T} L(T') (a rise after
    the best loop count at or past μ); best_loops: argmin_T L(T) (the smallest T within tol of the
    minimum); reason: the dynamical reason from the forecast and the phases, when there is one."""

    loops: np.ndarray
    loss: np.ndarray
    mean_loops: int
    overthinks: bool
    best_loops: int
    best_loss: float
    rise: float  # largest relative rise past μ (0 when the loss never rises)
    reason: str = ""
    tol: float = OVERTHINK_TOL
    per_token: object = None  # `loopdyn.dynamics.exits.BestDepth` of the per-token losses, when known

    def summary(self) -> str:
        mu = self.mean_loops
        i_mu = int(np.nonzero(self.loops == mu)[0][0]) if mu in self.loops else None
        at_mu = f"L({mu}) = {self.loss[i_mu]:.4g}, " if i_mu is not None else ""
        head = (f"overthinks: the loss rises {100 * self.rise:.2g}% past the trained depth μ = {mu}"
                if self.overthinks else f"does not overthink: the loss does not rise past the trained depth μ = {mu} "
                                        f"(by more than {100 * self.tol:.2g}%)")
        return (f"{head}; {at_mu}best test-time loop count T = {self.best_loops} (L = {self.best_loss:.4g})"
                + (f"; {self.reason}" if self.reason else "")
                + (f"; per token: {self.per_token.summary()}" if self.per_token is not None else ""))


def overthinking(loops, loss, mean_loops: int, forecast=None, phases=None,
                 tol: float = OVERTHINK_TOL, token_loss=None, token_labels=None) -> Overthinking:
    """Analyse a loss-versus-loops curve (see `Overthinking`); forecast/phases give the reason.
    token_loss (len(loops), M): the per-token losses whose mean is `loss`, with token_labels their
    phase labels: adds the best depth per token with its dynamical reason and the whole probe's
    bootstrap interval (`loopdyn.dynamics.exits.depth`)."""
    loops, loss = np.asarray(loops, int), np.asarray(loss, float)
    fin = np.where(np.isfinite(loss), loss, np.inf)
    best = float(fin.min()) if fin.size else math.nan
    ok = np.nonzero(fin <= best * (1 + tol) if best > 0 else fin <= best + tol)[0]
    best_T = int(loops[ok[0]]) if ok.size else int(loops[0])
    rise = 0.0
    running = math.inf
    for T_, L in zip(loops, fin):
        if T_ < mean_loops:
            continue
        running = min(running, L)
        if running > 0 and math.isfinite(running):
            rise = max(rise, (L - running) / running if math.isfinite(L) else math.inf)
    over = rise > tol
    reason = _overthinking_reason(over, mean_loops, forecast, phases) if forecast is not None else ""
    per_token = None
    if token_loss is not None and np.all(np.isfinite(token_loss)) and np.shape(token_loss)[1] >= 1:
        from loopdyn.dynamics.exits.depth import best_depth_of

        per_token = best_depth_of(token_loss, token_labels, int(mean_loops), tol)
    return Overthinking(loops, loss, int(mean_loops), bool(over), best_T, best, float(rise), reason, tol, per_token)


def target_labels(phases, shape) -> list | None:
    """The phase labels of the tokens that have a target (positions 0..S−2 of each row, the order of
    `probe_losses(per_token=True)`), when `phases` labelled every position of the (B, S) probe."""
    B, S = shape
    if phases is None or len(phases.labels) != B * S:
        return None
    return [phases.labels[b * S + s] for b in range(B) for s in range(S - 1)]


def _overthinking_reason(over: bool, mu: int, f, phases) -> str:
    moving = None
    if phases is not None and len(phases.labels):
        counts = phases.counts()
        top, n = next(iter(counts.items()))
        if top != "fixed point" and n >= 0.5 * len(phases.labels):
            moving = f"{n} of {len(phases.labels)} tokens are {top if top != 'divergent' else 'diverging'}"
    if f.verdict == "explosive":
        where = f"the state leaves the safe region after loop {f.max_safe_loops}" if f.max_safe_loops < f.horizon \
            else "the state grows geometrically"
        return f"dynamical reason: {where} (explosive, decided by {f.decided_by})"
    grow = f.state_norm[-1] / f.state_norm[min(mu, len(f.state_norm)) - 1] if len(f.state_norm) else math.nan
    if f.verdict == "marginal":
        why = moving or f"the state does not settle (marginal; ‖h_{f.horizon}‖/‖h_{mu}‖ = {fmt(grow)})"
        return f"dynamical reason: {why}"
    if over:
        return (f"dynamical reason: none in the state — it converges (stable, settles by loop {f.settle_loops}; "
                f"‖h_{f.horizon}‖/‖h_{mu}‖ = {fmt(grow)}): the readout was trained on the state at depth {mu}, "
                f"not on the fixed point it moves on to")
    return f"the state converges (stable, settles by loop {f.settle_loops}): more loops change little"


def probe_losses(model, idx: torch.Tensor, traj, max_loops: int, cost: Cost | None = None,
                 after: torch.Tensor | None = None, per_token: bool = False):
    """Next-token loss of the probe itself (targets idx[:, 1:]) after T = 1..max_loops loops, from the
    measured states and the loop continued from h_T (from `after` = F(h_T) when it is known);
    None when decode does not give vocabulary logits. per_token: return (mean, per-token losses
    (max_loops, B·(S−1)), batch-major) instead of the mean alone."""
    from loopdyn.dynamics.trajectory import run_loop

    T = traj.n_loops
    if not traj.states or idx.shape[1] < 2:
        return None
    targets = idx[:, 1:]
    out = np.full(max_loops, math.inf)  # loops after a non-finite state stay infinite
    tokens = np.full((max_loops, targets.numel()), math.inf)
    # the measured states, then the loop continued from h_T (stops after a non-finite state)
    continued = []
    if max_loops > T and after is not None:  # h_{T+1} is known
        continued = run_loop(model, traj.ctx, max_loops - T - 1, h0=after, cost=cost)
    elif max_loops > T:
        continued = run_loop(model, traj.ctx, max_loops - T, h0=traj.states[-1], cost=cost)[1:]
    states = traj.states[1:] + continued
    with analysis(model):
        for t, state in enumerate(states[:max_loops], start=1):
            if not all_finite(state):
                break
            logits = model.decode(state, traj.ctx)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[-1] <= int(idx.max()):
                return None
            each = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
            out[t - 1] = float(each.mean())
            if per_token:
                tokens[t - 1] = each.detach().double().cpu().numpy()
    return (out, tokens) if per_token else out


@torch.no_grad()
def sweep_losses(model, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 max_loops: int, on_step: Callable[[], None] | None = None) -> np.ndarray:
    """Mean loss over `batches` at T = 1..max_loops, from one unroll per batch.

    For each batch: ctx = encode(x), h = init_state(ctx), then max_loops times h = step(h),
    loss_T = cross_entropy(decode(h), y). Runs in eval mode (restored afterwards); returns
    an array of shape (max_loops,) (float64).
    """
    require_loop(model)
    if isinstance(max_loops, bool) or not isinstance(max_loops, int) or max_loops < 1:
        raise InputError(f"max_loops must be a positive integer, got {max_loops!r}")
    if not batches:
        raise InputError("no batches to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(max_loops, dtype=torch.float64)
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            ctx = model.encode(x)
            h = model.init_state(ctx)
            per_t = []
            for _ in range(max_loops):
                h = model.step(h, ctx)
                logits = model.decode(h, ctx)
                per_t.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100))
                if on_step is not None:
                    on_step()
            total += torch.stack(per_t).double().cpu()  # one host sync per batch
    finally:
        model.train(was_training)
    return (total / len(batches)).numpy()


def loop_overthinking(model, loops, loss, mean_loops: int, probe: torch.Tensor | None) -> Overthinking:
    """Overthinking of a swept loss (`sweep_losses`); with a probe (1, S), the forecast of the loop to
    the sweep's largest loop count and the probe's phases give the dynamical reason."""
    from loopdyn.dynamics.forecasting import forecast
    from loopdyn.dynamics.phases import token_phases
    from loopdyn.dynamics.trajectory import measure_trajectory

    f = ph = None
    loops = np.asarray(loops)
    mu, N = int(mean_loops), int(loops[-1])
    if probe is not None and N > mu:
        was_training = model.training
        model.eval()
        try:
            f = forecast(model, probe, N, mu, lyapunov_k=0)
            ph = token_phases(measure_trajectory(model, probe, mu).states, f.leading_eigenvalues, f.eigenvalue_source)
        finally:
            model.train(was_training)
    return overthinking(loops, loss, mu, f, ph)


__all__ = ["OVERTHINK_TOL", "Overthinking", "overthinking", "target_labels", "probe_losses", "sweep_losses", "loop_overthinking"]
