"""What every exit criterion, the oracle, the per-loop lens and the best depth read: the loop run
far past its trained depth, measured per loop and per token.

The loop h_{t+1} = step(h_t, ctx) runs from h_0 to h_H (default H = 4 × the trained depth μ).
At every loop t = 1..H, for every token n (batch-major, N = B·S), with p_t = softmax(decode(h_t))
the next-token distribution (all in float64):

    residual_t      = ‖h_t − h_{t−1}‖                       r_t, the state's change into loop t
    rel_residual_t  = ‖h_t − h_{t−1}‖ / ‖h_t‖                (Huginn's latent-diff)
    cosine_t        = 1 − cos(h_t, h_{t−1})                  (1 where either state is zero)
    entropy_t       = −Σ_v p_t(v) log p_t(v)                  nats
    kl_prev_t       = KL(p_t ‖ p_{t−1}),  p_0 = uniform       nats
    minp_kl_prev_t  = the same after min-p filtering (`min_p_filter`)
    argmax_t        = argmax_v p_t(v)
    kl_final_t      = KL(p_H ‖ p_t)                           nats: the cost of reading p_t instead of the
                                                              long-run distribution p_H
    top1_final_t    = argmax p_t == argmax p_H
    loss_t          = −log p_t(target)                        nats, for tokens with a target (the next probe
                                                              token, idx[:, 1:]); NaN for the last position
    gate_t          = exit_gate(h_t) (λ_t, models with a gate; else NaN)

and per token the long-run phase (`loopdyn.dynamics.phases.classify_token` on h_0..h_H: "fixed
point", "cycle k", "quasi-periodic", "drifting", "divergent"); and per loop t ≥ 3 the *online*
phase, the same classification from h_0..h_t alone, with the modulus of its leading DMD
eigenvalue (what the contraction criterion may use at loop t).

Arrays are (H, N), index t − 1 for loop t. Memory: the H + 1 states (on the CPU, in the model's
dtype) while the loop runs, then H·N floats per signal; the H decodes run one loop at a time.

Caveat. All positions loop in parallel (every token attends to the other tokens' states at the
same loop), as in Huginn's prefill and in training; Huginn's token-by-token generation with
early exits lets a token read earlier tokens' cached states from the loop at which they exited
(its `lookup_strategy`), which this analysis does not reproduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from loopdyn.dynamics.loopmap import MAX_LOOPS, Cost, DynamicsError, analysis
from loopdyn.models.protocol import initial_state, require_looped
from loopdyn.models.weights import all_finite

MIN_P = 0.1  # Huginn's minp-kl filter: entries below MIN_P × the top probability are floored
NONCONVERGENT = ("cycle", "quasi-periodic", "drifting", "divergent")  # phase labels that do not settle


def online_phases(X: np.ndarray, eps: float, first: int = 3, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(online_fixed, dmd_rate), each (H, N): per loop t ≥ `first` the phase classification
    (`phases.classify_token`) of the token's states h_0..h_t alone — what a criterion could know
    at loop t — and the modulus of its leading DMD eigenvalue. X: (H+1, N, d) float64. From loop 3
    the DMD has two residual pairs, enough to see a rotation (one pair sees only its projection)."""
    from loopdyn.dynamics.phases import classify_token

    H, N = X.shape[0] - 1, X.shape[1]
    fixed = np.zeros((H, N), dtype=bool)
    rate = np.full((H, N), np.inf)
    for n in range(N):
        if progress is not None:
            progress("online phases", n, N)
        for t in range(first, H + 1):
            label, lam = classify_token(X[: t + 1, n, :], eps)
            fixed[t - 1, n] = label == "fixed point"
            rate[t - 1, n] = abs(lam) if np.isfinite(lam) else np.inf
    return fixed, rate


def min_p_filter(logp: torch.Tensor, min_p: float = MIN_P) -> torch.Tensor:
    """Log of Huginn's min-p filtered distribution: every probability below min_p × the top one is
    set to 1/V, then the whole is renormalised (so the KL between two filtered distributions is
    finite)."""
    p = logp.exp()
    V = p.shape[-1]
    low = p < min_p * p.max(-1, keepdim=True).values
    q = torch.where(low, torch.full_like(p, 1.0 / V), p)
    return (q / q.sum(-1, keepdim=True)).log()


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis from log-probabilities (nats, ≥ 0)."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)


