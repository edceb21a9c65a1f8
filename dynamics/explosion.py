"""Explosion forecast: what does the state do as the loop count grows past what was measured?

The loop is run for T measured loops (h_0..h_T on a probe batch); the forecast extends the
state to the horizon H > T and gives a verdict with the meaning of docs/design.md §4.

What is extrapolated. The residual r_t = h_t − h_{t−1} obeys r_{t+1} = F(h_t) − F(h_{t−1})
≈ J_t r_t: it is a tangent vector, so the future state is h_{T+j} = h_T + Σ_{i≤j} r_{T+i} with
the residuals propagated by a linear model. The sum is taken as vectors (per token), so rotating
and sign-flipping modes cancel as they do in the real loop, and fixed points come out right.
Three models, each a linear propagator of residual vectors:

* trajectory (DMD) — a low-rank linear fit of the measured residual sequence: with the snapshot
  matrices X = [r_a … r_{b−1}], Y = [r_{a+1} … r_b] (whole-batch vectors) and the truncated SVD
  X = U Σ Vᵀ (singular values above the round-off of the state's dtype), Ã = Uᵀ Y V Σ⁻¹ and
  r_{b+j} ≈ U Ãʲ Uᵀ r_b (exact dynamic mode decomposition). Exact for any affine loop whose
  residual lives in few modes, whatever their eigenvalues: decaying, growing, rotating
  (complex pairs), sign-flipping (negative real), and sums of them.
* LTI — r_{T+j} = Āʲ r_T with the loop's exact Ā (`linear_part()`, per token, full vectors).
  Skipped, and said so, when the model has no LTI part.
* Jacobian — the linearisation J_T at h_T: r_T propagated in the Krylov space of r_T (Arnoldi,
  H = Vᵀ J_T V, r_{T+j} ≈ V Hʲ Vᵀ r_T, exact for j below the Krylov dimension), and the Arnoldi run
  continued from `n_random` random vectors (orthogonal to everything before), so that a mode r_T
  does not excite is still found: its converged Ritz values (relative residual ≤ 5%, true
  eigenvalues of J_T; unconverged Ritz values of a non-normal J can lie outside its spectrum and
  are not used) enter the model's rate. When the large-state limit of the loop is Ā (below), the
  core's part K = H − Vᵀ(I ⊗ Ā)V is scaled by ‖h_T‖/‖ĥ_{T+j−1}‖ along the prediction (a pre-norm
  sublayer reads its input through a norm, so its Jacobian falls like 1/‖h‖: a growing state
  leaves the core behind).
* measured (fallback) — when no linear model reproduces the past (irregular or strongly nonlinear
  motion), log-linear fits of the measured norms over the last half of the loops: geometric growth
  of ‖h‖ is continued, a cleanly shrinking residual is converging, anything else is irregular motion
  that is not shown to converge (marginal), the state held at ‖h_T‖.

Hindcast (the same for every model). With w = min(3, ⌊(T−1)/2⌋) and t₀ = T − w, each model is
built from what was known at loop t₀ (DMD fitted on r_a..r_{t₀}; Ā applied to r_{t₀}; the
Krylov model of J at h_{t₀}) and propagates r_{t₀} to loops t₀+1..T; its hindcast error is
max_t ‖r̂_t − r_t‖ / max(‖r_t‖, round-off) over those loops. A model *reproduces the past* when
the error is ≤ `HINDCAST_TOL` (0.5).

Selection (one model decides). If the LTI model reproduces the past to `EXACT_HINDCAST`
(1e-3), the loop is its LTI part to measurement precision and that model decides. Otherwise the
candidates are the models that reproduce the past about as well as the best one (error ≤
max(3 × best, 0.05)); among them the one with the most severe verdict decides (a mode the past
cannot show — an invisible unstable mode — is not outvoted by a model that does not know it),
then the lowest error. The curve, the rate, the safe-loop count and the verdict are all that
one model's; the others are listed as evidence.

Each model's rate is the asymptotic growth of its own operator (nats per loop): log ρ(Ā) for
LTI (exact); for DMD the largest log|λ| over the modes r_b excites (amplitude ≥ 1e-3 of the
largest); for the Jacobian model the tail rate of a long propagation (`LONG_RUN` loops) of r_T,
raised to log|λ| of any converged Ritz value above it (round-off excites every mode). A fitted
rate is resolved only to its hindcast error: the unit band of a model with hindcast error e over
w loops is max(UNIT_BAND, e / 4w).

Large-state limit. A loop whose core is sublinear at large states tends to its LTI part there:
with u = s·h_{T−1}, the core's increment c(u) = F(u) − Āu − B̄e − b is compared at s = 10 and
1000 (two loop steps), δ(s) = ‖c(s h) − c(h)‖ / ‖(s − 1) h‖. δ(1000) ≤ 0.05 and falling like
1/s (δ(1000) ≤ 0.1 δ(10)) means the limit is Ā (a pre-norm core: its sublayers see norm(u)).
Then ρ(Ā) > 1 can never be `stable`: the core may hold the state for a while, but a large
enough state grows like ρ(Ā)ᵗ. Conversely, with ρ(Ā) < 1 growth cannot go on forever: a model's
growth past the horizon (without leaving the safe region within it) saturates, `marginal`. A
model whose state is renormalised inside the step (`state_norm_kind` "pre" or "post") has no
large-state growth, and the probe is skipped.

Definitions (documented thresholds):

* safe region: loop t is safe when the state is finite and ‖h_t‖ ≤ explosion_factor · N_ref
  (default 10), N_ref = ‖h_μ‖ the measured state at the trained depth μ = `mean_loops` (the
  deciding model's prediction when μ > T), in `state_norm` units (mean over tokens of
  ‖h_t‖₂); `max_safe_loops` is the largest t ≤ H such that loops 1..t are all safe — a bound: by
  the deciding model and by every other model that reproduces the past, each prediction widened
  by its hindcast error, ×(1 + e)^{j/w} at loop T + j (at most ×`SAFE_WIDEN` = 2);
* unit band: a rate with |rate| ≤ `UNIT_BAND` (2e-3 nats/loop, |λ| within 0.2% of 1) is a mode on
  the unit circle;
* a model's verdict: `explosive` if its state leaves the safe region within the horizon while its
  residual grows (at the crossing the residual exceeds 2× ‖r_T‖: a geometric or transient burst),
  or its rate > UNIT_BAND (geometric growth, also past the horizon); `marginal` if it leaves the
  safe region by drift (the residual does not grow), or |rate| ≤ UNIT_BAND (a mode on the unit
  circle: a cycle, quasi-periodic motion, drift); `stable` if rate < −UNIT_BAND (bounded and
  converging, however slowly; `settle_loops` is the first loop whose predicted relative residual
  is ≤ settle_tol, 1e-2, extrapolated at the model's rate past the horizon);
* non-finite weights or states: `explosive`, decided by "non-finite".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from loopdyn.dynamics.jacobian import arnoldi, ritz_values
from loopdyn.dynamics.loopmap import Cost, Linearisation, analysis, nonfinite_parameters
from loopdyn.dynamics.verdict import (GROWTH_AT_CROSSING, UNIT_BAND, Verdict, large_state_unstable, lti_exit_loop,
                                      loop_verdict, model_verdict)
from loopdyn.models import protocol
from loopdyn.models.weights import all_finite

HINDCAST_TOL = 0.5  # a model reproduces the past when it predicts the measured residual vectors within this
EXACT_HINDCAST = 1e-3  # an LTI hindcast this good means the loop is its LTI part
SELECT_BAND = (3.0, 0.05)  # candidates: hindcast error ≤ max(3 × the best, 0.05)
RATE_FLOOR = -20.0  # nats/loop reported for residuals that vanish
OVERFLOW = 3.0e38  # float32 max: beyond it the real loop is non-finite
LONG_RUN = 2000  # loops the reduced models are run for their asymptotic rate
MODEL_ORDER = {"LTI": 0, "Jacobian": 1, "trajectory": 2}  # preference on exact ties
BAND_PER_ERROR = 4.0  # a fitted rate's unit band is hindcast error / (4 w)
SAFE_WIDEN = 2.0  # the largest factor a prediction is widened by for max_safe_loops (the 2× accuracy target)
TREND_R2 = 0.9  # the measured-norm fallback calls a residual trend geometric above this goodness of fit


# ---- results --------------------------------------------------------------------------------------

@dataclass
class ForecastModel:
    """One residual-propagation model: its prediction for loops T..T+J (index 0 = the measured h_T)."""

    name: str  # "trajectory" (DMD) | "LTI" | "Jacobian"
    total_norm: np.ndarray  # predicted whole-batch ‖ĥ_t‖
    residual: np.ndarray  # predicted whole-batch ‖r̂_t‖
    state_norm: np.ndarray  # predicted mean token ‖ĥ_t‖ (the units of `Forecast.state_norm`)
    rate: float  # asymptotic growth of the model's operator, nats per loop
    eigenvalues: np.ndarray  # the model's leading eigenvalues (complex, by decreasing modulus)
    detail: str  # evidence text
    hindcast_error: float = math.nan  # NaN: nothing to check against
    limit_state: float | None = None  # mean token ‖ĥ_∞‖ when the model converges
    verdict: str = ""  # the model's own verdict (set by `judge`)
    first_unsafe: int | None = None  # first loop this model puts outside the safe region
    safe_bound: int | None = None  # the same for its prediction widened by its hindcast error (max_safe_loops)
    safe_limit: float = math.nan
    settle_loops: int | None = None
    used: bool = True  # reproduces the past (hindcast error ≤ HINDCAST_TOL, or unchecked)
    band: float = UNIT_BAND  # its unit band: max(UNIT_BAND, hindcast error / w) for a fitted rate
    exact_rate: bool = False  # the rate is a known spectral radius (log ρ(Ā)), not a fitted one

    @property
    def tail_rate(self) -> float:  # the name the previous forecast used
        return self.rate

    @property
    def checked(self) -> bool:
        return bool(np.isfinite(self.hindcast_error))


@dataclass
class LargeState:
    """What the loop tends to at large states (module docstring)."""

    limit_is_lti: bool
    spectral_radius: float  # ρ(Ā), NaN without an LTI part
    ratios: tuple = ()  # δ(10), δ(1000)
    text: str = ""

    @property
    def forbids_stable(self) -> bool:
        """The limit is Ā with ρ(Ā) above 1 beyond the unit band: explosive (docs/design.md §4)."""
        return self.limit_is_lti and large_state_unstable(self.spectral_radius)


@dataclass
class Forecast:
    """The forecast of the state norm to `horizon` loops and the verdict (module docstring)."""

    verdict: str  # "stable" | "marginal" | "explosive"
    growth_rate: float  # the deciding model's asymptotic rate, nats per loop
    max_safe_loops: int
    horizon: int
    measured_loops: int
    state_norm: np.ndarray  # loops 1..H: mean token ‖h_t‖ (measured for t ≤ T, predicted after)
    rel_residual: np.ndarray  # loops 1..H, likewise
    safe_limit: float  # the safe bound in state_norm units
    evidence: list[str]  # "kind: text", the deciding one first
    decided_by: str  # "non-finite" | "trajectory" | "LTI" | "Jacobian"
    marginal_rate: float  # the unit band
    explosion_factor: float
    models: list[ForecastModel] = field(default_factory=list, repr=False)
    settle_loops: int | None = None  # stable: the loop by which the relative residual is ≤ settle_tol
    leading_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0, complex), repr=False)
    eigenvalue_source: str = ""  # which model the leading eigenvalues come from
    large_state: LargeState | None = None
    trained_depth: int = 0
    overthinking: object = None  # `Overthinking` of the probe loss past the trained depth, when computed

    @property
    def loops(self) -> list[int]:
        return list(range(1, self.horizon + 1))

    def to_json(self) -> dict:
        """The docs/design.md §7 `forecast` record."""
        return {"verdict": str(self.verdict), "growth_rate": float(self.growth_rate),
                "max_safe_loops": int(self.max_safe_loops), "loops": self.loops,
                "state_norm": [float(x) for x in self.state_norm],
                "measured_loops": int(self.measured_loops), "evidence": list(self.evidence)}


# ---- small helpers --------------------------------------------------------------------------------

def _loops(n: int) -> str:
    return f"{n} loop" if n == 1 else f"{n} loops"


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, complex):
        return f"{x.real:.3g}{x.imag:+.3g}i" if abs(x.imag) > 1e-12 else _fmt(x.real)
    if not np.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "n/a")
    return f"{x:.3g}"


def _tail_rate(residual: np.ndarray) -> float:
    """Per-loop log growth of a residual curve over its last quarter (at least one loop)."""
    J = len(residual) - 1
    if J < 1:
        return math.nan
    w = max(1, J // 4)
    a, b = residual[J - w], residual[J]
    if not np.isfinite(b):
        return math.inf
    if not np.isfinite(a):
        return RATE_FLOOR
    if b <= 0 or a <= 0:
        return RATE_FLOOR
    return max((math.log(b) - math.log(a)) / w, RATE_FLOOR)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(tokens, ds) float64 view of a state."""
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


