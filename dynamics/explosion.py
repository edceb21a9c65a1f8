"""Explosion forecast: will the state blow up as the loop count grows past what was measured?

The loop is run for T measured loops; the forecast extends ‖h_t‖ to the horizon H > T.

What is extrapolated. The residual r_t = h_t − h_{t−1} obeys r_{t+1} = F(h_t) − F(h_{t−1})
≈ J_t r_t: it is a tangent vector, so the future of the state is h_{T+j} = h_T + Σ_{i≤j} r_{T+i}
with residuals propagated by a linear model. Three models are built, each giving a predicted
state norm ‖ĥ_{T+j}‖ (the sum is taken as vectors, so cancellations and fixed points come out
right), a residual curve, a tail growth rate and, when it converges, the limit ‖ĥ_∞‖:

* trajectory — the measured residual ratio q (the least-squares slope of log ‖r_t‖ over the
  last half of the measured loops, at least three) continued, with future residuals parallel
  to r_T: exact for a dominant real mode and for the linear drift of an additive loop. A
  residual at float32 round-off (relative 1e-5) means the state has converged.
* LTI — r_{T+j} = Āʲ r_T with the injection's exact Ā (per token, as vectors). This is
  exact when the core adds nothing (official initialisation) and it is what catches
  non-normal transient growth that peaks after the measured loops. It is used only when it
  explains the measured residuals: propagated from r_{T−3} with Ā, it reproduces each of the
  measured residual vectors r_{T−2}, r_{T−1}, r_T within 50% relative error (or there is
  nothing to check against). A core that matters (trained weights, normalising sandwich
  blocks) fails this test, and the Jacobian and trajectory models decide.
* Jacobian — the linearisation at h_T: m Arnoldi steps on J_T started from r_T give a
  Hessenberg matrix H_m with J_Tʲ r_T ≈ ‖r_T‖ V_m H_mʲ e_1 (exact for j < m and on a found
  invariant subspace); its Ritz values estimate ρ(J_T), the local rate the nonlinear core
  and the injection produce together. For pre-norm cores the core's part of J (J_T − I⊗Ā,
  projected on the Krylov basis) is rescaled by ‖h_T‖/‖ĥ_t‖ along the prediction: each
  sublayer reads its input through a norm, so its Jacobian falls as 1/‖h‖ when the state
  grows (the loop then tends to its LTI part) and stays as measured when the state settles.

Combination (the envelope). Each model is hindcast on the measured loops (its relative error
reproducing measured residual vectors: the fit without the last loop for the trajectory,
r_{T−3} propagated for LTI, J_{T−1} r_{T−1} vs r_T for the Jacobian when the audit has it).
When the LTI model reproduces the measured residuals to 1e-3 over three loops, the loop is the
LTI system to measurement precision (e.g. a core at its official initialisation) and its exact
forecast is used alone; otherwise all models in use are combined: the predicted state norm at
each loop is the maximum over them (conservative) and the growth rate is the largest tail rate
(per-loop log growth of the predicted residual over the last quarter of the horizon, nats per
loop). No single number
decides: ‖Ā‖ > 1 with ρ < 1 and a contracting core gives decaying residuals in every model
(stable); a non-normal Ā with ρ < 1 gives a large LTI transient in the state itself
(explosive when it leaves the safe region within the horizon). Lyapunov exponents and the
Jacobian norms are reported as corroborating evidence.

Definitions (documented thresholds):

* natural scale N_ref = max(‖h_1‖, ‖ĥ_∞‖ of the converging models), in the units of
  `state_norm` (mean over tokens of ‖h_t‖₂; models that only predict whole-batch norms are
  converted with the ratio measured at loop T);
* loop t is *safe* when the measured or predicted state is finite and ‖h_t‖ ≤
  explosion_factor · N_ref (default 10); `max_safe_loops` is the largest t ≤ H such that every
  loop 1..t is safe;
* ε = log 2 / max(H − T, 4): a residual that changes by less than a factor 2 over the
  forecast window counts as not growing (growth rate ≈ 0);
* verdict: `explosive` if a state is non-finite (measured, or non-finite weights), or the
  state leaves the safe region within the horizon while the residual grows or shrinks
  geometrically (|rate| > ε: exponential growth, or a transient burst); `marginal` if it
  leaves the safe region by sub-exponential drift (|rate| ≤ ε, e.g. the linear growth of an
  additive loop), or stays safe without settling (the predicted relative residual
  ‖r_H‖/‖h_H‖ at the horizon above `settle_tol`, default 1e-2); `stable` otherwise (safe
  through the horizon, and settled there: relative residual ≤ settle_tol).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from loopdyn.dynamics.jacobian import arnoldi, ritz_values
from loopdyn.dynamics.loopmap import Cost, Linearisation, nonfinite_parameters, require_loop
from loopdyn.models import protocol
from loopdyn.dynamics.lti import InjectionSpectrum, injection_spectrum

NOISE_FLOOR = 1e-5  # residuals below this fraction of the state are float32 round-off
CONSISTENCY_TOL = 0.5  # LTI must predict each measured next residual vector within this relative error
EXACT_HINDCAST = 1e-3  # an LTI hindcast this good means the loop is the LTI system
RATE_FLOOR = -20.0  # nats/loop reported for residuals that vanish (exact convergence)
OVERFLOW = 3.0e38  # float32 max: a predicted norm beyond it is non-finite in the real loop


@dataclass
class ForecastModel:
    """One residual-propagation model's prediction for loops T..H (index 0 = the measured h_T)."""

    name: str  # "trajectory" | "LTI" | "Jacobian"
    total_norm: np.ndarray  # predicted whole-batch ‖ĥ_t‖
    residual: np.ndarray  # predicted whole-batch ‖r̂_t‖
    tail_rate: float  # nats per loop
    limit_norm: float | None  # ‖ĥ_∞‖ when the model converges
    used: bool
    detail: str  # evidence text
    hindcast_error: float = math.nan  # relative error reproducing measured residual vectors (NaN: not checked)
    state_norm: np.ndarray | None = None  # predicted mean token ‖ĥ_t‖, when the model has it per token
    limit_state: float | None = None  # the limit in the same units

    def in_state_units(self, scale: float) -> tuple[np.ndarray, float | None]:
        """(predicted mean token norms, limit) — converted from whole-batch norms by `scale`
        (mean token norm ÷ whole-batch norm at loop T) when the model has no per-token values."""
        if self.state_norm is not None:
            return self.state_norm, self.limit_state
        return self.total_norm * scale, None if self.limit_norm is None else self.limit_norm * scale


