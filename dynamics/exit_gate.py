"""The exit-gate audit: does a learned per-token exit gate stop where the loop has converged?

A model with `exit_gate(h, ctx)` (Ouro) gives per token the probability λ_t ∈ [0, 1] of
exiting at loop t, read at the state h_t after t loops (t = 1..T). Ouro's exit distribution
over T loops (ouro-checkpoint-format.md §3.5) is

    p_t = λ_t ∏_{j<t} (1 − λ_j)  for t < T,      p_T = ∏_{j<T} (1 − λ_j),

and the threshold rule exits each token at the first loop t whose cumulative exit probability
Σ_{j≤t} p_j ≥ q (else at T). Here it is computed in float64 from the gate's λ by default; the
official code runs it in the checkpoint dtype, where rounding makes confident gates exit
earlier (§8.2): `gate_dtype=torch.bfloat16` reproduces that.

Against that exit loop e we set the loop c from which the token has converged: with the
changes into loop t

    r_t  = ‖h_t − h_{t−1}‖ / ‖h_t‖                      (relative state residual, t ≥ 1)
    KL_t = KL(p(· | h_t) ‖ p(· | h_{t−1}))   (nats)      (next-token distributions by decode, t ≥ 2)

the token has *converged at c* (1 ≤ c < T) when every later change is small, r_t ≤ `residual_tol`
and KL_t ≤ `kl_tol` for all t in c+1..T; a token whose change into loop T is still above either
tolerance has not converged within T (c = None, written 0 in the arrays). Then

* **exits while still changing**: e < T and (c is None or e < c): looping on would still
  change the state or the prediction (`exit_kl_to_final` = KL(p_T ‖ p_e) says by how much);
* **keeps looping after it converged**: c is not None and e > c, wasting e − c loops.

`loopdyn audit --plots` draws exit loop against convergence loop per token
(loopdyn.plots.audit.plot_exit_gate).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from loopdyn.dynamics.loopmap import MAX_LOOPS, Cost, DynamicsError
from loopdyn.dynamics.numbers import num as _num
from loopdyn.models.hooks import silenced
from loopdyn.models.protocol import initial_state, require_looped
from loopdyn.models.weights import all_finite


def _exit_probs(gate, dtype: torch.dtype | None) -> torch.Tensor:
    """p (T, …) in `dtype` (default float64), as the spec computes it: a running product that
    starts from ones, the remainder at the last loop."""
    lam = torch.as_tensor(np.asarray(gate) if not isinstance(gate, torch.Tensor) else gate)
    lam = lam.to(dtype or torch.float64)
    T = lam.shape[0]
    remaining = torch.ones_like(lam[0])
    out = []
    for t in range(T):
        if t < T - 1:
            out.append(lam[t] * remaining)
            remaining = remaining * (1 - lam[t])
        else:
            out.append(remaining)
    return torch.stack(out)


def exit_distribution(gate, dtype: torch.dtype | None = None) -> np.ndarray:
    """Ouro's exit distribution p (T, …) from the gate probabilities λ (T, …) (module
    docstring), computed in `dtype` (default float64) and returned as float64."""
    return _exit_probs(gate, dtype).to(torch.float64).numpy()


def exit_loops(gate, threshold: float, dtype: torch.dtype | None = None) -> np.ndarray:
    """Per token the 1-based loop at which the threshold rule exits: the first t with
    Σ_{j≤t} p_j ≥ threshold, else T. `gate` is λ with loops on axis 0. `dtype` is the
    arithmetic of p and of the cumulative sum (default float64, exact to round-off; pass the
    checkpoint dtype, e.g. torch.bfloat16, to reproduce the official rule with its rounding,
    under which confident gates exit early even at threshold 1.0)."""
    p = _exit_probs(gate, dtype)
    T = p.shape[0]
    hit = (torch.cumsum(p, dim=0) >= threshold).numpy()
    return np.where(hit.any(0), hit.argmax(0) + 1, T).astype(int)


def converged_loops(changes: np.ndarray, tol: np.ndarray | float) -> np.ndarray:
    """Per token the loop c (1 ≤ c < T) after which every change is ≤ tol, 0 if the change into
    the last loop is still above it. `changes` (T, …) holds the change into loop t at index
    t − 1 (NaN = unknown, counted as small only for t = 1)."""
    ch = np.asarray(changes, dtype=float)
    T = ch.shape[0]
    big = ~(ch <= tol)
    big[0] = False  # the change into loop 1 never matters for convergence after loop 1
    # c = the last loop t whose change is big (then converged *at* t); 1 if no change after loop 1 is big
    idx = np.where(big, np.arange(1, T + 1).reshape((-1,) + (1,) * (ch.ndim - 1)), 0).max(0)
    c = np.maximum(idx, 1)
    return np.where(idx == T, 0, c).astype(int)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis from log-probabilities, float64 (nats)."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)


@dataclass
class ExitGateAudit:
    """Per-token exit loops against convergence loops (module docstring). Per-loop arrays are
    indexed t − 1 for loop t = 1..T; per-token arrays are (B, S)."""

    n_loops: int
    threshold: float
    kl_tol: float
    residual_tol: float
    gate: np.ndarray  # (T, B, S) λ_t
    exit_probs: np.ndarray  # (T, B, S) p_t
    exit_loop: np.ndarray  # (B, S) 1..T
    converged_loop: np.ndarray  # (B, S) 1..T−1, 0 = not converged within T (state and prediction)
    converged_loop_state: np.ndarray  # (B, S) by the state residual alone
    converged_loop_kl: np.ndarray  # (B, S) by the KL alone
    rel_residual: np.ndarray  # (T, B, S)
    kl: np.ndarray  # (T, B, S), NaN at t = 1
    exit_kl_to_final: np.ndarray  # (B, S) KL(p_T ‖ p_e)
    gate_dtype: str = "float64"  # arithmetic of the exit rule
    cost: Cost = field(default_factory=Cost)

    @property
    def n_tokens(self) -> int:
        return int(self.exit_loop.size)

    @property
    def exits_while_changing(self) -> np.ndarray:
        """(B, S) bool: exits before T while a later change is above tolerance."""
        e, c = self.exit_loop, self.converged_loop
        return (e < self.n_loops) & ((c == 0) | (e < c))

    @property
    def loops_after_converged(self) -> np.ndarray:
        """(B, S) bool: keeps looping past its convergence loop."""
        return (self.converged_loop > 0) & (self.exit_loop > self.converged_loop)

    @property
    def wasted_loops(self) -> np.ndarray:
        """(B, S) loops run after convergence (0 where none)."""
        return np.where(self.loops_after_converged, self.exit_loop - self.converged_loop, 0)

    def counts(self) -> dict:
        changing = self.exits_while_changing
        return {
            "tokens": self.n_tokens,
            "exit_while_changing": int(changing.sum()),
            "loop_after_converged": int(self.loops_after_converged.sum()),
            "exit_at_convergence": int((self.exit_loop == self.converged_loop).sum()),
            "never_converged": int((self.converged_loop == 0).sum()),
            "exit_at_last_loop": int((self.exit_loop == self.n_loops).sum()),
        }

    def to_text(self) -> str:
        """One line for a terminal report."""
        c = self.counts()
        return (f"exit gate (q = {self.threshold:g}, {self.gate_dtype}): of {c['tokens']} tokens "
                f"{c['exit_while_changing']} exit while still changing, {c['loop_after_converged']} loop on after "
                f"converging (mean {float(self.wasted_loops.mean()):.2g} wasted loops), {c['never_converged']} "
                f"not converged within {self.n_loops} loops")

    def to_json(self) -> dict:
        T = self.n_loops
        hist = lambda a, lo: [int((a == t).sum()) for t in range(lo, T + 1)]  # noqa: E731
        changing = self.exits_while_changing
        return {
            "loops": list(range(1, T + 1)),
            "threshold": self.threshold,
            "gate_dtype": self.gate_dtype,
            "kl_tol": self.kl_tol,
            "residual_tol": self.residual_tol,
            **self.counts(),
            "wasted_loops_mean": _num(self.wasted_loops.mean()) if self.n_tokens else None,
            "exit_kl_to_final_max": _num(self.exit_kl_to_final[changing].max()) if changing.any() else 0.0,
            "exit_histogram": hist(self.exit_loop, 1),  # tokens exiting at loop 1..T
            "converged_histogram": [int((self.converged_loop == 0).sum())] + hist(self.converged_loop, 1)[:-1],
            # index 0: not converged within T; index t: converged at loop t (t = 1..T−1)
            "gate_mean": [_num(x) for x in self.gate.reshape(T, -1).mean(1)],
            "rel_residual_mean": [_num(x) for x in self.rel_residual.reshape(T, -1).mean(1)],
            "kl_mean": [None] + [_num(self.kl[t].mean()) for t in range(1, T)],  # no KL into loop 1
            "tokens_by_position": {"exit_loop": self.exit_loop.tolist(),
                                   "converged_loop": self.converged_loop.tolist()},
        }


def exit_gate_audit(model, idx: torch.Tensor | None = None, loops: int | None = None, *, threshold: float = 0.5,
                    kl_tol: float = 1e-3, residual_tol: float = 1e-3, ctx=None, h0: torch.Tensor | None = None,
                    states: list[torch.Tensor] | None = None, seed: int = 0,
                    gate_dtype: torch.dtype | None = None, cost: Cost | None = None) -> ExitGateAudit:
    """Run the loop T times on `idx` (B, S) (default T = `model.mean_loops`) and compare the
    gate's exit loop with the measured convergence loop per token (module docstring).

    threshold: q of the exit rule (Ouro's released configs use 1.0, which in exact arithmetic
    exits every token at T; q < 1 is the early-exit setting). kl_tol (nats) and residual_tol:
    what counts as "still changing". gate_dtype: the arithmetic of the exit rule (default float64;
    the checkpoint dtype reproduces the official rounding, see `exit_loops`). An audit that already ran the loop may pass `ctx` and
    `states` (h_0..h_T). A model without `exit_gate` raises a one-line DynamicsError.
    """
    require_looped(model)
    gate_fn = getattr(model, "exit_gate", None)
    if not callable(gate_fn):
        raise DynamicsError(f"model '{getattr(model, 'name', type(model).__name__)}' has no exit_gate: "
                            "nothing to audit")
    if not 0.0 < threshold <= 1.0:
        raise DynamicsError(f"threshold must be in (0, 1], got {threshold!r}")
    if not (kl_tol > 0 and residual_tol > 0):
        raise DynamicsError("kl_tol and residual_tol must be > 0")
    T = model.mean_loops if loops is None else loops
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_LOOPS:
        raise DynamicsError(f"loops must be an integer in [1, {MAX_LOOPS}], got {loops!r}")
    cost = cost if cost is not None else Cost()
    quiet = silenced(model)
    with torch.no_grad(), quiet:
        if ctx is None:
            if idx is None:
                raise DynamicsError("exit_gate_audit needs the probe batch idx (or ctx and states)")
            ctx = model.encode(idx)
        if states is None:
            h = initial_state(model, ctx, seed) if h0 is None else h0
            states = [h]
            for _ in range(T):
                h = model.step(h, ctx)
                cost.steps += 1
                states.append(h)
        states = list(states)[: T + 1]
        if len(states) < T + 1:
            raise DynamicsError(f"exit_gate_audit needs {T + 1} states h_0..h_T, got {len(states)}")
        if not all(all_finite(h) for h in states):
            raise DynamicsError("non-finite state in the loop: the exit gate cannot be audited")
        gate_t = torch.stack([gate_fn(h, ctx).detach().cpu() for h in states[1:]])
        gate = gate_t.to(torch.float64).numpy()
        logp = [F.log_softmax(model.decode(h, ctx).detach().to(torch.float64), dim=-1) for h in states[1:]]
    if gate.shape != (T,) + tuple(states[0].shape[:-1]):
        raise DynamicsError(f"exit_gate must return one probability per token, shape "
                            f"{tuple(states[0].shape[:-1])}, got {gate.shape[1:]}")
    if not (np.all(np.isfinite(gate)) and np.all((gate >= 0) & (gate <= 1))):
        raise DynamicsError("exit_gate must return probabilities in [0, 1]")

    H = [h.detach().to(torch.float64) for h in states]
    rel = np.stack([(torch.linalg.vector_norm(H[t] - H[t - 1], dim=-1)
                     / torch.linalg.vector_norm(H[t], dim=-1).clamp_min(1e-300)).cpu().numpy() for t in range(1, T + 1)])
    kl = np.full_like(rel, np.nan)
    for t in range(1, T):
        kl[t] = _kl(logp[t], logp[t - 1]).cpu().numpy()
    e = exit_loops(gate_t if gate_dtype is not None else gate, threshold, gate_dtype)
    c_state = converged_loops(rel, residual_tol)
    c_kl = converged_loops(kl, kl_tol)
    both = np.where((c_state == 0) | (c_kl == 0), 0, np.maximum(c_state, c_kl))
    final = logp[-1]
    lp = torch.stack(logp)  # (T, B, S, V)
    chosen = torch.from_numpy(e - 1)[None, ..., None].expand(1, *e.shape, lp.shape[-1])
    exit_kl = _kl(final, lp.gather(0, chosen)[0]).cpu().numpy()
    return ExitGateAudit(T, float(threshold), float(kl_tol), float(residual_tol), gate,
                         exit_distribution(gate_t if gate_dtype is not None else gate, gate_dtype), e,
                         both, c_state, c_kl, rel, kl, exit_kl, str(gate_dtype or torch.float64).replace("torch.", ""),
                         cost)


__all__ = ["ExitGateAudit", "exit_gate_audit", "exit_distribution", "exit_loops", "converged_loops"]