class _Norms:
    """Norms of h + Σ_i y_i V_i (V orthonormal, k × tokens × ds) from per-token Gram data, so a
    prediction in k coordinates gives exact per-token norms at O(tokens · k²) per loop."""

    def __init__(self, V: torch.Tensor, h: torch.Tensor):
        self.h2 = (h * h).sum(-1)  # (tokens,)
        self.c = torch.einsum("ksd,sd->sk", V, h)  # (tokens, k)
        self.G = torch.einsum("ksd,lsd->skl", V, V)  # (tokens, k, k)
        self.c_total = self.c.sum(0).numpy()
        self.N0 = float(self.h2.sum().sqrt())

    def __call__(self, y: np.ndarray) -> tuple[float, float]:
        """(whole-batch norm, mean token norm)."""
        ny = float(np.linalg.norm(y))
        if not math.isfinite(ny) or ny > 1e150:
            return math.inf, math.inf
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
        tok2 = self.h2 + 2 * (self.c @ yt) + torch.einsum("skl,k,l->s", self.G, yt, yt)
        tok2 = tok2.clamp_min(0)
        return float(tok2.sum().sqrt()), float(tok2.sqrt().mean())

    def total(self, y: np.ndarray) -> float:
        ny = float(np.linalg.norm(y))
        if not math.isfinite(ny) or ny > 1e150:
            return math.inf
        return math.sqrt(max(self.N0 ** 2 + 2 * float(self.c_total @ y) + ny * ny, 0.0))


@dataclass
class _Data:
    """The measured loops in float64: token rows of h_t and r_t, and the round-off scale."""

    T: int
    h: list  # (tokens, ds) float64, t = 0..T
    eps: float  # machine epsilon of the state's dtype

    def r(self, t: int) -> torch.Tensor:
        return self.h[t] - self.h[t - 1]

    def floor(self, t: int) -> float:
        """A residual at or below this (whole-batch) is round-off of the state at loop t."""
        return 100.0 * self.eps * float(self.h[t].norm())

    def hindcast_window(self) -> int:
        return hindcast_window(self.T)