def _crossing(norms: np.ndarray, limit: float) -> int | None:
    """Index j ≥ 1 of the first predicted norm above limit (or non-finite)."""
    bad = ~np.isfinite(norms[1:]) | (norms[1:] > limit)
    hit = np.nonzero(bad)[0]
    return int(hit[0] + 1) if hit.size else None


@dataclass
class Forecast:
    """The forecast of the state norm to `horizon` loops and the verdict (module docstring)."""

    verdict: str  # "stable" | "marginal" | "explosive"
    growth_rate: float  # nats per loop of the residual near the horizon
    max_safe_loops: int
    horizon: int
    measured_loops: int
    state_norm: np.ndarray  # loops 1..H: mean token ‖h_t‖ (measured for t ≤ T, predicted after)
    rel_residual: np.ndarray  # loops 1..H, likewise
    safe_limit: float  # the safe bound in state_norm units
    evidence: list[str]  # "kind: text", the deciding one first
    decided_by: str  # "non-finite" | "trajectory" | "LTI" | "Jacobian"
    marginal_rate: float  # ε
    explosion_factor: float
    models: list[ForecastModel] = field(default_factory=list, repr=False)

    @property
    def loops(self) -> list[int]:
        return list(range(1, self.horizon + 1))

    def to_json(self) -> dict:
        """The DESIGN §7 `forecast` record."""
        return {"verdict": self.verdict, "growth_rate": float(self.growth_rate),
                "max_safe_loops": int(self.max_safe_loops), "loops": self.loops,
                "state_norm": [float(x) for x in self.state_norm],
                "measured_loops": int(self.measured_loops), "evidence": list(self.evidence)}


# ---- helpers -------------------------------------------------------------------------------------

