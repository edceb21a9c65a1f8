"""The LTI surrogate of the loop: h_{t+1} = Ā h_t + B̄ e (+ b), the injection without the core.

`injection_spectrum(model)` reports, for Ā (ds × ds, per token; on a whole sequence the
operator is I ⊗ Ā with the same spectrum):

* ‖Ā‖₂ (one-step amplification), ρ(Ā) (the asymptotic rate), the eigenvalues;
* the transient ‖Āᵏ‖₂ for k = 0..horizon and its maximum over 1 ≤ k ≤ horizon (a measured
  lower bound on sup_k ‖Āᵏ‖₂);
* the Kreiss constant K(Ā) = sup_{|z|>1} (|z|−1)·‖(zI−Ā)⁻¹‖₂ and the Kreiss bound. The
  Kreiss matrix theorem (with Spijker's constant) gives K ≤ sup_{k≥0} ‖Āᵏ‖₂ ≤ e·n·K, so
  e·n·K bounds the transient growth over *all* loop counts, including those beyond the
  horizon. K is estimated on a grid of radii and angles refined by a local search (an
  estimate from below of the supremum). The reported `kreiss_bound` is
  max(transient_max, 1, min(e·n·K, √κ(P))), where √κ(P) (P the discrete Lyapunov solution
  of ĀᵀPĀ − P = −I) is a second, rigorous bound on sup_k ‖Āᵏ‖₂ that is often tighter. For a normal Ā (diagonal,
  identity) the closed form sup_k ‖Āᵏ‖ = max(1, ρ)^∞ is used: K = bound = 1 when ρ ≤ 1.
  When ρ > 1 the powers are unbounded and K = bound = ∞ (JSON null).
* the fixed point h* = (I − Ā)⁻¹(B̄e + b) when I − Ā is invertible, and the gain
  ‖(I − Ā)⁻¹B̄‖₂ (h* per unit of e);
* settle_loops: the smallest t with ‖Āᵗ‖₂ ≤ tol. Because h_t − h* = Āᵗ(h_0 − h*), after that
  many loops the LTI state is within tol·‖h_0 − h*‖ of h* for *every* input; from the zero
  initial state that is ‖h_t − h*‖ ≤ tol·‖h*‖. None when ρ ≥ 1 (never settles).

Methods: closed form for diagonal (ρ = ‖Ā‖ = max|a_i|, ‖Āᵏ‖ = ρᵏ, settle = ⌈log tol / log ρ⌉)
and identity; dense numpy for a linear injection up to `dense_limit` state channels;
matrix-free above it (ARPACK `svds`/`eigs` on a LinearOperator, the transient from a block of
random vectors, which is a lower bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import linalg as sla
from scipy import optimize
from scipy.sparse.linalg import LinearOperator, eigs, svds

from loopdyn.models import protocol
from loopdyn.models.sizes import DENSE_LIMIT, SVD_LIMIT  # dense-size limits: models/sizes.py

_BATCHED_RESOLVENT_LIMIT = 128  # Kreiss grid by batched SVD up to this size, Schur + inverse iteration above
_MAX_SETTLE = 2 ** 40


@dataclass
class InjectionSpectrum:
    """Spectral facts of the injection's state operator Ā (see the module docstring).

    Units: norms are operator 2-norms (amplification per loop); loops are loop counts.
    """

    kind: str  # "diagonal" | "dense" | "identity" (the structure of Ā)
    n: int  # state channels ds
    method: str  # "closed-form" | "dense" | "matrix-free"
    spectral_norm: float  # ‖Ā‖₂
    spectral_radius: float  # ρ(Ā)
    eigenvalues: np.ndarray  # complex, by decreasing modulus (top few only when matrix-free)
    horizon: int
    transient: np.ndarray  # ‖Āᵏ‖₂ for k = 0..horizon (lower bounds when matrix-free)
    transient_max: float  # max over 1 ≤ k ≤ horizon
    transient_peak: int  # the k attaining it
    kreiss_constant: float  # K(Ā) (NaN when not computed)
    kreiss_bound: float  # upper bound on sup_k ‖Āᵏ‖₂ (∞ when ρ > 1 or unknown)
    settle_loops: int | None  # smallest t with ‖Āᵗ‖₂ ≤ tol, None if never
    tol: float
    input_norm: float  # ‖B̄‖₂
    fixed_point_gain: float | None  # ‖(I − Ā)⁻¹B̄‖₂, None if I − Ā is singular
    fixed_point: torch.Tensor | None = field(default=None, repr=False)  # h* for the given e
    notes: list = field(default_factory=list)
    absent: bool = False  # the model has no LTI part (no injection): every number is NaN

    @property
    def stable(self) -> bool:
        """The LTI surrogate converges for every input: ρ(Ā) < 1."""
        return bool(self.spectral_radius < 1.0)

    def to_json(self) -> dict:
        """The docs/design.md §7 `injection` record; for a loop with no LTI part, nulls and `skipped`."""
        if self.absent:
            return {"spectral_norm": None, "spectral_radius": None, "eigenvalues": [], "transient_max": None,
                    "kreiss_bound": None, "settle_loops": None, "stable": None, "skipped": self.notes[0]}
        return {
            "spectral_norm": float(self.spectral_norm),
            "spectral_radius": float(self.spectral_radius),
            "eigenvalues": [[float(z.real), float(z.imag)] for z in np.asarray(self.eigenvalues)],
            "transient_max": float(self.transient_max),
            "kreiss_bound": float(self.kreiss_bound),
            "settle_loops": None if self.settle_loops is None else int(self.settle_loops),
            "stable": self.stable,
        }


# ---- dense helpers ---------------------------------------------------------------------------

def norm2(M: np.ndarray) -> float:
    """Spectral norm of a dense matrix: full SVD when small, else √λ_max of the smaller Gram
    matrix (the largest eigenvalue keeps full relative accuracy, at a third of an SVD's cost)."""
    if not np.all(np.isfinite(M)):
        return math.inf
    if min(M.shape) <= SVD_LIMIT:
        return float(np.linalg.norm(M, 2))
    gram = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
    return float(math.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))