def is_nonconvergent(label: str) -> bool:
    return label.split(" ")[0] in NONCONVERGENT


@dataclass(frozen=True)
class LoopSignals:
    """Per-loop, per-token measurements of the loop run to `horizon` loops (module docstring)."""

    mean_loops: int  # μ, the trained depth
    horizon: int  # H, loops run (the long run)
    shape: tuple  # (B, S) of the probe
    residual: np.ndarray  # (H, N)
    rel_residual: np.ndarray
    cosine: np.ndarray
    state_norm: np.ndarray
    entropy: np.ndarray
    kl_prev: np.ndarray
    minp_kl_prev: np.ndarray
    argmax: np.ndarray  # (H, N) int
    kl_final: np.ndarray
    top1_final: np.ndarray  # (H, N) bool
    loss: np.ndarray  # (H, N), NaN where the token has no target
    gate: np.ndarray  # (H, N) λ_t, NaN without an exit gate
    phases: tuple  # (N,) long-run phase labels
    has_gate: bool = False
    jacobian_rate: np.ndarray | None = None  # (N,) ‖J_nn‖₂ at h_μ, when measured
    online_fixed: np.ndarray | None = None  # (H, N) bool: the phase from h_0..h_t alone is "fixed point"
    dmd_rate: np.ndarray | None = None  # (H, N) |λ| of the leading DMD eigenvalue of r_1..r_t (∞ before loop 3)
    cost: Cost = field(default_factory=Cost, compare=False)

    @property
    def n_tokens(self) -> int:
        return int(self.residual.shape[1])

    @property
    def has_targets(self) -> np.ndarray:
        """(N,) bool: the token has a next token to be scored against."""
        return np.isfinite(self.loss).all(0)

    @property
    def nonconvergent(self) -> np.ndarray:
        """(N,) bool: the long-run phase is a cycle, quasi-periodic, drifting or divergent."""
        return np.array([is_nonconvergent(lab) for lab in self.phases], dtype=bool)

    def period(self) -> np.ndarray:
        """(N,) the cycle period of cycling tokens, 0 for the others."""
        return np.array([int(lab.split()[1]) if lab.startswith("cycle ") else 0 for lab in self.phases])


