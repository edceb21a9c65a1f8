"""The Jacobian model: r_T propagated under the linearisation J_T at h_T, in Krylov spaces.

Arnoldi on J_T from r_T gives H = Vᵀ J_T V and r_{T+j} ≈ V Hʲ Vᵀ r_T (exact for j below the Krylov
dimension); the run is continued from `n_random` random vectors (orthogonal to everything before)
so that a mode r_T does not excite is still found: its *converged* Ritz values (relative residual
≤ 5%: true eigenvalues of J_T; unconverged Ritz values of a non-normal J can lie outside its
spectrum and are not used) enter the model's rate. When the large-state limit of the loop is Ā,
the core's part K = H − Vᵀ(I ⊗ Ā)V is scaled by ‖h_T‖/‖ĥ_{T+j−1}‖ along the prediction (a pre-norm
sublayer reads its input through a norm, so its Jacobian falls like 1/‖h‖).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from loopdyn.dynamics.forecasting.common import Measured, TokenNorms, long_rate, propagate, rel_error
from loopdyn.dynamics.forecasting.result import ForecastModel
from loopdyn.dynamics.jacobian import arnoldi, ritz_values
from loopdyn.dynamics.loopmap import Linearisation
from loopdyn.dynamics.numbers import fmt
from loopdyn.dynamics.verdict import UNIT_BAND
from loopdyn.models.weights import all_finite

@dataclass(frozen=True)
class KrylovResult:
    """Arnoldi on the frozen Jacobian J_T from r_T (used by the audit's Jacobian sweep)."""

    H: np.ndarray  # m × m Hessenberg (square part)
    beta: float  # ‖r_T‖
    c: np.ndarray  # V_mᵀ h_T
    ritz: np.ndarray  # eigenvalues of H, by decreasing modulus
    exact: bool  # an invariant subspace was found
    products: int
    basis: list = field(default_factory=list, repr=False)  # q_0..q_m (float64 tensors)
    Hbar: np.ndarray | None = field(default=None, repr=False)  # the (m+1) × m Hessenberg matrix

    def head(self, steps: int) -> "KrylovResult":
        """The result of the first `steps` steps of this run: exactly what a `steps`-step run from
        the same vector gives (step j of Arnoldi only uses q_0..q_j), without its products."""
        m = self.H.shape[1]
        if steps >= m:
            return self
        Hbar = self.Hbar[: steps + 1, : steps]
        H = Hbar[:steps, :steps]
        return KrylovResult(H, self.beta, self.c[:steps], ritz_values(H), False, steps, self.basis[: steps + 1], Hbar)

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
    return KrylovResult(H, beta, c, ritz_values(H) if m else np.array([0j]), exact, m, Q, Hbar)


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


@dataclass(frozen=True)
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


def jacobian_subspace(lin: Linearisation | None, r: torch.Tensor, steps: int, n_random: int = 2,
                      random_steps: int = 4, seed: int = 0, krylov: KrylovResult | None = None) -> Subspace:
    """Arnoldi on J from r (or the given KrylovResult's basis), continued from `n_random` random
    vectors for `random_steps` steps each, every new vector orthogonal to all before. `lin` may be
    None when `krylov` is given and n_random is 0 (no product is made then)."""
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
    for _ in range(n_random):
        x = torch.randn(r.shape, generator=g, dtype=dtype).to(r.device)  # a random state
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
        empty = torch.zeros((0, *r.shape), dtype=dtype)
        return Subspace(empty, empty.clone(), np.zeros((0, 0)), products, 0)
    Vt, JVt = torch.stack(V), torch.stack(JV)
    n = Vt.shape[0]
    H = (Vt.reshape(n, -1) @ JVt.reshape(n, -1).T).numpy()
    return Subspace(Vt, JVt, H, products, from_r)


def _jacobian_propagator(sub: Subspace, HL: np.ndarray | None, N0: float):
    """z ↦ H z (frozen), or z ↦ (H_L + s K) z with s = min(N0/‖ĥ‖, 10) (a pre-norm core: its Jacobian falls like 1/‖h‖)."""
    if HL is None:
        return lambda z, _N: sub.H @ z
    K = sub.H - HL

    def step(z, N):
        s = min(N0 / max(N, 1e-300), 10.0)
        return HL @ z + s * (K @ z)
    return step


def jacobian_model(sub: Subspace, sub0: Subspace | None, data: Measured, J: int, HL: np.ndarray | None,
                   HL0: np.ndarray | None, sigma: float | None = None, rho_A: float = math.nan) -> ForecastModel | None:
    """Propagate r_T in the Krylov space of r_T under J_T ; `sub0` at h_{T−w} gives
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
    norms = TokenNorms(core.V.reshape(k, *shape), data.h[T])
    z0 = (core.V.reshape(k, -1) @ data.r(T).reshape(-1)).numpy()
    HLk = None if HL is None else HL[:k, :k]
    step = _jacobian_propagator(core, HLk, norms.N0)
    total, tok, res, _ = propagate(z0, step, norms, J)
    rate_prop, limit_total = long_rate(z0, step, norms)
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
        norms0 = TokenNorms(c0.V.reshape(k0, *shape), data.h[t0])
        step0 = _jacobian_propagator(c0, None if HL0 is None else HL0[:k0, :k0], norms0.N0)
        errs, y = [], np.zeros_like(z)
        for t in range(t0 + 1, T + 1):
            z = step0(z, norms0.total(y))
            y = y + z
            pred = (V0.T @ torch.from_numpy(z)).reshape(shape)
            errs.append(rel_error(pred, data.r(t), data.floor(t)))
        hind = max(errs)
    lead = lam[conv] if conv else lam
    sig = "" if sigma is None else f"‖J_T‖₂ ≥ {fmt(sigma)}, "
    detail = (f"{sig}J_T on the Krylov space of r_T ({k} vectors) and of {sub.n - sub.from_r} vectors from "
              f"random starts ({sub.products} products): "
              + (f"converged Ritz values up to |λ| {fmt(rho_conv)}" if conv else
                 f"no converged Ritz value (largest Ritz |λ| {fmt(float(np.abs(lam[0])) if lam.size else math.nan)})")
              + ("; the core part scaled by ‖h_T‖/‖h_t‖ (its Jacobian falls like 1/‖h‖)" if HL is not None else ""))
    return ForecastModel("Jacobian", total, res, tok, rate, np.asarray(lead), detail, hind, limit, exact_rate=exact)