def power_norms(A: np.ndarray, horizon: int) -> np.ndarray:
    """‖Aᵏ‖₂ for k = 0..horizon, exactly (dense powers)."""
    out = np.empty(horizon + 1)
    out[0] = 1.0
    P = np.eye(A.shape[0])
    for k in range(1, horizon + 1):
        P = P @ A
        out[k] = norm2(P)
        if not math.isfinite(out[k]):
            out[k:] = math.inf
            break
    return out


def _sigma_min_batched(Z: np.ndarray, A: np.ndarray) -> np.ndarray:
    n = A.shape[0]
    out = np.empty(len(Z))
    eye = np.eye(n)
    for lo in range(0, len(Z), 256):
        z = Z[lo: lo + 256]
        M = z[:, None, None] * eye - A[None]
        out[lo: lo + 256] = np.linalg.svd(M, compute_uv=False)[:, -1]
    return out


def _sigma_min_schur(Z: np.ndarray, T: np.ndarray, iters: int = 8) -> np.ndarray:
    """σ_min(zI − T) for upper-triangular T by inverse iteration with triangular solves."""
    n = T.shape[0]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    out = np.empty(len(Z))
    for i, z in enumerate(Z):
        M = z * np.eye(n, dtype=complex) - T
        x = x0 / np.linalg.norm(x0)
        est = 0.0
        for _ in range(iters):
            y = sla.solve_triangular(M, x)
            x = sla.solve_triangular(M, y, trans="C")
            est = np.linalg.norm(x)
            if not np.isfinite(est) or est == 0:
                break
            x = x / est
        out[i] = 1.0 / math.sqrt(est) if est > 0 and np.isfinite(est) else 0.0
    return out