def hindcast_window(T: int) -> int:
    """w: every model is built from what was known at loop T − w and scored on loops T − w + 1..T."""
    return min(3, (T - 1) // 2)


def forecast_loops(T: int) -> list[int]:
    """The measured loops at which `forecast_from` linearises the step: T, and T − w for the
    Jacobian model's hindcast. An audit that already linearised them passes them in."""
    w = hindcast_window(T)
    return [T] + ([T - w] if w >= 1 and T - w >= 1 else [])


def _rel_error(pred: torch.Tensor, true: torch.Tensor, floor: float) -> float:
    return float((pred - true).norm()) / max(float(true.norm()), floor, 1e-300)


# ---- the reduced models (DMD and Jacobian share the propagation) ----------------------------------

def _propagate(z0: np.ndarray, step, norms: _Norms, J: int):
    """Run z_{j+1} = step(z_j, ‖ĥ_{T+j}‖) for J loops; returns whole-batch norms, mean token norms and
    residual norms (index 0 = loop T) and the coordinates y_j = Σ z of ĥ − h_T."""
    total, tok, res = np.empty(J + 1), np.empty(J + 1), np.empty(J + 1)
    y = np.zeros_like(z0)
    total[0], tok[0] = norms(y)
    res[0] = float(np.linalg.norm(z0))
    z = z0
    with np.errstate(over="ignore", invalid="ignore"):
        for j in range(1, J + 1):
            z = step(z, total[j - 1])
            y = y + z
            res[j] = float(np.linalg.norm(z))
            total[j], tok[j] = norms(y)
            if not (math.isfinite(total[j]) and math.isfinite(res[j])):
                total[j:], tok[j:], res[j:] = math.inf, math.inf, math.inf
                break
    return total, tok, res, y


def _long_rate(z0: np.ndarray, step, norms: _Norms, loops: int = LONG_RUN) -> tuple[float, float | None]:
    """Asymptotic rate of a reduced propagation (tail of the residual over `loops` loops) and the
    limit of the whole-batch norm when it converges."""
    z, y = z0, np.zeros_like(z0)
    res = np.empty(loops + 1)
    res[0] = float(np.linalg.norm(z0))
    N = norms.total(y)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for j in range(1, loops + 1):
            z = step(z, N)
            y = y + z
            res[j] = float(np.linalg.norm(z))
            N = norms.total(y)
            if not math.isfinite(res[j]) or res[j] > 1e200:
                return math.inf, None
            if res[j] < 1e-250:
                return RATE_FLOOR, N
    rate = _tail_rate(res)
    return rate, (N if rate < 0 and math.isfinite(N) else None)


def _dmd(R: list[torch.Tensor], floor: float):
    """Exact DMD of the snapshots R = [r_a … r_b] (flat float64): (U (k, N) orthonormal rows, Ã (k × k))
    or None when no direction is above round-off."""
    if len(R) < 2:
        return None
    X, Y = torch.stack(R[:-1]), torch.stack(R[1:])
    Ux, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = int((S > max(floor, 1e-13 * float(S[0]))).sum())
    if keep == 0:
        return None
    Ux, S, Vh = Ux[:, :keep], S[:keep], Vh[:keep]
    A = ((Y @ Vh.T).T @ Ux) / S[None, :]
    return Vh, A.numpy()


def _modes(A: np.ndarray, z0: np.ndarray, rel_amplitude: float = 1e-3):
    """Eigenvalues of A sorted by modulus, and those the start z0 excites (amplitude ≥ rel × the largest)."""
    lam, W = np.linalg.eig(A)
    b = np.linalg.lstsq(W, z0.astype(complex), rcond=None)[0]
    amp = np.abs(b) * np.linalg.norm(W, axis=0)
    excited = lam[amp >= rel_amplitude * max(float(amp.max()), 1e-300)] if amp.size else lam
    order = np.argsort(-np.abs(lam), kind="stable")
    return lam[order], excited


def trajectory_model(data: _Data, J: int) -> ForecastModel | None:
    """DMD on the measured residual vectors (module docstring), hindcast from loop T − w."""
    T = data.T
    if T < 2:
        return None
    shape = data.h[T].shape
    w = data.hindcast_window()

    def fit(b: int):
        a = max(1, b - 24)
        return _dmd([data.r(t).reshape(-1) for t in range(a, b + 1)], 20 * data.eps * float(data.h[b].norm())), a

    r_T = data.r(T)
    if float(r_T.norm()) <= data.floor(T):
        N0 = float(data.h[T].norm())
        tok0 = float(data.h[T].norm(dim=-1).mean())
        return ForecastModel("trajectory", np.full(J + 1, N0), np.zeros(J + 1), np.full(J + 1, tok0), RATE_FLOOR,
                             np.zeros(0, complex), f"the residual is at round-off by loop {T}: converged",
                             limit_state=tok0)
    fitted = fit(T)
    if fitted is None or fitted[0] is None:
        return None
    (U, A), a = fitted
    k = A.shape[0]
    norms = _Norms(U.reshape(k, *shape), data.h[T])
    z0 = (U @ r_T.reshape(-1)).numpy()
    total, tok, res, _ = _propagate(z0, lambda z, _N: A @ z, norms, J)
    lam, excited = _modes(A, z0)
    rate = float(np.log(np.abs(excited).max())) if excited.size and np.abs(excited).max() > 0 else RATE_FLOOR
    limit = None
    if rate < -UNIT_BAND and np.all(np.abs(lam) < 1):
        y_inf = np.linalg.solve(np.eye(k) - A, A @ z0)  # Σ_{j≥1} Ãʲ z0
        limit = norms(y_inf)[1]
    # hindcast: the same fit on r_a..r_t0, propagated to T
    hind = math.nan
    t0 = T - w
    if w >= 1 and t0 >= 2:
        f0, _ = fit(t0)
        if f0 is not None:
            U0, A0 = f0
            z = (U0 @ data.r(t0).reshape(-1)).numpy()
            errs = []
            for t in range(t0 + 1, T + 1):
                z = A0 @ z
                pred = (U0.T @ torch.from_numpy(z)).reshape(shape)
                errs.append(_rel_error(pred, data.r(t), data.floor(t)))
            hind = max(errs)
    top = lam[0] if lam.size else 0
    detail = (f"DMD of the measured residual vectors r_{a}..r_{T} (rank {k}): leading eigenvalue {_fmt(complex(top))} "
              f"(|λ| {_fmt(abs(top))}), excited modes up to |λ| {_fmt(math.exp(rate))}")
    return ForecastModel("trajectory", total, res, tok, rate, lam, detail, hind, limit)


def lti_model(part, data: _Data, J: int, eigenvalues: np.ndarray | None = None,
              max_flops: float = 4e9) -> ForecastModel | None:
    """r_{T+j} = Āʲ r_T per token with the exact Ā (module docstring); tokens are subsampled evenly
    when propagating all of them would cost more than max_flops."""
    T = data.T
    if part is None or T < 1 or not part.A.is_finite():
        return None
    A = part.A
    n_tok, ds = data.h[T].shape
    per_token = (ds if A.normal else ds * ds) * 2.0 * max(J + 3, 1)
    keep = max(1, min(n_tok, int(max_flops / per_token)))
    sel = torch.linspace(0, n_tok - 1, keep).round().long() if keep < n_tok else slice(None)
    h = data.h[T][sel]
    r = data.r(T)[sel]
    scale = float(data.h[T].norm()) / max(float(h.norm()), 1e-300)
    tok_scale = float(data.h[T].norm(dim=-1).mean()) / max(float(h.norm(dim=-1).mean()), 1e-300)
    r_scale = float(data.r(T).norm()) / max(float(r.norm()), 1e-300)
    total, tok, res = np.empty(J + 1), np.empty(J + 1), np.empty(J + 1)
    total[0], tok[0], res[0] = float(data.h[T].norm()), float(data.h[T].norm(dim=-1).mean()), float(data.r(T).norm())
    cum = torch.zeros_like(h)
    for j in range(1, J + 1):
        r = A.apply(r).to(torch.float64)
        cum = cum + r
        res[j] = float(r.norm()) * r_scale
        total[j] = float((h + cum).norm()) * scale
        tok[j] = float((h + cum).norm(dim=-1).mean()) * tok_scale
        if not (math.isfinite(total[j]) and total[j] < 1e300):
            total[j:], tok[j:], res[j:] = math.inf, math.inf, math.inf
            break
    rho = float(A.radius())
    rate = math.log(rho) if rho > 0 else RATE_FLOOR
    lam = np.asarray(A.eigenvalues() if eigenvalues is None else eigenvalues)[:16]
    limit = None
    if rho < 1:
        tail = A.shifted_solve(A.apply(data.r(T)[sel]).to(torch.float64))
        if tail is not None:
            limit = float((h + tail).norm(dim=-1).mean()) * tok_scale
    # hindcast: r_{t0} propagated with Ā to T
    hind = math.nan
    w = data.hindcast_window()
    t0 = T - w
    if w >= 1 and t0 >= 1:
        r0 = data.r(t0)[sel]
        errs = []
        for t in range(t0 + 1, T + 1):
            r0 = A.apply(r0).to(torch.float64)
            errs.append(_rel_error(r0, data.r(t)[sel], data.floor(t) / max(scale, 1e-300)))
        hind = max(errs)
    nrm = A.norm()
    detail = f"ρ(Ā) {_fmt(rho)}, ‖Ā‖₂ {_fmt(nrm)} ({A.kind} Ā, {'normal' if A.normal else 'possibly non-normal'})"
    out = ForecastModel("LTI", total, res, tok, rate, lam, detail, hind, limit)
    out.exact_rate = True
    return out


def measured_model(traj, J: int) -> ForecastModel | None:
    """The fallback when no linear model reproduces the past (irregular, strongly nonlinear motion):
    log-linear fits over the last half of the measured loops. The state norm growing geometrically
    (R² ≥ TREND_R2 and by ≥ 2× over the window) is continued at that rate; the residual shrinking
    geometrically (R² ≥ TREND_R2 and by ≥ 4×) is converging, the state held at ‖h_T‖; anything else is
    irregular motion that is not shown to converge (rate 0), the state held at ‖h_T‖."""
    T = traj.n_loops
    R, N, S = traj.total_residual, traj.total_norm, traj.state_norm
    tail = [t for t in range(max(1, T - max(3, T // 2)), T + 1) if np.isfinite(R[t]) and R[t] > 0]
    if len(tail) < 3:
        return None

    def fit(v):
        x, y = np.array(tail, float), np.log([v[t] for t in tail])
        slope, icpt = np.polyfit(x, y, 1)
        ss = float(((y - y.mean()) ** 2).sum())
        return float(slope), (1 - float(((y - (slope * x + icpt)) ** 2).sum()) / ss if ss > 0 else 1.0)

    sn, r2n = fit(N)
    sr, r2r = fit(R)
    j = np.arange(J + 1, dtype=float)
    if r2n >= TREND_R2 and sn > UNIT_BAND and N[T] >= 2 * N[tail[0]]:
        rate, kind = sn, f"the state norm grows geometrically ({_fmt(math.exp(sn))}/loop, R² {_fmt(r2n)})"
        with np.errstate(over="ignore"):
            total = N[T] * np.exp(sn * j)
            res = R[T] * np.exp(sn * j)
    else:
        conv = r2r >= TREND_R2 and sr < -UNIT_BAND and R[tail[0]] >= 4 * R[T]
        rate = sr if conv else 0.0
        kind = (f"the residual shrinks geometrically ({_fmt(math.exp(sr))}/loop, R² {_fmt(r2r)})" if conv else
                f"no clean geometric trend (residual {_fmt(math.exp(sr))}/loop, R² {_fmt(r2r)}; state "
                f"{_fmt(math.exp(sn))}/loop): irregular, not shown to converge")
        total = np.full(J + 1, N[T])
        res = R[T] * np.exp(rate * j)
    tok = total * (S[T] / N[T] if N[T] > 0 else 1.0)
    detail = f"measured norms over loops {tail[0]}-{T}: {kind}"
    return ForecastModel("measured", total, res, tok, rate, np.zeros(0, complex), detail)


# ---- Krylov spaces of the Jacobian -----------------------------------------------------------------

@dataclass
class KrylovResult:
    """Arnoldi on the frozen Jacobian J_T from r_T (used by the audit's Jacobian sweep)."""

    H: np.ndarray  # m × m Hessenberg (square part)
    beta: float  # ‖r_T‖
    c: np.ndarray  # V_mᵀ h_T
    ritz: np.ndarray  # eigenvalues of H, by decreasing modulus
    exact: bool  # an invariant subspace was found
    products: int
    basis: list = field(default_factory=list, repr=False)  # q_0..q_m (float64 tensors)

    def head(self, steps: int) -> "KrylovResult":
        """The result of the first `steps` steps of this run: exactly what a `steps`-step run from
        the same vector gives (step j of Arnoldi only uses q_0..q_j), without its products."""
        m = self.H.shape[1]
        if steps >= m:
            return self
        Hbar = self.Hbar[: steps + 1, : steps]
        H = Hbar[:steps, :steps]
        out = KrylovResult(H, self.beta, self.c[:steps], ritz_values(H), False, steps, self.basis[: steps + 1])
        out.Hbar = Hbar
        return out

    def first_image(self) -> torch.Tensor | None:
        """J r_T reconstructed from the first Arnoldi column: ‖r‖(H₀₀ q₀ + H₁₀ q₁)."""
        if not self.basis or self.H.shape[1] == 0:
            return None
        out = self.Hbar[0, 0] * self.basis[0]
        if self.Hbar.shape[0] > 1 and len(self.basis) > 1:
            out = out + self.Hbar[1, 0] * self.basis[1]
        return self.beta * out


def krylov_at(lin: Linearisation, h_T: torch.Tensor, r_T: torch.Tensor, steps: int) -> KrylovResult:
    """`steps` Arnoldi steps on J (the linearisation at h_T) from r_T."""
    Hbar, Q, beta = arnoldi(lambda v: lin.jvp(v.to(h_T.dtype)), r_T.to(torch.float64), steps)
    m = Hbar.shape[1]
    exact = Hbar.shape[0] == m
    H = Hbar[:m, :m]
    hT = h_T.to(torch.float64)
    c = np.array([float((q * hT).sum()) for q in Q[:m]])
    res = KrylovResult(H, beta, c, ritz_values(H) if m else np.array([0j]), exact, m, Q)
    res.Hbar = Hbar
    return res


def lti_projection(kry, A) -> np.ndarray | None:
    """Vᵀ (I ⊗ Ā) V on a Krylov basis (KrylovResult or Subspace), the LTI part of J seen there."""
    if isinstance(kry, Subspace):
        AV = A.apply(kry.V).to(torch.float64).reshape(kry.n, -1)
        return (kry.V.reshape(kry.n, -1) @ AV.T).numpy()
    m = kry.H.shape[0]
    if len(kry.basis) < m:
        return None
    Q = kry.basis[:m]
    AQ = [A.apply(q).to(torch.float64) for q in Q]
    return np.array([[float((Q[i] * AQ[j]).sum()) for j in range(m)] for i in range(m)])


@dataclass
class Subspace:
    """An orthonormal basis V (n × state shape) with its images J V, and H = Vᵀ J V."""

    V: torch.Tensor
    JV: torch.Tensor
    H: np.ndarray
    products: int
    from_r: int  # how many basis vectors come from the Krylov space of r

    @property
    def n(self) -> int:
        return int(self.V.shape[0])

    def head(self, k: int) -> "Subspace":
        """The first k basis vectors (the Krylov space of r alone when k = from_r)."""
        return Subspace(self.V[:k], self.JV[:k], self.H[:k, :k], self.products, min(k, self.from_r))

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values by decreasing modulus, their relative residuals ‖J V y − λ V y‖/|λ| (exact, from
        the stored images) and the coordinate vectors y (columns)."""
        if self.n == 0 or not np.all(np.isfinite(self.H)):
            return np.zeros(0, complex), np.zeros(0), np.zeros((self.n, 0), complex)
        lam, Y = np.linalg.eig(self.H)
        order = np.argsort(-np.abs(lam), kind="stable")
        lam, Y = lam[order], Y[:, order]
        Vf, JVf = self.V.reshape(self.n, -1), self.JV.reshape(self.n, -1)
        res = np.empty(len(lam))
        for i, (l, y) in enumerate(zip(lam, Y.T)):
            yr, yi = torch.from_numpy(y.real.copy()), torch.from_numpy(y.imag.copy())
            re = JVf.T @ yr - (l.real * (Vf.T @ yr) - l.imag * (Vf.T @ yi))
            im = JVf.T @ yi - (l.real * (Vf.T @ yi) + l.imag * (Vf.T @ yr))
            res[i] = math.sqrt(float(re.norm()) ** 2 + float(im.norm()) ** 2) / max(abs(l), 1e-300)
        return lam, res, Y


def jacobian_subspace(lin: Linearisation, r: torch.Tensor, steps: int, n_random: int = 2,
                      random_steps: int = 4, seed: int = 0, krylov: KrylovResult | None = None) -> Subspace:
    """Arnoldi on J from r (or the given KrylovResult's basis), continued from `n_random` random
    vectors for `random_steps` steps each, every new vector orthogonal to all before."""
    dtype = torch.float64
    V: list[torch.Tensor] = []
    JV: list[torch.Tensor] = []
    products = 0
    if krylov is not None and krylov.basis and krylov.H.shape[1]:  # the same run, done before
        m = krylov.H.shape[1]
        Q = krylov.basis
        Hbar = krylov.Hbar
        for i in range(m):
            V.append(Q[i].to(dtype))
            JV.append(sum(float(Hbar[k, i]) * Q[k].to(dtype) for k in range(min(Hbar.shape[0], len(Q)))))
        extra = [Q[m].to(dtype)] if len(Q) > m else []
    else:
        Hbar, Q, beta = arnoldi(lambda v: lin.jvp(v.to(lin.h.dtype)), r.to(dtype), steps) if steps > 0 \
            else (np.zeros((1, 0)), [], 0.0)
        m = Hbar.shape[1]
        products += m
        for i in range(m):
            V.append(Q[i])
            JV.append(sum(float(Hbar[k, i]) * Q[k] for k in range(min(Hbar.shape[0], len(Q)))))
        extra = Q[m:m + 1]
    from_r = len(V)

    def orth(x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            for q in V + extra:
                x = x - (q * x).sum() * q
        return x

    g = torch.Generator().manual_seed(seed)
    shape = lin.h.shape
    for _ in range(n_random):
        x = torch.randn(shape, generator=g, dtype=dtype).to(lin.h.device)
        for _ in range(random_steps):
            before = float(x.norm())
            x = orth(x)
            nx = float(x.norm())
            if not math.isfinite(nx) or nx <= 1e-10 * before:  # the space is exhausted
                break
            x = x / nx
            y = lin.jvp(x).to(dtype)
            products += 1
            if not all_finite(y):
                break
            V.append(x)
            JV.append(y)
            x = y.clone()
    if not V:
        empty = torch.zeros((0, *shape), dtype=dtype)
        return Subspace(empty, empty.clone(), np.zeros((0, 0)), products, 0)
    Vt, JVt = torch.stack(V), torch.stack(JV)
    n = Vt.shape[0]
    H = (Vt.reshape(n, -1) @ JVt.reshape(n, -1).T).numpy()
    return Subspace(Vt, JVt, H, products, from_r)


def _jacobian_propagator(sub: Subspace, HL: np.ndarray | None, N0: float):
    """z ↦ H z (frozen), or z ↦ (H_L + s K) z with s = min(N0/‖ĥ‖, 10) (pre-norm core, module docstring)."""
    if HL is None:
        return lambda z, _N: sub.H @ z
    K = sub.H - HL

    def step(z, N):
        s = min(N0 / max(N, 1e-300), 10.0)
        return HL @ z + s * (K @ z)
    return step


def jacobian_model(sub: Subspace, sub0: Subspace | None, data: _Data, J: int, HL: np.ndarray | None,
                   HL0: np.ndarray | None, sigma: float | None = None, rho_A: float = math.nan) -> ForecastModel | None:
    """Propagate r_T in the Krylov space of r_T under J_T (module docstring); `sub0` at h_{T−w} gives
    the hindcast. The random-start part of `sub` only contributes converged Ritz values (relative
    residual ≤ 0.05: eigenvalues of J_T): a Galerkin projection of a non-normal J can have Ritz
    values outside its spectrum, so unconverged ones are not evidence.

    Rate: the tail rate of a long propagation of r_T, raised to log|λ| of any converged Ritz value
    outside it. With the pre-norm scaling (HL given), growth leaves the core behind: the rate is then
    log ρ(Ā) when ρ(Ā) ≥ 1; when ρ(Ā) < 1 large states contract, and the rate is that of the scaled
    propagation of r_T if it converges, else 0 (bounded, not shown to converge)."""
    T = data.T
    if sub.n == 0 or not np.all(np.isfinite(sub.H)):
        return None
    shape = data.h[T].shape
    k = max(sub.from_r, 1)
    core = sub.head(k)
    norms = _Norms(core.V.reshape(k, *shape), data.h[T])
    z0 = (core.V.reshape(k, -1) @ data.r(T).reshape(-1)).numpy()
    HLk = None if HL is None else HL[:k, :k]
    step = _jacobian_propagator(core, HLk, norms.N0)
    total, tok, res, _ = _propagate(z0, step, norms, J)
    rate_prop, limit_total = _long_rate(z0, step, norms)
    lam, ritz_res, _ = sub.ritz()
    conv = [i for i in range(len(lam)) if ritz_res[i] <= 0.05]
    rho_conv = float(np.abs(lam[conv]).max()) if conv else math.nan
    rate = rate_prop
    if conv and math.log(max(rho_conv, 1e-300)) > rate:
        rate = math.log(max(rho_conv, 1e-300))
    exact = False
    if HL is not None and rate > UNIT_BAND:
        if rho_A >= 1:
            rate, exact = math.log(rho_A), True
        else:
            rate = rate_prop if rate_prop < -UNIT_BAND else 0.0
    limit = None
    if limit_total is not None and rate < -UNIT_BAND:
        limit = limit_total * (tok[0] / total[0] if total[0] > 0 else 1.0)
    hind = math.nan
    if sub0 is not None and sub0.n and np.all(np.isfinite(sub0.H)):
        w = data.hindcast_window()
        t0 = T - w
        k0 = max(sub0.from_r, 1)
        c0 = sub0.head(k0)
        V0 = c0.V.reshape(k0, -1)
        z = (V0 @ data.r(t0).reshape(-1)).numpy()
        norms0 = _Norms(c0.V.reshape(k0, *shape), data.h[t0])
        step0 = _jacobian_propagator(c0, None if HL0 is None else HL0[:k0, :k0], norms0.N0)
        errs, y = [], np.zeros_like(z)
        for t in range(t0 + 1, T + 1):
            z = step0(z, norms0.total(y))
            y = y + z
            pred = (V0.T @ torch.from_numpy(z)).reshape(shape)
            errs.append(_rel_error(pred, data.r(t), data.floor(t)))
        hind = max(errs)
    lead = lam[conv] if conv else lam
    sig = "" if sigma is None else f"‖J_T‖₂ ≥ {_fmt(sigma)}, "
    detail = (f"{sig}J_T on the Krylov space of r_T ({k} vectors) and of {sub.n - sub.from_r} vectors from "
              f"random starts ({sub.products} products): "
              + (f"converged Ritz values up to |λ| {_fmt(rho_conv)}" if conv else
                 f"no converged Ritz value (largest Ritz |λ| {_fmt(float(np.abs(lam[0])) if lam.size else math.nan)})")
              + ("; the core part scaled by ‖h_T‖/‖h_t‖ (its Jacobian falls like 1/‖h‖)" if HL is not None else ""))
    out = ForecastModel("Jacobian", total, res, tok, rate, np.asarray(lead), detail, hind, limit)
    out.exact_rate = exact
    return out


# ---- the large-state limit --------------------------------------------------------------------------

def large_state_limit(model, ctx, h: torch.Tensor, h_next: torch.Tensor, part, cost: Cost | None = None,
                      scales=(10.0, 1000.0)) -> LargeState:
    """Does the loop tend to its LTI part at large states? (module docstring; two loop steps).
    h is a measured state and h_next = F(h) the next one."""
    if part is None:
        return LargeState(False, math.nan, (), "no LTI part (the model has no linear_part()): the large-state "
                                                "limit is not known and the LTI model is skipped")
    rho = float(part.A.radius()) if part.A.is_finite() else math.nan
    kind = protocol.state_norm_kind(model)
    if kind != "none":
        return LargeState(False, rho, (), f"the state is renormalised inside the step (state_norm_kind "
                                          f"'{kind}'): ‖h‖ cannot grow without bound")
    if not part.A.is_finite():
        return LargeState(False, rho, (), "Ā is not finite")
    ratios = []
    with analysis(model):
        base = h_next.to(torch.float64) - part.A.apply(h.to(torch.float64))  # c(h) + B̄e + b
        for s in scales:
            x = (s * h).to(h.dtype)
            y = model.step(x, ctx)
            if cost is not None:
                cost.steps += 1
            if not all_finite(y):
                ratios.append(math.inf)
                continue
            c = y.to(torch.float64) - part.A.apply(x.to(torch.float64)) - base  # c(s h) − c(h)
            ratios.append(float(c.norm()) / max(float(((s - 1) * h.to(torch.float64)).norm()), 1e-300))
    lo, hi = ratios
    sublinear = math.isfinite(hi) and hi <= 0.05 and (hi <= 0.1 * lo or hi <= 1e-3)
    if sublinear:
        text = (f"the core is sublinear at large states (its increment is {_fmt(lo)} of the state at 10× h, "
                f"{_fmt(hi)} at 1000×): the loop tends to Ā, ρ(Ā) = {_fmt(rho)}"
                + (" > 1: it cannot be stable — at large states the state grows like ρ(Ā)ᵗ, the core can only "
                   "hold it for a while" if rho > 1 else " < 1: large states contract" if rho < 1 else ""))
    else:
        text = (f"the core does not fade at large states (increment {_fmt(lo)} of the state at 10× h, "
                f"{_fmt(hi)} at 1000×): the large-state limit is not Ā")
    return LargeState(bool(sublinear), rho, tuple(ratios), text)


def large_state_floor(m: ForecastModel, large: LargeState) -> ForecastModel:
    """A prediction corrected by the large-state limit (module docstring): when the loop tends to Ā at
    large states with ρ(Ā) > 1, a state the core cannot hold grows like ρ(Ā)ᵗ, so a model that grows
    slower (rate < log ρ(Ā) − UNIT_BAND: it does not know that growth) is raised to
    ‖ĥ_{T+j}‖ ≥ ‖h_T‖ ρ(Ā)ʲ at the rate log ρ(Ā) (docs/design.md §4). Returns a new result."""
    if not large.forbids_stable or not m.rate < math.log(large.spectral_radius) - UNIT_BAND:
        return m
    rate = math.log(large.spectral_radius)
    j = np.arange(len(m.state_norm), dtype=float)
    with np.errstate(over="ignore"):
        grow = np.exp(rate * j)
    from dataclasses import replace
    return replace(m, total_norm=np.fmax(m.total_norm, m.total_norm[0] * grow),
                   state_norm=np.fmax(m.state_norm, m.state_norm[0] * grow), rate=rate, exact_rate=True,
                   limit_state=None,
                   detail=m.detail + f"; raised to the large-state growth ‖h_T‖ ρ(Ā)ʲ (ρ(Ā) = {_fmt(large.spectral_radius)}: "
                                     f"its own rate {_fmt(m.rate)}/loop is slower)")


# ---- verdicts ---------------------------------------------------------------------------------------

def judge(m: ForecastModel, T: int, H: int, limit_fn, settle_tol: float, w: int = 1) -> None:
    """A model's own verdict, safe-loop crossing and settling loop (module docstring). For a fitted
    rate the unit band widens with the model's hindcast error e over w loops to max(UNIT_BAND, e / 4w):
    a modulus error δ shows as a relative error ≈ wδ after w loops (the factor 4: most of a hindcast
    error is direction, not modulus), so a rate that close to 0 is not resolved."""
    J = H - T
    m.band = max(UNIT_BAND, m.hindcast_error / (BAND_PER_ERROR * max(w, 1))) if m.checked and not m.exact_rate \
        else UNIT_BAND
    band = m.band
    m.safe_limit = limit_fn(m)
    first = None
    if J > 0:
        s = m.state_norm[1: J + 1]
        bad = ~np.isfinite(s) | (s > min(m.safe_limit, OVERFLOW))
        hit = np.nonzero(bad)[0]
        if hit.size:
            first = int(hit[0]) + 1
    m.first_unsafe = None if first is None else T + first
    # the bound for max_safe_loops: the prediction widened by (1 + e)^(j/w), at most SAFE_WIDEN
    m.safe_bound = m.first_unsafe
    if J > 0 and m.checked and m.hindcast_error > 0:
        j = np.arange(1, J + 1, dtype=float)
        u = np.minimum((1 + m.hindcast_error) ** (j / max(w, 1)), SAFE_WIDEN)
        with np.errstate(over="ignore", invalid="ignore"):
            s = m.state_norm[1: J + 1] * u
        hit = np.nonzero(~np.isfinite(s) | (s > min(m.safe_limit, OVERFLOW)))[0]
        if hit.size:
            m.safe_bound = T + int(hit[0]) + 1
    burst = first is not None and (not np.isfinite(m.residual[first]) or
                                   np.nanmax(m.residual[1: first + 1]) > GROWTH_AT_CROSSING * max(m.residual[0], 1e-300))
    m.verdict = model_verdict(m.rate, crossing=m.first_unsafe, burst=burst, band=band)[0]
    # loops to settle
    m.settle_loops = None
    if m.verdict == "stable":
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(m.total_norm > 0, m.residual / m.total_norm, 0.0)
        above = np.nonzero(~(rel[: J + 1] <= settle_tol))[0]  # loops T + j not settled (NaN counts)
        if not above.size:
            m.settle_loops = T
        elif above[-1] < J:
            m.settle_loops = T + int(above[-1]) + 1
        else:
            last = rel[J] if J > 0 else rel[0]
            extra = math.ceil(math.log(settle_tol / max(last, 1e-300)) / m.rate) if m.rate < 0 else 0
            m.settle_loops = H + max(extra, 1) if J > 0 else T + max(extra, 1)


def _select(models: list[ForecastModel]) -> tuple[ForecastModel, str]:
    """The deciding model and why (module docstring)."""
    fallback = next((m for m in models if m.name == "measured"), None)
    models = [m for m in models if m.name != "measured"]
    if not models and fallback is not None:
        return fallback, "no linear model could be built"
    exact = [m for m in models if m.name == "LTI" and m.checked and m.hindcast_error <= EXACT_HINDCAST]
    if exact:
        return exact[0], "the LTI part reproduces the measured loops to measurement precision"
    checked = [m for m in models if m.checked]
    good = [m for m in checked if m.hindcast_error <= HINDCAST_TOL]
    if good:
        best = min(m.hindcast_error for m in good)
        band = max(SELECT_BAND[0] * best, SELECT_BAND[1])
        cands = [m for m in good if m.hindcast_error <= band]
        why = (f"reproduces the measured residuals within {_fmt(min(cands, key=lambda m: m.hindcast_error).hindcast_error)}"
               if len(cands) == 1 else
               f"{len(cands)} models reproduce the measured residuals about equally well "
               f"(within {_fmt(band)}); the most cautious decides")
    elif [m for m in models if not m.checked]:
        cands = [m for m in models if not m.checked]
        why = "too few measured loops to hindcast"
    else:
        best = min(checked, key=lambda m: m.hindcast_error)
        if fallback is not None:
            return fallback, (f"no linear model reproduces the measured residual vectors within {HINDCAST_TOL:g} "
                              f"(best: {best.name}, {_fmt(best.hindcast_error)}): the motion is not linear about a "
                              f"fixed point, so the measured norms decide")
        return best, (f"no model reproduces the measured residuals within {HINDCAST_TOL:g}; the best "
                      f"({_fmt(best.hindcast_error)}) decides")
    pick = max(cands, key=lambda m: (Verdict(m.verdict).severity, -(m.hindcast_error if m.checked else 1e9),
                                     -MODEL_ORDER.get(m.name, 9)))
    return pick, why


def nonfinite_forecast(traj, horizon: int, explosion_factor: float = 10.0, nonfinite_weights=None,
                       extra_evidence=None, models=(), mean_loops: int = 0) -> Forecast:
    """The verdict for non-finite weights or states: explosive, no forecast needed."""
    T, H = traj.n_loops, int(horizon)
    bad_t = traj.nonfinite_at
    first = 1 if nonfinite_weights and bad_t is None else max(bad_t or 1, 1)
    norms, rel = np.full(H, math.nan), np.full(H, math.nan)
    upto = min(first - 1, T, H)
    norms[:upto] = traj.state_norm[1: upto + 1]
    rel[:upto] = traj.rel_residual[1: upto + 1]
    why = []
    if nonfinite_weights:
        names = ", ".join(nonfinite_weights[:4]) + (" …" if len(nonfinite_weights) > 4 else "")
        why.append(f"non-finite: {len(nonfinite_weights)} parameter(s) hold NaN/Inf ({names})")
    if bad_t is not None:
        why.append(f"non-finite: the state holds NaN/Inf at loop {bad_t}"
                   + (" (the loop overflows at the first step)" if bad_t <= 1 else ""))
    return Forecast("explosive", math.nan, max(first - 1, 0), H, T, norms, rel, math.nan,
                    why + list(extra_evidence or []), "non-finite", UNIT_BAND, explosion_factor, list(models),
                    trained_depth=int(mean_loops or T))


def combine(traj, models, horizon: int, explosion_factor: float = 10.0, settle_tol: float = 1e-2,
            extra_evidence: list[str] | None = None, nonfinite_weights: list[str] | None = None, *,
            mean_loops: int | None = None, large: LargeState | None = None) -> Forecast:
    """Judge every model, select the deciding one, apply the large-state rule and build the Forecast
    (module docstring). With non-finite weights or states the verdict is `explosive`."""
    T, H = traj.n_loops, int(horizon)
    if nonfinite_weights or traj.nonfinite_at is not None:
        return nonfinite_forecast(traj, H, explosion_factor, nonfinite_weights, extra_evidence,
                                  [m for m in models if m is not None], mean_loops or T)
    models = [m for m in models if m is not None]
    mu = int(mean_loops) if mean_loops else T
    extra = list(extra_evidence or [])
    measured = traj.state_norm

    def ref_of(m: ForecastModel) -> float:
        if mu <= T:
            return float(measured[mu])
        j = mu - T
        v = float(m.state_norm[j]) if j < len(m.state_norm) else math.nan
        return v if math.isfinite(v) and v > 0 else float(measured[T])

    def limit_of(m: ForecastModel) -> float:
        return explosion_factor * max(ref_of(m), 1e-30)

    w = max(min(3, (T - 1) // 2), 1)
    if large is not None:
        models = [large_state_floor(m, large) for m in models]
    for m in models:
        m.used = (not m.checked) or m.hindcast_error <= HINDCAST_TOL
        judge(m, T, H, limit_of, settle_tol, w)
    if not models:  # nothing to extrapolate with (a single measured loop): the measurement only
        m = ForecastModel("trajectory", np.array([traj.total_norm[T]]), np.array([traj.total_residual[T]]),
                          np.array([measured[T]]), 0.0, np.zeros(0, complex), "one measured loop: no model")
        H = max(H, T)
        judge(m, T, T, limit_of, settle_tol)
        models = [m]
    pick, why = _select(models)
    limit = pick.safe_limit
    # the measured loops past the trained depth first
    first_unsafe = None
    crossing_by = None
    for t in range(mu + 1, min(T, H) + 1):
        if not np.isfinite(measured[t]) or measured[t] > limit:
            first_unsafe = t
            break
    verdict, reason = Verdict(pick.verdict), ""
    if first_unsafe is not None:  # the measured state already left the safe region
        burst = traj.total_residual[first_unsafe] > GROWTH_AT_CROSSING * traj.total_residual[mu] if mu >= 1 else True
        if verdict != Verdict.EXPLOSIVE:
            verdict, reason = model_verdict(pick.rate, crossing=first_unsafe, burst=burst, band=pick.band)
        bound = first_unsafe
    else:
        first_unsafe = pick.first_unsafe
        # the safe-loop count is a bound: the earliest loop at which the deciding model or any other model
        # that reproduces the past, its prediction widened by its hindcast error, could leave the safe region
        bound = pick.safe_bound
        for m in models:
            if m is not pick and m.used and m.checked and m.name != "measured" and m.safe_bound is not None \
                    and (bound is None or m.safe_bound < bound):
                bound, crossing_by = m.safe_bound, m.name
        if bound is not None and crossing_by is None and bound != first_unsafe:
            crossing_by = pick.name
    max_safe = H if bound is None else min(bound - 1, H)
    large_rho = large.spectral_radius if large is not None and large.limit_is_lti else None
    lti_exit = lti_exit_loop(float(measured[T]), limit, math.log(large_rho), T) \
        if large_state_unstable(large_rho) else None
    before = verdict
    verdict, why_final = loop_verdict((verdict, reason), horizon=H, max_safe_loops=max_safe,
                                      settles=pick.settle_loops is not None, band=pick.band,
                                      large_state_radius=large_rho, leaves_past_horizon=first_unsafe is None,
                                      lti_exit=lti_exit)
    large_txt = None if verdict == before else (f"large-state limit: {why_final}" if large_rho is not None
                                                else f"verdict: {why_final}")

    # curves in state_norm units, loops 1..H
    J = H - T
    state, rel = np.empty(H), np.empty(H)
    upto = min(T, H)
    state[:upto] = measured[1: upto + 1]
    rel[:upto] = traj.rel_residual[1: upto + 1]
    if J > 0:
        state[T:] = pick.state_norm[1: J + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel[T:] = np.where(pick.total_norm[1: J + 1] > 0, pick.residual[1: J + 1] / pick.total_norm[1: J + 1], 0.0)

    # evidence, the deciding model first
    rate_txt = f"rate {_fmt(pick.rate)}/loop (unit band ±{_fmt(UNIT_BAND)})"
    if first_unsafe is not None and first_unsafe <= T:
        outcome = (f"the measured state already exceeds {explosion_factor:g}× ‖h_{mu}‖ at loop {first_unsafe} "
                   f"(‖h‖ {_fmt(measured[first_unsafe])} vs limit {_fmt(limit)})")
    elif first_unsafe is not None:
        how = "grows geometrically" if pick.rate > pick.band else "drifts" if verdict != Verdict.EXPLOSIVE else \
            "is carried by a bounded transient" if pick.rate < -pick.band else "bursts (transient growth)"
        outcome = (f"the state {how} past {explosion_factor:g}× the state at the trained depth (‖h_{mu}‖) at loop "
                   f"{first_unsafe}; {rate_txt}")
    elif verdict == "explosive":
        outcome = f"safe through {_loops(H)}, but it grows geometrically past the horizon ({rate_txt})"
    elif verdict == "stable":
        outcome = f"bounded and converging ({rate_txt}); it settles (relative residual ≤ {settle_tol:g}) by loop " \
                  f"{pick.settle_loops}"
    else:
        lead = pick.eigenvalues[0] if len(pick.eigenvalues) else None
        outcome = (f"bounded or sub-geometric but not converging within the unit band ({rate_txt}"
                   + (f"; leading eigenvalue {_fmt(complex(lead))}" if lead is not None else "") + ")")
    hind = "" if not pick.checked else f"; hindcast error {_fmt(pick.hindcast_error)}"
    evidence = [f"{pick.name}: {pick.detail}; {outcome} [selected: {why}{hind}]"]
    if crossing_by is not None:
        evidence.append(f"safe-loop count: safe through {max_safe} loops — {crossing_by}'s prediction (it reproduces "
                        f"the past), widened by its hindcast error (×(1 + e)^(j/w), at most ×{SAFE_WIDEN:g}), could "
                        f"leave the safe region at loop {bound}")
    if large_txt:
        evidence.append(large_txt)
    for m in models:
        if m is pick or (m.name == "measured" and m is not pick):
            continue
        h_txt = "not hindcast" if not m.checked else f"hindcast error {_fmt(m.hindcast_error)}" + \
            ("" if m.used else f" > {HINDCAST_TOL:g}: does not reproduce the past, not used")
        evidence.append(f"{m.name}: {m.detail}; its verdict {m.verdict}, rate {_fmt(m.rate)}/loop ({h_txt})")
    if large is not None and large.text:
        evidence.append(f"large-state limit: {large.text}")
    evidence += extra
    lead_src = next((m for m in models if m.name == "Jacobian" and len(m.eigenvalues)), pick)
    return Forecast(verdict, pick.rate, max_safe, H, T, state, rel, limit, evidence, pick.name, UNIT_BAND,
                    explosion_factor, models, pick.settle_loops if verdict == "stable" else None,
                    np.asarray(lead_src.eigenvalues), lead_src.name, large, mu)


# ---- entry points -----------------------------------------------------------------------------------

def forecast(model, idx: torch.Tensor, max_loops: int, measured_loops: int | None = None, *,
             explosion_factor: float = 10.0, settle_tol: float = 1e-2, krylov_dim: int = 8,
             lyapunov_k: int = 2, n_random: int = 2, random_steps: int = 4, cost: Cost | None = None) -> Forecast:
    """Measure the loop for `measured_loops` loops (default min(mean_loops, max_loops)) on idx and
    forecast the state to `max_loops` loops (see the module docstring for the models, the safe
    region and the verdict). lyapunov_k > 0 adds finite-time Lyapunov exponents over the measured
    loops as corroborating evidence. `model` is any LoopedModel."""
    from loopdyn.dynamics.lyapunov_exponents import LyapunovAccumulator
    from loopdyn.dynamics.trajectory import measure_trajectory

    protocol.require_looped(model)
    H = int(max_loops)
    T = min(model.mean_loops, H) if measured_loops is None else int(measured_loops)
    if T < 1 or H < T:
        raise ValueError(f"need 1 ≤ measured_loops ≤ max_loops, got {T} and {H}")
    cost = cost if cost is not None else Cost()
    bad = nonfinite_parameters(model) if hasattr(model, "named_parameters") else []
    traj = measure_trajectory(model, idx, T, cost=cost)
    if bad or traj.nonfinite_at is not None:
        return nonfinite_forecast(traj, H, explosion_factor, bad, mean_loops=model.mean_loops)
    extra = []
    if lyapunov_k > 0:
        acc = LyapunovAccumulator(traj.states[0].shape, lyapunov_k)
        for t in range(T):
            acc.update(Linearisation(model, traj.ctx, traj.states[t], cost))
        extra.append(lyapunov_evidence(acc.result()))
    return forecast_from(model, traj, None, H, krylov_dim=krylov_dim, explosion_factor=explosion_factor,
                         settle_tol=settle_tol, extra_evidence=extra, n_random=n_random,
                         random_steps=random_steps, cost=cost)


def lyapunov_evidence(lyap) -> str:
    lam = float(lyap.exponents[0]) if len(lyap.exponents) else math.nan
    trend = ("perturbations grow along the trajectory" if lam > 0.01 else
             "perturbations shrink along the trajectory" if lam < -0.01 else "perturbations neither grow nor shrink")
    return (f"Lyapunov: λ₁ = {_fmt(lam)}/loop over {lyap.loops} loops ({trend}; "
            f"k = {len(lyap.exponents)}: {', '.join(_fmt(x) for x in lyap.exponents)})")


def forecast_from(model, traj, spec, horizon: int, *, krylovs: dict | None = None,
                  krylov_dim: int = 8, explosion_factor: float = 10.0, settle_tol: float = 1e-2,
                  extra_evidence: list[str] | None = None, sigma_T: float | None = None,
                  n_random: int = 2, random_steps: int = 4, cost: Cost | None = None,
                  linearisations: dict | None = None) -> Forecast:
    """The forecast from a measured trajectory (with its states). `spec` (an InjectionSpectrum, or
    None) only saves recomputing Ā's eigenvalues; `krylovs` ({loop t: KrylovResult}, the audit's
    krylov_dim-step Arnoldi runs at h_t from r_t, with their bases) saves those products;
    `linearisations` ({loop t: Linearisation at h_t}, the audit's own for `forecast_loops(T)`)
    saves re-linearising those states. Costs the linearisations at h_T and h_{T−w} not given,
    about 2·(krylov_dim + n_random·random_steps) Jacobian products (krylov_dim fewer per given
    run) and two loop steps."""
    T, H = traj.n_loops, int(horizon)
    states = traj.states
    if traj.nonfinite_at is not None:
        return nonfinite_forecast(traj, H, explosion_factor, None, extra_evidence, mean_loops=model.mean_loops)
    cost = cost if cost is not None else Cost()
    data = _Data(T, [_rows(s) for s in states], float(torch.finfo(states[T].dtype).eps))
    J = max(H - T, 1)
    part = protocol.linear_part(model)
    if part is not None and not part.A.is_finite():
        part = None
    large = large_state_limit(model, traj.ctx, states[T - 1], states[T], part, cost) if T >= 1 else None
    models = [trajectory_model(data, J), measured_model(traj, J)]
    eig = None
    if spec is not None and not getattr(spec, "absent", False) and len(getattr(spec, "eigenvalues", [])):
        eig = np.asarray(spec.eigenvalues)
    models.append(lti_model(part, data, J, eig))
    use_scaling = large is not None and large.limit_is_lti
    if krylov_dim > 0 and T >= 1:
        r_T = (states[T] - states[T - 1]).to(torch.float64)
        steps = min(krylov_dim, r_T.numel())
        given, runs = linearisations or {}, krylovs or {}
        lin = given.get(T) or Linearisation(model, traj.ctx, states[T], cost)
        sub = jacobian_subspace(lin, r_T, steps, n_random, random_steps, seed=0, krylov=runs.get(T))
        del lin
        sub0 = None
        w = data.hindcast_window()
        if w >= 1 and T - w >= 1:
            t0 = T - w
            lin0 = given.get(t0) or Linearisation(model, traj.ctx, states[t0], cost)
            sub0 = jacobian_subspace(lin0, (states[t0] - states[t0 - 1]).to(torch.float64), steps, n_random,
                                     random_steps, seed=1, krylov=runs.get(t0))
            del lin0
        HL = lti_projection(sub, part.A) if use_scaling else None
        HL0 = lti_projection(sub0, part.A) if use_scaling and sub0 is not None else None
        models.append(jacobian_model(sub, sub0, data, J, HL, HL0, sigma_T, large.spectral_radius))
    return combine(traj, models, H, explosion_factor, settle_tol, extra_evidence, mean_loops=model.mean_loops,
                   large=large)


# ---- loops past the trained depth: does the model overthink? ----------------------------------------

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

    def summary(self) -> str:
        mu = self.mean_loops
        i_mu = int(np.nonzero(self.loops == mu)[0][0]) if mu in self.loops else None
        at_mu = f"L({mu}) = {self.loss[i_mu]:.4g}, " if i_mu is not None else ""
        head = (f"overthinks: the loss rises {100 * self.rise:.2g}% past the trained depth μ = {mu}"
                if self.overthinks else f"does not overthink: the loss does not rise past the trained depth μ = {mu} "
                                        f"(by more than {100 * self.tol:.2g}%)")
        return (f"{head}; {at_mu}best test-time loop count T = {self.best_loops} (L = {self.best_loss:.4g})"
                + (f"; {self.reason}" if self.reason else ""))


def overthinking(loops, loss, mean_loops: int, forecast: Forecast | None = None, phases=None,
                 tol: float = OVERTHINK_TOL) -> Overthinking:
    """Analyse a loss-versus-loops curve (see `Overthinking`); forecast/phases give the reason."""
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
    return Overthinking(loops, loss, int(mean_loops), bool(over), best_T, best, float(rise), reason, tol)


def _overthinking_reason(over: bool, mu: int, f: Forecast, phases) -> str:
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
        why = moving or f"the state does not settle (marginal; ‖h_{f.horizon}‖/‖h_{mu}‖ = {_fmt(grow)})"
        return f"dynamical reason: {why}"
    if over:
        return (f"dynamical reason: none in the state — it converges (stable, settles by loop {f.settle_loops}; "
                f"‖h_{f.horizon}‖/‖h_{mu}‖ = {_fmt(grow)}): the readout was trained on the state at depth {mu}, "
                f"not on the fixed point it moves on to")
    return f"the state converges (stable, settles by loop {f.settle_loops}): more loops change little"


def probe_losses(model, idx: torch.Tensor, traj, max_loops: int, cost: Cost | None = None,
                 after: torch.Tensor | None = None) -> np.ndarray | None:
    """Next-token loss of the probe itself (targets idx[:, 1:]) after T = 1..max_loops loops, from the
    measured states and the loop continued from h_T (from `after` = F(h_T) when it is known);
    None when decode does not give vocabulary logits."""
    import torch.nn.functional as F

    from loopdyn.dynamics.trajectory import run_loop

    T = traj.n_loops
    if not traj.states or idx.shape[1] < 2:
        return None
    targets = idx[:, 1:]
    out = np.full(max_loops, math.inf)  # loops after a non-finite state stay infinite
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
            out[t - 1] = float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten()))
    return out