def loop_signals(model, idx: torch.Tensor, horizon: int | None = None, *, targets: torch.Tensor | None = None,
                 h0: torch.Tensor | None = None, seed: int = 0, jacobian_rate: bool = False,
                 progress=None, cost: Cost | None = None) -> LoopSignals:
    """Run the loop on the probe `idx` (B, S) to `horizon` loops (default 4 × model.mean_loops) and
    measure every signal of the module docstring.

    targets: (B, S) next-token ids for the loss (−100 = none); default idx shifted by one (the
    last position has none). h0: the initial state (default `initial_state(model, ctx, seed)`).
    jacobian_rate: also measure per token ‖J_nn‖₂, the spectral norm of the token's diagonal
    Jacobian block at h_μ (dense blocks, d products per token), for the contraction criterion.
    progress(stage, done, total) is called once per loop.
    """
    require_looped(model)
    mu = int(model.mean_loops)
    H = 4 * mu if horizon is None else horizon
    if isinstance(H, bool) or not isinstance(H, int) or not 2 <= H <= MAX_LOOPS:
        raise DynamicsError(f"the long run must be an integer number of loops in [2, {MAX_LOOPS}], got {horizon!r}")
    if idx.dim() != 2 or idx.numel() == 0:
        raise DynamicsError(f"the probe must be a non-empty (batch, sequence) tensor of token ids, got shape "
                            f"{tuple(idx.shape)}")
    cost = cost if cost is not None else Cost()
    report = progress or (lambda stage, done, total: None)
    B, S = idx.shape
    if targets is None:
        targets = torch.full_like(idx, -100)
        targets[:, :-1] = idx[:, 1:]
    gate_fn = getattr(model, "exit_gate", None)
    gate_fn = gate_fn if callable(gate_fn) else None
    with analysis(model), torch.no_grad():
        ctx = model.encode(idx)
        h = initial_state(model, ctx, seed) if h0 is None else h0
        states = [h.detach().cpu()]
        for t in range(H):
            report("loop", t, H)
            h = model.step(h, ctx)
            cost.steps += 1
            if not all_finite(h):
                raise DynamicsError(f"the state is non-finite after {t + 1} loops: the loop diverges before the "
                                    f"long run ({H} loops); lower the horizon or audit the model")
            states.append(h.detach().cpu())
        report("loop", H, H)
        device = h.device

        def logp_at(t):
            logits = model.decode(states[t].to(device), ctx)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (B, S):
                raise DynamicsError("decode must return logits of shape (batch, sequence, vocabulary)")
            return F.log_softmax(logits.detach().to(torch.float64).cpu(), dim=-1).reshape(B * S, -1)

        final = logp_at(H)
        V = final.shape[-1]
        tgt = targets.reshape(-1).cpu()
        scored = (tgt >= 0) & (tgt < V)
        gather_idx = torch.where(scored, tgt, torch.zeros_like(tgt))[:, None]
        top_final = final.argmax(-1)
        cols = {k: [] for k in ("entropy", "kl_prev", "minp_kl_prev", "argmax", "kl_final", "top1_final", "loss",
                                "gate")}
        prev = torch.full_like(final, -math.log(V))  # p_0 = uniform
        prev_minp = prev
        for t in range(1, H + 1):
            report("decode", t - 1, H)
            lp = final if t == H else logp_at(t)
            minp = min_p_filter(lp)
            cols["entropy"].append(-(lp.exp() * lp).sum(-1))
            cols["kl_prev"].append(kl(lp, prev))
            cols["minp_kl_prev"].append(kl(minp, prev_minp))
            am = lp.argmax(-1)
            cols["argmax"].append(am)
            cols["kl_final"].append(kl(final, lp))
            cols["top1_final"].append(am == top_final)
            loss = -lp.gather(-1, gather_idx)[:, 0]
            cols["loss"].append(torch.where(scored, loss, torch.full_like(loss, math.nan)))
            if gate_fn is not None:
                g = gate_fn(states[t].to(device), ctx).detach().to(torch.float64).cpu().reshape(-1)
                cols["gate"].append(g)
            else:
                cols["gate"].append(torch.full((B * S,), math.nan, dtype=torch.float64))
            prev, prev_minp = lp, minp
        report("decode", H, H)
        rate = None
        if jacobian_rate:
            from loopdyn.dynamics.jacobian import per_token_spectra

            at = states[min(mu, H)].to(device)
            tokens = [(b, s) for b in range(B) for s in range(S)]
            rate = per_token_spectra(model, at, ctx, tokens, cost=cost).spectral_norm
    X = torch.stack(states).to(torch.float64).reshape(H + 1, B * S, -1)  # (H+1, N, d)
    diff = X[1:] - X[:-1]
    rn = torch.linalg.vector_norm(diff, dim=-1)
    hn = torch.linalg.vector_norm(X, dim=-1)
    dot = (X[1:] * X[:-1]).sum(-1)
    denom = hn[1:] * hn[:-1]
    cosine = torch.where(denom > 0, 1 - dot / denom.clamp_min(1e-300), torch.ones_like(dot))
    arr = {k: torch.stack(v).numpy() for k, v in cols.items()}
    gate = arr["gate"]
    if gate_fn is not None and not (np.all(np.isfinite(gate)) and np.all((gate >= 0) & (gate <= 1))):
        raise DynamicsError("exit_gate must return one probability in [0, 1] per token")
    from loopdyn.dynamics.phases import classify_token

    eps = float(torch.finfo(states[-1].dtype).eps) if states[-1].is_floating_point() else 1.2e-7
    Xn = X.numpy()
    phases = tuple(classify_token(Xn[:, n, :], eps)[0] for n in range(B * S))
    online, dmd = online_phases(Xn, eps, progress=report)
    return LoopSignals(mu, H, (B, S), rn.numpy(), (rn / hn[1:].clamp_min(1e-300)).numpy(), cosine.numpy(),
                       hn[1:].numpy(), arr["entropy"], arr["kl_prev"], arr["minp_kl_prev"], arr["argmax"].astype(int),
                       arr["kl_final"], arr["top1_final"].astype(bool), arr["loss"], gate, phases,
                       gate_fn is not None, None if rate is None else np.asarray(rate, float), online, dmd, cost)


__all__ = ["LoopSignals", "loop_signals", "online_phases", "min_p_filter", "kl", "is_nonconvergent", "MIN_P", "NONCONVERGENT"]