def kreiss_constant(A: np.ndarray, eigenvalues: np.ndarray | None = None) -> float:
    """K(A) = sup_{|z|>1} (|z| − 1)·‖(zI − A)⁻¹‖₂, estimated from below.

    Grid: |z| − 1 log-spaced from (1 − ρ)·10⁻³ to 10³, angles uniform plus the arguments of the
    largest eigenvalues; for n ≤ 128 the best grid points are refined by Nelder–Mead. σ_min(zI − A)
    comes from batched SVDs (n ≤ 128) or from inverse iteration on the Schur form (larger n).
    ∞ when ρ(A) ≥ 1 (a pole of the resolvent on or outside the unit circle), except that a
    normal A with ρ = 1 has K = 1. Always ≥ 1 (the limit |z| → ∞).
    """
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0]
    lam = np.linalg.eigvals(A) if eigenvalues is None else np.asarray(eigenvalues)
    rho = float(np.max(np.abs(lam))) if n else 0.0
    if rho >= 1.0:
        return 1.0 if rho == 1.0 and np.allclose(A @ A.T, A.T @ A) else math.inf
    small = n <= _BATCHED_RESOLVENT_LIMIT
    T = None if small else sla.schur(A, output="complex")[0]
    n_r, n_a, n_e = (12, 32, 16) if small else (6, 16, 8)
    s = np.geomspace(max((1.0 - rho) * 1e-3, 1e-12), 1e3, n_r)
    top = lam[np.argsort(-np.abs(lam), kind="stable")][:n_e]
    theta = np.concatenate([np.linspace(0, 2 * np.pi, n_a, endpoint=False), np.angle(top)])
    S, TH = np.meshgrid(s, theta, indexing="ij")
    Z = ((1.0 + S) * np.exp(1j * TH)).ravel()

    def sigma_min(z: np.ndarray) -> np.ndarray:
        return _sigma_min_batched(z, A) if small else _sigma_min_schur(z, T)

    sig = sigma_min(Z)
    vals = np.where(sig > 0, S.ravel() / np.maximum(sig, 1e-300), math.inf)
    if not np.all(np.isfinite(vals)):
        return math.inf
    best = float(vals.max())
    if small:
        def objective(x):
            ls, th = x
            sm = sigma_min(np.array([(1.0 + math.exp(ls)) * np.exp(1j * th)]))[0]
            return -math.exp(ls) / sm if sm > 0 else -math.inf

        for i in np.argsort(vals)[::-1][:2]:
            res = optimize.minimize(objective, [math.log(S.ravel()[i]), TH.ravel()[i]], method="Nelder-Mead",
                                    options={"xatol": 1e-3, "fatol": 1e-9, "maxiter": 120})
            if np.isfinite(res.fun):
                best = max(best, -float(res.fun))
    return max(best, 1.0)


def lyapunov_power_bound(A: np.ndarray) -> float:
    """A rigorous bound sup_k ‖Aᵏ‖₂ ≤ √κ(P), P the solution of AᵀPA − P = −I (ρ(A) < 1).

    P = Σ_k (Aᵏ)ᵀAᵏ ⪰ I and AᵀPA ⪯ P, so λ_min(P)‖Aᵏx‖² ≤ xᵀ(Aᵏ)ᵀPAᵏx ≤ xᵀPx ≤ λ_max(P)‖x‖².
    ∞ if the Lyapunov solve fails or is not finite.
    """
    try:
        P = sla.solve_discrete_lyapunov(A.T, np.eye(A.shape[0]))
        ev = np.linalg.eigvalsh((P + P.T) / 2)
    except (np.linalg.LinAlgError, ValueError):
        return math.inf
    if not np.all(np.isfinite(ev)) or ev[0] <= 0:
        return math.inf
    return float(math.sqrt(ev[-1] / ev[0]))