def _tail_rate(residual: np.ndarray) -> float:
    """Per-loop log growth of a residual curve over its last quarter (at least one loop)."""
    J = len(residual) - 1
    if J < 1:
        return math.nan
    w = max(1, J // 4)
    a, b = residual[J - w], residual[J]
    if not (np.isfinite(a) and np.isfinite(b)):
        return math.inf if not np.isfinite(b) else RATE_FLOOR
    if b <= 0 or a <= 0:
        return RATE_FLOOR
    return max((math.log(b) - math.log(a)) / w, RATE_FLOOR)


def _norm_of_sum(N0: float, dot: np.ndarray, S: np.ndarray, R: float) -> np.ndarray:
    """‖h + S·r‖ for scalars S (elementwise), given ‖h‖ = N0, ⟨h, r⟩ = dot, ‖r‖ = R, without
    overflow cancelling into NaN."""
    out = np.empty_like(S, dtype=float)
    for i, s in enumerate(S):
        if not np.isfinite(s):
            out[i] = math.inf
        elif abs(s) <= 1:
            out[i] = math.sqrt(max(N0 * N0 + 2 * s * dot + s * s * R * R, 0.0))
        else:
            out[i] = abs(s) * math.sqrt(max(R * R + 2 * dot / s + (N0 / s) ** 2, 0.0))
    return out


def _loops(n: int) -> str:
    return f"{n} loop" if n == 1 else f"{n} loops"


def _fmt(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "inf" if x is not None and x > 0 else ("-inf" if x is not None and x < 0 else "n/a")
    return f"{x:.3g}"


# ---- the three models ----------------------------------------------------------------------------

def trajectory_model(states: list[torch.Tensor], total_norm: np.ndarray, total_residual: np.ndarray,
                     J: int, window: int = 3) -> ForecastModel | None:
    """Continue the measured residual ratio (see the module docstring)."""
    T = len(states) - 1
    if T < 1:
        return None
    N, R = total_norm, total_residual
    usable = [t for t in range(1, T + 1) if np.isfinite(R[t]) and R[t] > NOISE_FLOOR * N[t]]
    if T not in usable:
        norms = np.full(J + 1, N[T])
        rel = R[T] / N[T] if N[T] > 0 else 0.0
        return ForecastModel("trajectory", norms, np.zeros(J + 1), RATE_FLOOR, float(N[T]), True,
                             f"converged to float32 round-off by loop {T} (relative residual {_fmt(rel)})")
    tail = [t for t in range(max(1, T - max(window, T // 2)), T + 1) if t in usable]
    if len(tail) < 2:
        return None
    # least-squares slope of log ‖r_t‖ over the last half of the measured loops
    q = math.exp(float(np.polyfit(np.array(tail, float), np.log([R[t] for t in tail]), 1)[0]))
    # hindcast: the same fit without loop T, continued one loop, against the measured r_T vector
    hind = math.nan
    early = [t for t in tail if t < T]
    if len(early) >= 2 and early[-1] == T - 1:
        q1 = math.exp(float(np.polyfit(np.array(early, float), np.log([R[t] for t in early]), 1)[0]))
        r_prev = (states[T - 1] - states[T - 2]).to(torch.float64)
        r_T = (states[T] - states[T - 1]).to(torch.float64)
        hind = float((q1 * r_prev - r_T).norm()) / R[T]
    hT, rT = states[T].to(torch.float64), (states[T] - states[T - 1]).to(torch.float64)
    dot = float((hT * rT).sum())
    j = np.arange(J + 1, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        S = j.copy() if abs(q - 1.0) < 1e-12 else q * (1 - q ** j) / (1 - q)
        residual = R[T] * q ** j
    norms = _norm_of_sum(N[T], dot, S, R[T])
    limit = float(_norm_of_sum(N[T], dot, np.array([q / (1 - q)]), R[T])[0]) if q < 1 else None
    trend = "shrinking" if q < 1 - 1e-3 else "growing" if q > 1 + 1e-3 else "constant: linear drift"
    detail = f"residual ratio {_fmt(q)}/loop over loops {tail[0]}-{tail[-1]} ({trend})"
    return ForecastModel("trajectory", norms, residual, math.log(q), limit, True, detail, hind)


def _token_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(torch.float64), dim=-1)


def _lti_apply(A, x: torch.Tensor) -> torch.Tensor:
    return A.apply(x.to(torch.float64))


def lti_model(model, states: list[torch.Tensor], total_norm: np.ndarray, total_residual: np.ndarray,
              spec: InjectionSpectrum, J: int, max_flops: float = 4e9) -> ForecastModel | None:
    """r_{T+j} = Āʲ r_T exactly (see the module docstring); tokens are subsampled (evenly) when
    propagating every token would cost more than max_flops."""
    T = len(states) - 1
    part = protocol.linear_part(model)
    if T < 1 or part is None or not part.A.is_finite():
        return None
    A = part.A
    ds = states[T].shape[-1]
    rows_T = states[T].reshape(-1, ds).to(torch.float64)
    per_token = (ds if A.normal else ds * ds) * 2.0 * max(J, 1)
    n_tok = rows_T.shape[0]
    keep = max(1, min(n_tok, int(max_flops / per_token)))
    sel = torch.linspace(0, n_tok - 1, keep).round().long() if keep < n_tok else slice(None)

    def rows(t):
        return states[t].reshape(-1, ds).to(torch.float64)[sel]

    h, r = rows(T), rows(T) - rows(T - 1)
    scale = float(total_norm[T] / max(float(h.norm()), 1e-300))
    r_scale = float(total_residual[T] / max(float(r.norm()), 1e-300)) if float(r.norm()) > 0 else scale

    # consistency: hindcast the residual vectors of the last measured loops from r_{t0}
    N, R = total_norm, total_residual
    errors = []
    t0 = max(1, T - 3)
    if R[t0] > NOISE_FLOOR * N[t0]:
        r_pred = (states[t0] - states[t0 - 1]).reshape(-1, ds).to(torch.float64)
        for t in range(t0 + 1, T + 1):
            r_pred = _lti_apply(A, r_pred)
            if not R[t] > NOISE_FLOOR * N[t]:
                break
            r_true = (states[t] - states[t - 1]).reshape(-1, ds).to(torch.float64)
            errors.append(float((r_pred - r_true).norm()) / R[t])
    consistent = not errors or max(errors) <= CONSISTENCY_TOL

    norms, residual, tok = np.empty(J + 1), np.empty(J + 1), np.empty(J + 1)
    norms[0], residual[0] = total_norm[T], total_residual[T]
    tok_scale = float(_token_norms(states[T]).mean()) / max(float(h.norm(dim=-1).mean()), 1e-300)
    tok[0] = float(h.norm(dim=-1).mean()) * tok_scale
    cum = torch.zeros_like(h)
    for j in range(1, J + 1):
        r = _lti_apply(A, r)
        cum = cum + r
        rn = float(r.norm()) * r_scale
        hn = float((h + cum).norm()) * scale
        residual[j], norms[j] = rn, hn
        tok[j] = float((h + cum).norm(dim=-1).mean()) * tok_scale
        if not (math.isfinite(hn) and hn < 1e300):
            norms[j:], residual[j:], tok[j:] = math.inf, math.inf, math.inf
            break
    limit = None
    if spec.spectral_radius < 1 and A.kind != "identity":
        if A.kind == "diagonal":
            a = A.values.to(torch.float64)
            tail = (rows(T) - rows(T - 1)) * (a / (1 - a))
        else:
            Ad = A.values.to(torch.float64)
            M = torch.eye(ds, dtype=torch.float64, device=Ad.device) - Ad
            r0 = rows(T) - rows(T - 1)
            tail = torch.linalg.solve(M, (r0 @ Ad.T).T).T
        limit = float((rows(T) + tail).norm()) * scale
        limit_tok = float((rows(T) + tail).norm(dim=-1).mean()) * tok_scale
    else:
        limit_tok = None
    how = "explains the measured residuals" if consistent else "does not explain the measured residuals"
    err_txt = f" (hindcast relative error ≤ {_fmt(max(errors))})" if errors else ""
    detail = (f"ρ(Ā) {_fmt(spec.spectral_radius)}, ‖Ā‖₂ {_fmt(spec.spectral_norm)}, "
              f"max_k≤{spec.horizon} ‖Āᵏ‖₂ {_fmt(spec.transient_max)} at k={spec.transient_peak}; "
              f"{how}{err_txt}{'' if consistent else ': not used'}")
    return ForecastModel("LTI", norms, residual, _tail_rate(residual), limit, consistent, detail,
                         max(errors) if errors else math.nan, tok, limit_tok)


@dataclass
class KrylovResult:
    """Arnoldi on the frozen Jacobian J_T from r_T (see `jacobian_model`)."""

    H: np.ndarray  # m × m Hessenberg (square part)
    beta: float  # ‖r_T‖
    c: np.ndarray  # V_mᵀ h_T
    ritz: np.ndarray  # eigenvalues of H, by decreasing modulus
    exact: bool  # an invariant subspace was found
    products: int
    basis: list = field(default_factory=list, repr=False)  # q_0..q_m (float64 tensors)

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


def _sum_norm(N0: float, c: np.ndarray, y: np.ndarray) -> float:
    """‖h_T + V y‖ with V orthonormal, ‖h_T‖ = N0 and c = Vᵀh_T, without overflow."""
    ny = float(np.linalg.norm(y))
    if not math.isfinite(ny) or ny > 1e300:
        return math.inf
    if ny <= 1:
        return math.sqrt(max(N0 * N0 + 2 * float(c @ y) + ny * ny, 0.0))
    return ny * math.sqrt(max(1 + 2 * float(c @ y) / ny ** 2 + (N0 / ny) ** 2, 0.0))


def lti_projection(kry: KrylovResult, A) -> np.ndarray | None:
    """Vᵀ (I ⊗ Ā) V on the Arnoldi basis (m × m), the LTI part of J_T seen in the Krylov space."""
    m = kry.H.shape[0]
    if len(kry.basis) < m:
        return None
    Q = kry.basis[:m]
    AQ = [_lti_apply(A, q) for q in Q]
    return np.array([[float((Q[i] * AQ[j]).sum()) for j in range(m)] for i in range(m)])


def jacobian_model(kry: KrylovResult | None, total_norm: np.ndarray, T: int, J: int,
                   sigma: float | None = None, hindcast: float = math.nan,
                   lti_part: np.ndarray | None = None) -> ForecastModel | None:
    """Propagate r_T with the Arnoldi matrix of J_T (see the module docstring).

    Scale-aware for pre-norm cores (lti_part given): every sublayer reads its input through a
    norm, so the core's part of the Jacobian, K = J_T − I ⊗ Ā, scales like 1/‖h‖. Step j then
    uses H_L + s_j (H − H_L) with s_j = ‖h_T‖/‖ĥ_{T+j−1}‖ (H_L = the LTI part in the Krylov
    basis): a state that grows leaves the core behind (J → I ⊗ Ā), a settled state keeps J_T.
    """
    if kry is None:
        return None
    m = kry.H.shape[0]
    N0 = float(total_norm[T])
    if m == 0 or kry.beta == 0:
        return ForecastModel("Jacobian", np.full(J + 1, N0), np.zeros(J + 1), RATE_FLOOR, N0, True,
                             "the residual r_T is exactly zero")
    if not np.all(np.isfinite(kry.H)):
        return None
    HL = lti_part if lti_part is not None and np.all(np.isfinite(lti_part)) else None
    K = None if HL is None else kry.H - HL

    def run(steps: int):
        e = np.zeros(m)
        e[0] = kry.beta
        y = np.zeros(m)
        norms, residual = np.empty(steps + 1), np.empty(steps + 1)
        norms[0], residual[0] = N0, kry.beta
        with np.errstate(over="ignore", invalid="ignore"):
            for j in range(1, steps + 1):
                if K is None:
                    e = kry.H @ e
                else:
                    scale = min(N0 / max(norms[j - 1], 1e-300), 10.0)
                    e = HL @ e + scale * (K @ e)
                y = y + e
                residual[j] = float(np.linalg.norm(e))
                norms[j] = _sum_norm(N0, kry.c, y)
                if not math.isfinite(norms[j]):
                    norms[j:], residual[j:] = math.inf, math.inf
                    break
        return norms, residual

    norms, residual = run(J)
    rho = float(np.abs(kry.ritz[0]))
    limit = None
    if _tail_rate(residual) < 0:
        long_norms, long_res = run(max(4 * J, 2000))
        if np.isfinite(long_res[-1]) and long_res[-1] <= 1e-8 * max(long_norms[-1], 1e-300):
            limit = float(long_norms[-1])
    sig = "" if sigma is None else f"‖J_T‖₂ ≥ {_fmt(sigma)}, "
    detail = (f"{sig}ρ(J_T) ≈ {_fmt(rho)} (Arnoldi, {kry.products} products from r_T"
              f"{', invariant subspace' if kry.exact else ''}"
              f"{'; the core part rescaled by ‖h_T‖/‖h_t‖ (pre-norm blocks)' if K is not None else ''})")
    if np.isfinite(hindcast):
        detail += f"; J_(T−1) r_(T−1) reproduces r_T within {_fmt(hindcast)} relative error"
    return ForecastModel("Jacobian", norms, residual, _tail_rate(residual), limit, True, detail, hindcast)


# ---- combination ----------------------------------------------------------------------------------

def combine(traj, models: list[ForecastModel | None], horizon: int, explosion_factor: float = 10.0,
            settle_tol: float = 1e-2, extra_evidence: list[str] | None = None,
            nonfinite_weights: list[str] | None = None) -> Forecast:
    """The envelope of the models, the safety check and the verdict (module docstring)."""
    T = traj.n_loops
    H = int(horizon)
    eps = math.log(2.0) / max(H - T, 4)
    extra = list(extra_evidence or [])

    # non-finite: no forecast needed
    bad_t = traj.nonfinite_at
    if nonfinite_weights or bad_t is not None:
        first = 1 if nonfinite_weights and bad_t is None else max(bad_t or 1, 1)
        norms = np.full(H, math.nan)
        rel = np.full(H, math.nan)
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
                        why + extra, "non-finite", eps, explosion_factor, [m for m in models if m])

    scale = traj.state_norm[T] / traj.total_norm[T] if traj.total_norm[T] > 0 else 1.0
    models = [m for m in models if m is not None]
    used = [m for m in models if m.used]
    exact = [m for m in used if m.name == "LTI" and m.hindcast_error <= EXACT_HINDCAST]
    if exact:  # the loop is the LTI system to measurement precision: its forecast is exact
        for m in used:
            if m not in exact:
                m.used = False
                m.detail += "; set aside: the LTI surrogate reproduces the measured loops exactly"
        used = exact
    J = H - T
    units = {m.name: m.in_state_units(scale) for m in used}
    N1 = float(traj.state_norm[1]) if T >= 1 else float(traj.state_norm[0])
    rates = [m.tail_rate for m in used if np.isfinite(m.tail_rate) or m.tail_rate > 0]
    growth = max(rates) if rates else math.nan
    if used and all(m.tail_rate < -eps for m in used):
        limits = [units[m.name][1] for m in used if units[m.name][1] is not None and np.isfinite(units[m.name][1])]
        N_ref = max([N1] + limits)
    else:
        N_ref = N1
    N_ref = max(N_ref, 1e-30)
    limit = explosion_factor * N_ref

    # envelope over the forecast window (index j = t − T), in mean token norms
    if J > 0 and used:
        env_state = np.max(np.stack([units[m.name][0][: J + 1] for m in used]), axis=0)
        env = np.max(np.stack([m.total_norm[: J + 1] for m in used]), axis=0)
        env_res = np.max(np.stack([m.residual[: J + 1] for m in used]), axis=0)
    else:
        env_state = np.full(max(J, 0) + 1, traj.state_norm[T])
        env = np.full(max(J, 0) + 1, traj.total_norm[T])
        env_res = np.full(max(J, 0) + 1, traj.total_residual[T])
    measured = traj.state_norm[1: T + 1]
    first_unsafe = None
    for t in range(1, min(T, H) + 1):
        if not np.isfinite(measured[t - 1]) or measured[t - 1] > limit:
            first_unsafe = t
            break
    crossing_model = "trajectory"
    if first_unsafe is None and J > 0:
        crossings = [(_crossing(units[m.name][0], min(limit, OVERFLOW)), m) for m in used]
        crossings = [(j, m) for j, m in crossings if j is not None and j <= J]
        if crossings:
            j, m = min(crossings, key=lambda x: (x[0], -float(units[x[1].name][0][x[0]])))
            first_unsafe, crossing_model = T + j, m.name
    max_safe = H if first_unsafe is None else first_unsafe - 1

    rel_H = float(env_res[-1] / env[-1]) if env[-1] > 0 and np.isfinite(env[-1]) else math.inf
    if not np.isfinite(growth):
        growth_cmp = math.inf if growth > 0 else 0.0
    else:
        growth_cmp = growth
    binding = max(used, key=lambda m: m.tail_rate) if used else None
    if first_unsafe is not None:
        verdict = "marginal" if abs(growth_cmp) <= eps else "explosive"
        decided = crossing_model if verdict == "explosive" else (binding.name if binding else "trajectory")
    else:
        verdict = "stable" if rel_H <= settle_tol else "marginal"
        decided = binding.name if binding else "trajectory"

    # curves in state_norm units, loops 1..H
    state = np.empty(H)
    rel = np.empty(H)
    upto = min(T, H)
    state[:upto] = traj.state_norm[1: upto + 1]
    rel[:upto] = traj.rel_residual[1: upto + 1]
    if J > 0:
        state[T:] = env_state[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel[T:] = np.where(env[1:] > 0, env_res[1:] / env[1:], 0.0)

    # evidence, the deciding model first
    rate_txt = f"growth rate {_fmt(growth)}/loop, marginal band ±{_fmt(eps)}"
    if first_unsafe is not None:
        how = "grows exponentially" if growth_cmp > eps else "drifts" if verdict == "marginal" else "bursts"
        outcome = (f"the state {how} past {explosion_factor:g}× its natural scale at loop {first_unsafe} "
                   f"({rate_txt})")
    elif verdict == "stable":
        outcome = (f"the state settles within {_loops(H)} (relative residual {_fmt(rel_H)} ≤ {settle_tol:g} "
                   f"at loop {H}; {rate_txt})")
    else:
        outcome = (f"the state stays bounded but does not settle within {_loops(H)} (relative residual "
                   f"{_fmt(rel_H)} > {settle_tol:g} at loop {H}; {rate_txt})")
    if first_unsafe is not None and first_unsafe <= T:
        detail = (f"the measured state already exceeds {explosion_factor:g}× its natural scale at loop "
                  f"{first_unsafe} (‖h‖ {_fmt(traj.state_norm[first_unsafe])} vs limit {_fmt(limit)})")
    else:
        detail = next((m.detail for m in models if m.name == decided), "measured trajectory")
    summary = f"{decided}: {detail}; {outcome}"
    evidence = [summary]
    for m in models:
        if m.name != decided:
            evidence.append(f"{m.name}: {m.detail}" + ("" if m.used or "not used" in m.detail else " (not used)"))
    evidence += extra
    return Forecast(verdict, growth if np.isfinite(growth) else (math.inf if growth > 0 else math.nan),
                    max_safe, H, T, state, rel, limit, evidence, decided, eps, explosion_factor, models)


def forecast(model, idx: torch.Tensor, max_loops: int, measured_loops: int | None = None, *,
             explosion_factor: float = 10.0, settle_tol: float = 1e-2, krylov_dim: int = 8,
             lyapunov_k: int = 2, cost: Cost | None = None) -> Forecast:
    """Measure the loop for `measured_loops` loops (default min(μ_rec, max_loops)) on idx and
    forecast the state to `max_loops` loops (see the module docstring for the models, the
    definition of safe and the verdict). lyapunov_k > 0 adds finite-time Lyapunov exponents
    over the measured loops as corroborating evidence."""
    from loopdyn.dynamics.lyapunov_exponents import LyapunovAccumulator
    from loopdyn.dynamics.trajectory import measure_trajectory

    require_loop(model)
    H = int(max_loops)
    T = min(model.mean_loops, H) if measured_loops is None else int(measured_loops)
    if T < 1 or H < T:
        raise ValueError(f"need 1 ≤ measured_loops ≤ max_loops, got {T} and {H}")
    cost = cost if cost is not None else Cost()
    bad = nonfinite_parameters(model)
    traj = measure_trajectory(model, idx, T, cost=cost)
    states, ctx = traj.states, traj.ctx
    extra = []
    if bad or traj.nonfinite_at is not None:
        return combine(traj, [], H, explosion_factor, settle_tol, nonfinite_weights=bad)
    spec = injection_spectrum(model, horizon=H)
    acc = LyapunovAccumulator(states[0].shape, lyapunov_k) if lyapunov_k > 0 else None
    hindcast = math.nan
    for t in range(T if acc is not None else 0):
        lin = Linearisation(model, ctx, states[t], cost)
        acc.update(lin)
        if t == T - 1 and t >= 1:
            hindcast = jacobian_hindcast(lin, states, t)
    if acc is not None:
        extra.append(lyapunov_evidence(acc.result()))
    return forecast_from(model, traj, spec, H, krylov_dim=krylov_dim, explosion_factor=explosion_factor,
                         settle_tol=settle_tol, extra_evidence=extra, jacobian_hindcast=hindcast, cost=cost)


def jacobian_hindcast(lin: Linearisation, states: list[torch.Tensor], t: int) -> float:
    """‖J_t r_t − r_{t+1}‖/‖r_{t+1}‖ with J_t linearised at h_t (one product)."""
    r_t = (states[t] - states[t - 1]).to(torch.float64)
    r_next = (states[t + 1] - states[t]).to(torch.float64)
    denom = float(r_next.norm())
    if denom == 0 or float(r_t.norm()) == 0:
        return math.nan
    return float((lin.jvp(r_t).to(torch.float64) - r_next).norm()) / denom


def lyapunov_evidence(lyap) -> str:
    lam = float(lyap.exponents[0]) if len(lyap.exponents) else math.nan
    trend = ("perturbations grow along the trajectory" if lam > 0.01 else
             "perturbations shrink along the trajectory" if lam < -0.01 else "perturbations neither grow nor shrink")
    return (f"Lyapunov: λ₁ = {_fmt(lam)}/loop over {lyap.loops} loops ({trend}; "
            f"k = {len(lyap.exponents)}: {', '.join(_fmt(x) for x in lyap.exponents)})")


def forecast_from(model, traj, spec: InjectionSpectrum, horizon: int, *, krylov: KrylovResult | None = None,
                  krylov_dim: int = 8, explosion_factor: float = 10.0, settle_tol: float = 1e-2,
                  extra_evidence: list[str] | None = None, sigma_T: float | None = None,
                  jacobian_hindcast: float = math.nan, cost: Cost | None = None) -> Forecast:
    """The forecast from a measured trajectory (with states) and the injection spectrum; runs the
    Arnoldi at h_T unless `krylov` is given."""
    T, H = traj.n_loops, int(horizon)
    states = traj.states
    J_int = max(H - T, 4)  # models run at least 4 loops ahead so rates exist even when H = T
    traj_m = trajectory_model(states, traj.total_norm, traj.total_residual, J_int)
    lti_m = lti_model(model, states, traj.total_norm, traj.total_residual, spec, J_int)
    if krylov is None and krylov_dim > 0:
        r_T = states[T] - states[T - 1]
        lin = Linearisation(model, traj.ctx, states[T], cost)
        krylov = krylov_at(lin, states[T], r_T, min(krylov_dim, r_T.numel()))
        del lin
    lti_part = None
    part = protocol.linear_part(model)
    if krylov is not None and part is not None and protocol.state_norm_kind(model) == "none" \
            and getattr(getattr(model, "config", None), "block", "prenorm") == "prenorm" and part.A.is_finite():
        lti_part = lti_projection(krylov, part.A)
    jac_m = jacobian_model(krylov, traj.total_norm, T, J_int, sigma_T, jacobian_hindcast, lti_part)
    return combine(traj, [traj_m, lti_m, jac_m], H, explosion_factor, settle_tol, extra_evidence)
