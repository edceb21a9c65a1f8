"""What the norm hides: the audit of a loop whose state is renormalised inside every step.

Huginn's sandwich blocks and Ouro's final norm inside the loop give h_{t+1} = N(r_{t+1}) with
r_{t+1} = G(h_t) the *pre-norm* state (`model.pre_norm_state(h, ctx)`, protocol
"state_norm_kind" = "post"). ‖h_t‖ is then pinned by N (RMSNorm with weight w: ‖h‖ ≤ √d·max|w|,
= √d for unit weights), so the post-norm state norm says nothing; the dynamics lives in what N absorbs and in the
direction of h. Measured per loop t = 1..T on a probe batch (means over batch and tokens of
per-token quantities; all norms are token vector 2-norms):

* ``pre_norm[t]``      = ‖r_t‖, the pre-norm state (r_t = G(h_{t−1}));
* ``step_growth[t]``   = ‖r_t‖ / ‖h_{t−1}‖, what one step would multiply the state by without
  the norm (for h ↦ RMSNorm(a·R h) with R orthogonal this is a, exactly);
* ``absorbed_gain[t]`` = ‖r_t‖ / ‖h_t‖, the gain the norm takes out (a, too, since ‖h_t‖ is
  fixed);
* ``pre_norm_rate``    = the fitted geometric rate of ‖r_t‖ over loops (exp of the slope of
  log ‖r_t‖ over the last half of the loops). Bounded (≈ 1) when r depends only on the
  normalised state; > 1 when the carried state itself grows (a "pre"-normalised loop);
* ``jacobian``         = ‖J_t‖₂ of the whole step *through* the norm, J_t = ∂h_{t+1}/∂h_t at the
  measured h_t (Golub–Kahan–Lanczos Ritz value, a lower bound that tightens with `steps`).
  The norm's derivative is (‖w‖/‖r‖)·(I − r̂r̂ᵀ)-like, so it divides out the absorbed gain:
  RMSNorm(a·R h) has ‖J‖₂ = 1 whatever a is;
* ``cycle_distance[p][t]`` = ‖h_t − h_{t−p}‖ / ‖h_t‖ for p = 1..P (P = 4): per token, the
  state has reached a fixed point (p = 1) or a p-cycle when it is below ``tol`` at the last
  loop; a token is *approaching* one when that distance decays geometrically (fitted rate
  ≤ 1 − ``rate_tol`` over the last half of the loops), else it is *not converging*.

Suggested verdict (same meanings as everywhere, docs/design.md §4): ``explosive`` if a state or
pre-norm state is non-finite or the pre-norm state grows geometrically across loops
(``pre_norm_rate`` > 1 + ``rate_tol``); ``stable`` if every token is at or approaching a fixed
point; ``marginal`` otherwise (cycles, tokens that do not converge).

A model without ``pre_norm_state`` is measured with r_t = h_t (the carried state is taken as
the un-normalised quantity, as for a "pre"-normalised loop; ``absorbed_gain`` is then 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from loopdyn.dynamics.jacobian import norm_lower_bound
from loopdyn.dynamics.loopmap import MAX_LOOPS, Cost, DynamicsError, Linearisation, analysis
from loopdyn.dynamics.trajectory import run_loop
from loopdyn.dynamics.numbers import num as _num, nums as _nums, token_norms as _token_norms
from loopdyn.dynamics.verdict import normalised_verdict
from loopdyn.models.protocol import initial_state, require_looped, state_norm_kind
from loopdyn.models import checks
from loopdyn.models.weights import all_finite

PERIODS = 4  # cycle periods p = 1..PERIODS checked per token


def _ratio(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.numpy(), b.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / b, np.nan)


def _mean(x: np.ndarray) -> float:
    """Mean of the finite entries (NaN if none)."""
    x = np.asarray(x, dtype=float)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def _log_slope(y: np.ndarray, axis: int = 0) -> np.ndarray:
    """exp of the least-squares slope of log y along `axis` (a geometric rate per step); NaN
    where fewer than 2 finite positive points."""
    y = np.moveaxis(np.asarray(y, dtype=float), axis, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ly = np.log(y)
    ok = np.isfinite(ly)
    n = ok.sum(0)
    t = np.arange(y.shape[0], dtype=float).reshape((-1,) + (1,) * (y.ndim - 1))
    t = np.broadcast_to(t, y.shape)
    tm = np.where(ok, t, 0).sum(0) / np.maximum(n, 1)
    lm = np.where(ok, ly, 0).sum(0) / np.maximum(n, 1)
    cov = np.where(ok, (t - tm) * (np.where(ok, ly, 0) - lm), 0).sum(0)
    var = np.where(ok, (t - tm) ** 2, 0).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.exp(cov / var)
    return np.where((n >= 2) & (var > 0), rate, np.nan)


@dataclass
class Convergence:
    """Per-token convergence of h_t to a fixed point or a cycle (module docstring)."""

    tol: float
    rate_tol: float
    period: np.ndarray  # (B, S) int: smallest p with distance ≤ tol at the last loop, 0 if none
    approaching: np.ndarray  # (B, S) int: smallest p whose distance decays geometrically, 0 if none
    rate: np.ndarray  # (B, S) fitted decay rate of the relevant distance (NaN if unknown)
    settle_loops: np.ndarray  # (B, S) more loops until the distance is ≤ tol at that rate (0 if there)

    @property
    def n_tokens(self) -> int:
        return int(self.period.size)

    def counts(self) -> dict:
        at = {str(p): int((self.period == p).sum()) for p in range(2, PERIODS + 1)}
        ap = {str(p): int(((self.period == 0) & (self.approaching == p)).sum()) for p in range(1, PERIODS + 1)}
        return {"fixed_point": int((self.period == 1).sum()), "cycle": at, "approaching": ap,
                "not_converging": int(((self.period == 0) & (self.approaching == 0)).sum())}

    @property
    def all_fixed(self) -> bool:
        """Every token at or approaching a fixed point."""
        return bool(np.all((self.period == 1) | ((self.period == 0) & (self.approaching == 1))))

    def to_json(self) -> dict:
        rates = self.rate[np.isfinite(self.rate)]
        settle = self.settle_loops[np.isfinite(self.settle_loops)]
        return {"tol": self.tol, "tokens": self.n_tokens, **self.counts(),
                "contraction_rate_median": _num(np.median(rates)) if rates.size else None,
                "contraction_rate_max": _num(rates.max()) if rates.size else None,
                "settle_loops_max": int(settle.max()) if settle.size else None}


@dataclass
class NormalisedLoop:
    """The normalised-loop audit (module docstring). Arrays are indexed by loop: index t − 1
    holds loop t = 1..T (``jacobian_loops`` lists the loops of ``jacobian_norm``)."""

    state_norm_kind: str
    has_pre_norm: bool
    n_loops: int
    post_norm: np.ndarray  # mean token ‖h_t‖
    pre_norm: np.ndarray  # mean token ‖r_t‖
    step_growth: np.ndarray  # mean token ‖r_t‖/‖h_{t−1}‖
    absorbed_gain: np.ndarray  # mean token ‖r_t‖/‖h_t‖
    pre_norm_rate: float  # fitted geometric rate of mean ‖r_t‖ per loop
    log_gain: float  # mean over loops t ≥ 2 and tokens of log(‖r_t‖/‖h_{t−1}‖)
    jacobian_loops: list[int]
    jacobian_norm: np.ndarray  # ‖J_t‖₂ lower bounds
    jacobian_steps: int
    cycle_distance: np.ndarray  # (PERIODS, T): mean token ‖h_t − h_{t−p}‖/‖h_t‖ (NaN for t < p)
    convergence: Convergence
    nonfinite_at: int | None
    verdict: str
    evidence: str
    cost: Cost = field(default_factory=Cost)
    token_step_growth: np.ndarray | None = field(default=None, repr=False)  # (T, B, S)

    @property
    def loops(self) -> list[int]:
        return list(range(1, self.n_loops + 1))

    @property
    def mean_step_gain(self) -> float:
        """Geometric mean over loops t ≥ 2 and tokens of the per-step gain the norm removes."""
        return math.exp(self.log_gain) if math.isfinite(self.log_gain) else math.nan

    def to_text(self) -> str:
        """Two lines for a terminal report."""
        g = self.step_growth[np.isfinite(self.step_growth)]
        growth = f"{g.min():.3g}–{g.max():.3g}" if g.size else "n/a"
        return (f"normalised state ({self.state_norm_kind}): pre-norm growth per step {growth}, "
                f"pre-norm drift ×{self.pre_norm_rate:.4g}/loop\n"
                f"  {self.verdict}: {self.evidence}")

    def to_json(self) -> dict:
        return {
            "state_norm_kind": self.state_norm_kind,
            "pre_norm_measured": self.has_pre_norm,
            "loops": self.loops,
            "post_norm": _nums(self.post_norm),
            "pre_norm": _nums(self.pre_norm),
            "step_growth": _nums(self.step_growth),
            "absorbed_gain": _nums(self.absorbed_gain),
            "pre_norm_rate": _num(self.pre_norm_rate),
            "mean_step_gain": _num(self.mean_step_gain),
            "jacobian": {"loops": list(self.jacobian_loops), "spectral_norm": _nums(self.jacobian_norm),
                         "method": f"Golub–Kahan–Lanczos, {self.jacobian_steps} steps (lower bound), through the norm"},
            "cycle_distance": {str(p + 1): _nums(self.cycle_distance[p]) for p in range(PERIODS)},
            "convergence": self.convergence.to_json(),
            "nonfinite_at": self.nonfinite_at,
            "verdict": str(self.verdict),
            "evidence": self.evidence,
        }


def run_normalised(model, ctx, n_loops: int, h0: torch.Tensor | None = None, cost: Cost | None = None,
                   seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """States h_0..h_T (`trajectory.run_loop`) and pre-norm states r_1..r_T (r_t =
    pre_norm_state(h_{t−1}); h_t when the model has no pre_norm_state). Stops after the first
    non-finite state."""
    h0 = initial_state(model, ctx, seed) if h0 is None else h0
    states = run_loop(model, ctx, n_loops, h0=h0, cost=cost)
    pre_fn = getattr(model, "pre_norm_state", None)
    if pre_fn is None:
        return states, states[1:]
    with analysis(model):
        pre = [pre_fn(h, ctx) for h in states[:-1]]
    if cost is not None:
        cost.steps += len(pre)
    return states, pre


def convergence(states: list[torch.Tensor], tol: float = 1e-3, rate_tol: float = 1e-2,
                periods: int = PERIODS) -> tuple[Convergence, np.ndarray]:
    """Per-token fixed-point / cycle classification of h_0..h_T (module docstring), and the
    (periods, T) mean distances ‖h_t − h_{t−p}‖/‖h_t‖."""
    checks.check_states(states, "states")
    T = len(states) - 1
    H = torch.stack([s.detach().to(torch.float64) for s in states])  # (T+1, B, S, d)
    norms = torch.linalg.vector_norm(H, dim=-1).clamp_min(1e-300)
    dist = np.full((periods, T) + tuple(H.shape[1:-1]), np.nan)
    for p in range(1, periods + 1):
        if T >= p:
            d = torch.linalg.vector_norm(H[p:] - H[:-p], dim=-1) / norms[p:]
            dist[p - 1, p - 1:] = d.numpy()
    last = dist[:, -1] if T else np.full((periods,) + tuple(H.shape[1:-1]), np.nan)
    shape = last.shape[1:]
    rates = np.full((periods,) + shape, np.nan)  # fitted decay rate of d_p over the last half
    for p in range(1, periods + 1):
        avail = T - p + 1  # loops with a distance for this p
        if avail >= 3:
            rates[p - 1] = _log_slope(dist[p - 1, T - max(3, avail // 2):], axis=0)
    decays = rates <= 1 - rate_tol
    period = np.zeros(shape, dtype=int)
    approaching = np.zeros(shape, dtype=int)
    # in order: (1) at a fixed point, d_1 ≤ tol; (2) approaching one, d_1 decays (whatever d_p
    # does: an oscillating approach has small d_2); (3) in a p-cycle, d_p ≤ tol; (4) approaching
    # a p-cycle, d_p decays and is well below d_1 (an approach to a fixed point has d_p ≈ p·d_1)
    fixed = last[0] <= tol
    period[fixed] = 1
    approaching[~fixed & decays[0]] = 1
    for p in range(2, periods + 1):
        free = (period == 0) & (approaching == 0)
        period[free & (last[p - 1] <= tol)] = p
    for p in range(2, periods + 1):
        free = (period == 0) & (approaching == 0)
        approaching[free & decays[p - 1] & (last[p - 1] < 0.5 * last[0])] = p
    which = np.maximum(period, approaching)  # the distance that decides, per token
    rate = np.take_along_axis(rates, np.maximum(which - 1, 0)[None], 0)[0]
    rate = np.where(which > 0, rate, np.nan)
    d_which = np.take_along_axis(last, np.maximum(which - 1, 0)[None], 0)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.ceil(np.log(tol / d_which) / np.log(rate))
    settle = np.where(period > 0, 0.0, np.where(approaching > 0, need, np.nan))
    mean_dist = dist.reshape(periods, T, -1).mean(-1) if T else np.zeros((periods, 0))  # NaN where t < p
    return Convergence(tol, rate_tol, period, approaching, rate, settle), mean_dist


def jacobian_norms(model, ctx, states: list[torch.Tensor], loops: list[int], steps: int = 6,
                   cost: Cost | None = None, seed: int = 0) -> np.ndarray:
    """‖J_t‖₂ at h_t for t in `loops` (J_t = ∂ step(h)/∂h at h_t, through the norm): a
    Golub–Kahan–Lanczos Ritz value from `steps` steps on J_tᵀ (`jacobian.norm_lower_bound`),
    warm started from the previous loop's top left singular vector."""
    cost = cost if cost is not None else Cost()
    module = model if isinstance(model, nn.Module) else None
    out = np.full(len(loops), np.nan)
    v = torch.randn(states[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for i, t in enumerate(loops):
        h = states[t]
        if not all_finite(h):
            break
        lin = Linearisation(module, ctx, h, cost, fn=lambda x: model.step(x, ctx), w0=v)
        s, v, _, _ = norm_lower_bound(lin, steps)
        out[i] = float(s[0]) if len(s) else math.nan
    return out


def _pick_loops(T: int, limit: int | None) -> list[int]:
    if limit is None or limit >= T:
        return list(range(1, T + 1))
    if limit <= 0:
        return []
    if limit == 1:
        return [T]
    return [int(t) for t in np.unique(np.linspace(1, T, limit).round().astype(int))]


def normalised_loop(model, idx: torch.Tensor | None = None, loops: int | None = None, *, ctx=None,
                    h0: torch.Tensor | None = None, tol: float = 1e-3, rate_tol: float = 1e-2,
                    jacobian_loops: int | None = 8, jacobian_steps: int = 6, seed: int = 0,
                    states: list[torch.Tensor] | None = None, cost: Cost | None = None,
                    pre: list[torch.Tensor] | None = None) -> NormalisedLoop:
    """Measure what the state norm hides (module docstring) on the probe batch `idx` (B, S).

    loops: loops measured (default `model.mean_loops`); h0: the initial state (default the
    model's, drawn with `seed`); jacobian_loops: how many loops (evenly spread, always incl. T)
    get ‖J_t‖₂, None = all, 0 = none (an audit that has its own Jacobian sweep); tol / rate_tol: convergence tolerance (relative distance) and the
    margin below 1 for a decay to count as geometric. An audit that already ran the loop may
    pass `ctx` and `states` (h_0..h_T); the pre-norm states are then recomputed from them, unless it
    passes them too (`pre`: r_1..r_T, read off its own steps).
    """
    require_looped(model)
    kind = state_norm_kind(model)
    cost = cost if cost is not None else Cost()
    T = model.mean_loops if loops is None else loops
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_LOOPS:
        raise DynamicsError(f"loops must be an integer in [1, {MAX_LOOPS}], got {loops!r}")
    if ctx is None:
        if idx is None:
            raise DynamicsError("normalised_loop needs the probe batch idx (or ctx and states)")
        with analysis(model):
            ctx = model.encode(idx)
    has_pre = callable(getattr(model, "pre_norm_state", None))
    if states is None:
        states, pre = run_normalised(model, ctx, T, h0, cost, seed)
    elif pre is not None:
        states, pre = list(states)[: T + 1], list(pre)[:T]
    else:
        states = list(states)[: T + 1]
        with analysis(model):
            pre = [model.pre_norm_state(h, ctx) if has_pre else nxt for h, nxt in zip(states[:-1], states[1:])
                   if all_finite(h)]
        cost.steps += len(pre) if has_pre else 0

    nonfinite_at = next((t for t, h in enumerate(states) if not all_finite(h)), None)
    if nonfinite_at is None:
        nonfinite_at = next((t + 1 for t, r in enumerate(pre) if not all_finite(r)), None)
    n_ok = len(pre) if nonfinite_at is None else max(0, nonfinite_at - 1)
    post_n = np.full(T, np.nan)
    pre_n, growth, absorbed = (np.full(T, np.nan) for _ in range(3))
    tok_growth = np.full((T,) + tuple(states[0].shape[:-1]), np.nan)
    for t in range(1, n_ok + 1):
        hn, hp, rn = _token_norms(states[t]), _token_norms(states[t - 1]), _token_norms(pre[t - 1])
        post_n[t - 1] = float(hn.mean())
        pre_n[t - 1] = float(rn.mean())
        g = _ratio(rn, hp)  # NaN for a zero state (e.g. Huginn's h_0 = 0)
        tok_growth[t - 1] = g
        growth[t - 1] = _mean(g)
        absorbed[t - 1] = _mean(_ratio(rn, hn))
    half = pre_n[max(0, n_ok - max(3, n_ok // 2)):n_ok] if n_ok >= 2 else np.array([])
    pre_rate = float(_log_slope(half)) if half.size >= 2 else math.nan
    # the gain the norm removes per loop, from loop 2 on: h_0 (an embedding, zeros, a random draw)
    # is not a normalised state, so ‖r_1‖/‖h_0‖ says nothing about the loop
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = np.log(tok_growth[1 if n_ok >= 2 else 0:n_ok])
    log_gain = _mean(lg)

    finite_states = states[: (nonfinite_at if nonfinite_at is not None and nonfinite_at <= len(states) else len(states))]
    conv, mean_dist = convergence(finite_states, tol, rate_tol)
    if mean_dist.shape[1] < T:
        mean_dist = np.concatenate([mean_dist, np.full((PERIODS, T - mean_dist.shape[1]), np.nan)], axis=1)

    jl = _pick_loops(T, jacobian_loops)
    if nonfinite_at is None:
        jn = jacobian_norms(model, ctx, states, jl, jacobian_steps, cost, seed)
    else:
        jn = np.full(len(jl), np.nan)

    verdict, evidence = _verdict(nonfinite_at, pre_rate, conv, rate_tol, jl, jn, log_gain)
    return NormalisedLoop(kind, has_pre, T, post_n, pre_n, growth, absorbed, pre_rate, log_gain, jl, jn,
                          jacobian_steps, mean_dist, conv, nonfinite_at, verdict, evidence, cost, tok_growth)


def _verdict(nonfinite_at, pre_rate, conv: Convergence, rate_tol, jl, jn, log_gain) -> tuple[str, str]:
    """The verdict by `verdict.normalised_verdict` (one rule table), with the measured gains as evidence."""
    gain = f"the norm absorbs ×{math.exp(log_gain):.3g} per loop" if math.isfinite(log_gain) else ""
    sig = f"‖J‖₂ through the norm ≈ {jn[-1]:.3g} at loop {jl[-1]}" if len(jn) and np.isfinite(jn[-1]) else ""
    extra = "; ".join(x for x in (gain, sig) if x)
    if nonfinite_at is not None:
        return normalised_verdict(nonfinite_at=nonfinite_at, pre_norm_rate=math.nan, all_fixed=False, cycles=0,
                                  not_converging=0, n_tokens=0)
    c = conv.counts()
    cyc = sum(c["cycle"].values()) + sum(v for k, v in c["approaching"].items() if k != "1")
    verdict, reason = normalised_verdict(nonfinite_at=None, pre_norm_rate=pre_rate, all_fixed=conv.all_fixed,
                                         cycles=cyc, not_converging=c["not_converging"], n_tokens=conv.n_tokens,
                                         settle=conv.to_json()["settle_loops_max"] if conv.all_fixed else None,
                                         rate_tol=rate_tol)
    return verdict, f"{reason}; {extra}"


__all__ = ["NormalisedLoop", "Convergence", "normalised_loop", "run_normalised", "convergence", "jacobian_norms",
           "PERIODS"]