def settle_loops_dense(A: np.ndarray, tol: float, transient: np.ndarray) -> int | None:
    """Smallest t with ‖Aᵗ‖₂ ≤ tol: scanned exactly up to the horizon, then by repeated
    squaring and bisection (exact when ‖Aᵏ‖ decreases past the horizon, which holds
    asymptotically for ρ < 1)."""
    if tol >= 1.0:
        return 0
    hit = np.nonzero(transient[1:] <= tol)[0]
    if hit.size:
        return int(hit[0] + 1)
    horizon = len(transient) - 1
    squares = [A]  # squares[i] = A^(2^i)
    while True:
        i = len(squares) - 1
        if 2 ** i > _MAX_SETTLE:
            return None
        if 2 ** i > horizon and norm2(squares[i]) <= tol:
            break
        nxt = squares[i] @ squares[i]
        if not np.all(np.isfinite(nxt)):
            return None
        squares.append(nxt)
    hi = 2 ** (len(squares) - 1)
    lo = max(horizon, hi // 2)

    def power(t: int) -> np.ndarray:
        P = np.eye(A.shape[0])
        bit = 0
        while t:
            if t & 1:
                P = P @ squares[bit]
            t >>= 1
            bit += 1
        return P

    while hi - lo > 1:
        mid = (lo + hi) // 2
        if norm2(power(mid)) <= tol:
            hi = mid
        else:
            lo = mid
    return hi


# ---- the spectrum ----------------------------------------------------------------------------

def _to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


def injection_spectrum(model, horizon: int = 64, tol: float = 1e-3, e: torch.Tensor | None = None,
                       dense_limit: int = DENSE_LIMIT) -> InjectionSpectrum:
    """Spectral report of the injection's Ā (and B̄); see the module docstring for the maths.

    horizon: loops over which the transient ‖Āᵏ‖ is tabulated; tol: relative settling
    tolerance; e: prelude output (B, S, d) for the fixed point h* (optional).
    """
    from loopdyn.dynamics.loopmap import require_loop

    require_loop(model)
    horizon = max(int(horizon), 1)
    part = protocol.linear_part(model)
    if part is None:
        return absent_spectrum(horizon, tol, f"model '{protocol.model_name(model)}' has no LTI part "
                                             "(no linear_part: a loop without an input injection)")
    return operator_spectrum(part, horizon, tol, e, dense_limit)


def operator_spectrum(part, horizon: int = 64, tol: float = 1e-3, e: torch.Tensor | None = None,
                      dense_limit: int = DENSE_LIMIT) -> InjectionSpectrum:
    """`injection_spectrum` of a `LinearPart` (Ā, B̄ as structured operators)."""
    A_op, B_op = part.A, part.B
    n = A_op.n_out
    notes: list[str] = []
    B_np = _to_numpy(B_op.dense())
    input_norm = B_op.norm()

    if A_op.normal:  # identity or diagonal: ‖Āᵏ‖₂ = ρᵏ exactly
        a = A_op.diagonal_numpy()
        if not np.all(np.isfinite(a)):
            return _nonfinite_spectrum(A_op.kind, n, horizon, tol, input_norm)
        mags = np.abs(a)
        rho = float(mags.max())
        order = np.argsort(-mags, kind="stable")
        eig = a[order].astype(complex)
        with np.errstate(over="ignore", invalid="ignore"):
            transient = rho ** np.arange(horizon + 1, dtype=float)
        transient[0] = 1.0
        K = 1.0 if rho <= 1.0 else math.inf
        bound = K
        if rho < 1.0:
            settle = 0 if tol >= 1 else (1 if rho == 0 else int(math.ceil(math.log(tol) / math.log(rho) - 1e-12)))
        else:
            settle = None
        denom = 1.0 - a
        gain_matrix = (B_np / denom[:, None]) if np.all(np.abs(denom) > 1e-12) else None
        fp_gain = None if gain_matrix is None else norm2(gain_matrix)
        method = "closed-form"
        spectral_norm = rho
    else:
        A = A_op.dense_numpy()
        finite = bool(np.all(np.isfinite(A)))
        if not finite:
            return _nonfinite_spectrum(A_op.kind, n, horizon, tol, input_norm)
        if n <= dense_limit:
            method = "dense"
            eig = np.linalg.eigvals(A)
            eig = eig[np.argsort(-np.abs(eig), kind="stable")]
            rho = float(np.abs(eig[0])) if n else 0.0
            spectral_norm = norm2(A)
            transient = power_norms(A, horizon)
            K = kreiss_constant(A, eig) if rho < 1.0 else math.inf
            settle = settle_loops_dense(A, tol, transient) if rho < 1.0 else None
            if math.isfinite(K):
                bound = max(min(math.e * n * K, lyapunov_power_bound(A)), 1.0, float(transient[1:].max()))
            else:
                bound = math.inf
        else:
            method = "matrix-free"
            op = LinearOperator((n, n), matvec=lambda x: A @ x, rmatvec=lambda x: A.T @ x, dtype=np.float64)
            rng = np.random.default_rng(0)
            spectral_norm = float(svds(op, k=1, tol=1e-8, return_singular_vectors=False, rng=rng)[0])
            eig = eigs(op, k=min(6, n - 2), which="LM", return_eigenvectors=False, tol=1e-8,
                       v0=rng.standard_normal(n))
            eig = eig[np.argsort(-np.abs(eig), kind="stable")]
            rho = float(np.abs(eig[0]))
            X = np.linalg.qr(rng.standard_normal((n, 8)))[0]
            transient = np.empty(horizon + 1)
            transient[0] = 1.0
            for k in range(1, horizon + 1):
                X = A @ X
                transient[k] = float(np.linalg.norm(X, 2))
            K = math.nan
            bound = 1.0 if spectral_norm <= 1.0 else math.inf
            hit = np.nonzero(transient[1:] <= tol)[0]
            settle = int(hit[0] + 1) if hit.size and rho < 1 else None
            notes.append("Ā handled matrix-free: transient from 8 random vectors (a lower bound); "
                         "Kreiss constant not computed")
        fp_gain = None
        if n <= dense_limit:
            M = np.eye(n) - A
            if np.linalg.cond(M) < 1e12:
                fp_gain = norm2(np.linalg.solve(M, B_np))

    peak = int(np.argmax(transient[1:]) + 1) if horizon >= 1 else 0
    fixed_point = None
    if e is not None:
        fixed_point = lti_fixed_point(part, e)
    return InjectionSpectrum(
        kind=A_op.kind, n=n, method=method, spectral_norm=float(spectral_norm), spectral_radius=float(rho),
        eigenvalues=np.asarray(eig), horizon=horizon, transient=np.asarray(transient, dtype=float),
        transient_max=float(transient[peak]), transient_peak=peak, kreiss_constant=float(K),
        kreiss_bound=float(bound), settle_loops=settle, tol=float(tol), input_norm=float(input_norm),
        fixed_point_gain=fp_gain, fixed_point=fixed_point, notes=notes)


def absent_spectrum(horizon: int, tol: float, why: str) -> InjectionSpectrum:
    """The record of a loop with no LTI part: every number NaN, `absent` set, `why` in the notes."""
    nan = math.nan
    return InjectionSpectrum(kind="none", n=0, method="absent", spectral_norm=nan, spectral_radius=nan,
                             eigenvalues=np.zeros(0, dtype=complex), horizon=horizon,
                             transient=np.full(horizon + 1, nan), transient_max=nan, transient_peak=0,
                             kreiss_constant=nan, kreiss_bound=nan, settle_loops=None, tol=tol,
                             input_norm=nan, fixed_point_gain=None, notes=[why], absent=True)


def _nonfinite_spectrum(kind: str, n: int, horizon: int, tol: float, input_norm: float) -> InjectionSpectrum:
    nan = math.nan
    return InjectionSpectrum(kind=kind, n=n, method="non-finite", spectral_norm=nan, spectral_radius=nan,
                             eigenvalues=np.zeros(0, dtype=complex), horizon=horizon,
                             transient=np.full(horizon + 1, nan), transient_max=nan, transient_peak=0,
                             kreiss_constant=nan, kreiss_bound=nan, settle_loops=None, tol=tol,
                             input_norm=input_norm, fixed_point_gain=None,
                             notes=["Ā has non-finite entries"])


def lti_fixed_point(part, e: torch.Tensor) -> torch.Tensor | None:
    """h* = (I − Ā)⁻¹(B̄e + b) per token, or None when I − Ā is singular (identity Ā)."""
    A_op, B_op = part.A, part.B
    bias = getattr(part, "bias", None)
    with torch.no_grad():
        rhs = B_op.apply(e.to(B_op.dtype or torch.float64))
        rhs = rhs.to(torch.float64)
        if bias is not None:
            rhs = rhs + bias.to(torch.float64)
        return A_op.shifted_solve(rhs)
