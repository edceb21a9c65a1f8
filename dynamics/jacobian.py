"""The loop Jacobian J = ∂F/∂h of one loop step F(h) = model.step(h, ctx), matrix-free.

`loop_jacobian(model, h, ctx)` is a `scipy.sparse.linalg.LinearOperator` on the flattened
state (N = B·S·ds entries, float64 interface over the model's float32 arithmetic): `rmatvec`
is a reverse-mode vector-Jacobian product and `matvec` a Jacobian-vector product by
reverse-over-reverse differentiation, both from one graph recorded at h (see
`loopdyn.dynamics.loopmap.Linearisation`; `torch.func.jvp` gives the same numbers, slower);
`matmat`/`rmatmat` batch columns with vmapped backward passes. The operator counts its
products (`matvecs`, `rmatvecs`).

Structure. Sequences of a batch do not interact, so J is block diagonal over the batch.
Within a sequence, causal attention lets token s read tokens s' ≤ s only, so in token order J
is block *lower triangular* with ds × ds blocks J_{ss'} = ∂F(h)_s/∂h_{s'}. Hence:

* the eigenvalues of J are exactly the union of the eigenvalues of the diagonal blocks J_ss,
  and ρ(J) = max_s ρ(J_ss);
* singular values do not decompose: ‖J‖₂ ≥ max_s ‖J_ss‖₂ (off-diagonal blocks add).

"Per token" means the diagonal block J_ss: how token s's next state responds to its own
current state with every other token's state held fixed (`loop_jacobian(..., token=(b, s))`).

Spectral helpers: `top_singular_values` (ARPACK `svds`, or Golub–Kahan–Lanczos
bidiagonalisation with a warm start, which needs few products), `top_eigenvalues` (ARPACK
`eigs`, or a short Arnoldi; Arnoldi on Jᵀ gives the same eigenvalues), and
`per_token_spectra`. `lti_jacobian` is the Jacobian of the LTI part alone, I ⊗ Ā, so that a
report can compare how much the nonlinear core adds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigs, svds

from loopdyn.dynamics import loopmap
from loopdyn.models import checks, protocol
from loopdyn.models.sizes import JACOBIAN_BLOCK_LIMIT
from loopdyn.dynamics.loopmap import Cost, Linearisation

# A Krylov direction smaller than this fraction of the column is round-off of float32 products
BREAKDOWN = 1e-6


class LoopJacobian(LinearOperator):
    """J = ∂ model.step(h, ctx)/∂h at h (whole sequence, or one diagonal token block).

    The torch-side methods `apply`, `apply_adjoint`, `apply_batch`, `apply_adjoint_batch` take
    and return tensors shaped like h (or (ds,) for a token block, with a leading axis for the
    batched ones); the LinearOperator methods take flat float64 numpy vectors. The graph of the
    linearisation is recorded on first use and reused by every product.
    """

    def __init__(self, model, h: torch.Tensor, ctx, token: tuple[int, int] | None = None,
                 cost: Cost | None = None, linearisation: Linearisation | None = None):
        loopmap.require_loop(model)
        checks.check_state(h, "h", checks.state_shape(model, ctx))
        self.model, self.ctx = model, ctx
        self.h = h.detach()
        self.token = token
        self.cost = cost if cost is not None else Cost()
        n = self.h.shape[-1] if token is not None else self.h.numel()
        super().__init__(dtype=np.float64, shape=(n, n))
        self.matvecs = 0
        self.rmatvecs = 0
        self._lin = linearisation

    @property
    def linearisation(self) -> Linearisation:
        if self._lin is None:
            self._lin = Linearisation(self.model, self.ctx, self.h, self.cost)
        return self._lin

    @property
    def output(self) -> torch.Tensor:
        """F(h), the next state."""
        return self.linearisation.output

    # -- torch side ------------------------------------------------------------------------
    def _embed(self, v: torch.Tensor, batch: bool = False) -> torch.Tensor:
        if self.token is None:
            shape = (v.shape[0], *self.h.shape) if batch else self.h.shape
            return v.reshape(shape).to(self.h.device, self.h.dtype)
        b, s = self.token
        full = torch.zeros((v.shape[0], *self.h.shape) if batch else self.h.shape, dtype=self.h.dtype,
                           device=self.h.device)
        full[..., b, s, :] = v.to(self.h.device, self.h.dtype)
        return full

    def _extract(self, y: torch.Tensor) -> torch.Tensor:
        if self.token is None:
            return y
        b, s = self.token
        return y[..., b, s, :]

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """J·v."""
        self.matvecs += 1
        return self._extract(self.linearisation.jvp(self._embed(v)))

    def apply_batch(self, V: torch.Tensor) -> torch.Tensor:
        """[J·V[i]] for V of shape (k, ...)."""
        self.matvecs += V.shape[0]
        return self._extract(self.linearisation.jvp_batch(self._embed(V, batch=True)))

    def apply_adjoint(self, w: torch.Tensor) -> torch.Tensor:
        """Jᵀ·w."""
        self.rmatvecs += 1
        return self._extract(self.linearisation.vjp(self._embed(w)))

    def apply_adjoint_batch(self, W: torch.Tensor) -> torch.Tensor:
        self.rmatvecs += W.shape[0]
        return self._extract(self.linearisation.vjp_batch(self._embed(W, batch=True)))

    # -- scipy side ------------------------------------------------------------------------
    def _from_numpy(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)).to(self.h.device, self.h.dtype)

    def _matvec(self, x):
        return self.apply(self._from_numpy(np.ravel(x))).to("cpu", torch.float64).reshape(-1).numpy()

    def _rmatvec(self, x):
        return self.apply_adjoint(self._from_numpy(np.ravel(x))).to("cpu", torch.float64).reshape(-1).numpy()

    def _matmat(self, X):
        V = self._from_numpy(np.asarray(X).T)
        return self.apply_batch(V).to("cpu", torch.float64).reshape(V.shape[0], -1).numpy().T

    def _rmatmat(self, X):
        W = self._from_numpy(np.asarray(X).T)
        return self.apply_adjoint_batch(W).to("cpu", torch.float64).reshape(W.shape[0], -1).numpy().T


def loop_jacobian(model, h: torch.Tensor, ctx, token: tuple[int, int] | int | None = None,
                  cost: Cost | None = None) -> LoopJacobian:
    """J = ∂ model.step(·, ctx)/∂h at h, as a LinearOperator (see the module docstring).

    token: None for the whole sequence (N = B·S·ds), or (b, s) (an int s means b = 0) for the
    diagonal block J_ss of that token (ds × ds).
    """
    if isinstance(token, int):
        token = (0, token)
    return LoopJacobian(model, h, ctx, token=token, cost=cost)


class LTIJacobian(LinearOperator):
    """The Jacobian of the LTI part alone: I ⊗ Ā on a state of shape `state_shape` (…, ds)."""

    def __init__(self, model, state_shape):
        loopmap.require_loop(model)
        part = protocol.linear_part(model)
        if part is None:
            raise loopmap.DynamicsError(f"model '{protocol.model_name(model)}' has no LTI part (no linear_part): "
                                        "its loop has no injection Ā")
        self.A = part.A
        self.state_shape = tuple(state_shape)
        n = int(np.prod(self.state_shape))
        super().__init__(dtype=np.float64, shape=(n, n))

    def _matvec(self, x):
        v = torch.from_numpy(np.ravel(x).astype(np.float64)).reshape(self.state_shape)
        return self.A.apply(v.to(self._device(), self._dtype())).to("cpu", torch.float64).reshape(-1).numpy()

    def _rmatvec(self, x):
        v = torch.from_numpy(np.ravel(x).astype(np.float64)).reshape(self.state_shape).to(self._device(), self._dtype())
        return self.A.apply_adjoint(v).to("cpu", torch.float64).reshape(-1).numpy()

    def _dtype(self):
        return self.A.dtype or torch.float32

    def _device(self):
        return self.A.device or "cpu"


def lti_jacobian(model, state_shape) -> LTIJacobian:
    """I ⊗ Ā on states of `state_shape`; its spectrum is Ā's (see `injection_spectrum`)."""
    return LTIJacobian(model, state_shape)


# ---- Krylov methods in torch (few products, warm starts) ---------------------------------------

@dataclass
class SpectralEstimate:
    """Leading singular values or eigenvalues of an operator, and what they cost."""

    values: np.ndarray  # singular values (descending) or complex eigenvalues (by decreasing modulus)
    method: str
    matvecs: int
    rmatvecs: int
    vector: torch.Tensor | None = field(default=None, repr=False)  # top right singular vector (warm start)
    converged: bool = True


def golub_kahan(apply, apply_adjoint, v0: torch.Tensor, steps: int,
                image0: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor, int, int]:
    """Golub–Kahan–Lanczos bidiagonalisation from v0 (full reorthogonalisation, float64 recurrences).

    After m steps (m products with J and m − 1 with Jᵀ) the singular values of the m × m
    upper-bidiagonal B_m are Ritz values of J: each is ≤ the corresponding singular value of J,
    and the largest converges fast (like Lanczos on JᵀJ). `image0` = J·v0, when already known,
    saves the first product. Returns (σ of B_m descending, the top right Ritz vector, products
    made with J, products made with Jᵀ).
    """
    dtype = torch.float64
    v = v0.to(dtype)
    norm0 = v.norm()
    v = v / norm0
    V, U, alphas, betas = [v], [], [], []
    n_j = n_jt = 0
    if image0 is None:
        u = apply(v).to(dtype)
        n_j += 1
    else:
        u = image0.to(dtype) / norm0
    for k in range(steps):
        for q in U:
            u = u - (q * u).sum() * q
        alpha = float(u.norm())
        alphas.append(alpha)
        if alpha == 0.0 or not math.isfinite(alpha):
            break
        u = u / alpha
        U.append(u)
        if k == steps - 1:
            break
        w = apply_adjoint(u).to(dtype) - alpha * V[-1]
        n_jt += 1
        for q in V:
            w = w - (q * w).sum() * q
        beta = float(w.norm())
        if beta <= BREAKDOWN * max(alpha, 1e-300) or not math.isfinite(beta):
            break
        betas.append(beta)
        v = w / beta
        V.append(v)
        u = apply(v).to(dtype) - beta * U[-1]
        n_j += 1
    m = len(alphas)
    B = np.zeros((m, m))
    B[np.arange(m), np.arange(m)] = alphas
    for i, b in enumerate(betas[: m - 1]):
        B[i, i + 1] = b
    if not np.all(np.isfinite(B)):
        return np.array([math.nan]), v0, n_j, n_jt
    _, s, vt = np.linalg.svd(B)
    top = sum(float(vt[0, i]) * V[i] for i in range(min(m, len(V))))
    return s, top, n_j, n_jt


def norm_lower_bound(lin, steps: int) -> tuple[np.ndarray, torch.Tensor, int, int]:
    """Ritz values of ‖J‖₂ (J linearised in `lin`, a loopmap.Linearisation set up with a start
    vector w0) by `steps` Golub–Kahan–Lanczos steps on Jᵀ from w0: the singular values of Jᵀ are
    those of J, and the first product Jᵀw0 came with the linearisation (`lin.vjp0`), so m steps
    cost m − 1 products with Jᵀ and m − 1 with J. Returns (σ descending, lower bounds; the top
    left Ritz vector of J, the warm start for a nearby linearisation; products with Jᵀ; with J)."""
    if lin.w0 is None:
        raise ValueError("norm_lower_bound needs a Linearisation set up with w0")
    return golub_kahan(lin.vjp, lin.jvp, lin.w0, steps, image0=lin.vjp0)


def arnoldi(apply, v0: torch.Tensor, steps: int) -> tuple[np.ndarray, list[torch.Tensor], float]:
    """Arnoldi from v0 with full (twice) Gram–Schmidt: returns the (m+1) × m Hessenberg matrix,
    the orthonormal basis [q_0..q_m] (float64 tensors) and ‖v0‖. Stops early on breakdown, when
    the new direction is below float32 round-off of the products (an invariant subspace to
    working precision: then the Hessenberg matrix is m × m)."""
    dtype = torch.float64
    beta0 = float(v0.to(dtype).norm())
    if beta0 == 0.0 or not math.isfinite(beta0):
        return np.zeros((1, 0)), [], beta0
    Q = [v0.to(dtype) / beta0]
    H = np.zeros((steps + 1, steps))
    m = 0
    for j in range(steps):
        w = apply(Q[j]).to(dtype)
        for _ in range(2):
            for i, q in enumerate(Q):
                c = float((q * w).sum())
                H[i, j] += c
                w = w - c * q
        hn = float(w.norm())
        m = j + 1
        if not math.isfinite(hn):
            H[:, j] = math.nan
            break
        H[j + 1, j] = hn
        scale = max(abs(H[: j + 2, j]).max(), 1e-300)
        if hn <= BREAKDOWN * scale:
            return H[: m, : m], Q, beta0
        Q.append(w / hn)
    return H[: m + 1, : m], Q, beta0


def ritz_values(H: np.ndarray) -> np.ndarray:
    """Eigenvalues of the square part of a Hessenberg matrix, by decreasing modulus."""
    m = H.shape[1]
    if m == 0 or not np.all(np.isfinite(H[:m, :m])):
        return np.array([math.nan + 0j])
    lam = np.linalg.eigvals(H[:m, :m])
    return lam[np.argsort(-np.abs(lam), kind="stable")]


def top_singular_values(J, k: int = 1, method: str = "svds", tol: float = 1e-6, steps: int = 20,
                        v0: torch.Tensor | np.ndarray | None = None, seed: int = 0) -> SpectralEstimate:
    """The k largest singular values of J (a LoopJacobian or any LinearOperator).

    method "svds": ARPACK (implicitly restarted Lanczos on JᵀJ) to relative accuracy `tol`.
    method "lanczos": `steps` Golub–Kahan steps from v0 (warm start; random if None): a lower
    bound that converges quickly for the top value, at steps J-products and steps − 1
    Jᵀ-products. `vector` is the top right singular vector, for warm-starting the next call.
    """
    m0, r0 = getattr(J, "matvecs", 0), getattr(J, "rmatvecs", 0)
    n = J.shape[0]
    if method == "svds":
        x0 = _np_start(v0, n, seed)
        if n <= k + 1:
            dense = J @ np.eye(n)
            s = np.linalg.svd(dense, compute_uv=False)[:k]
            vec = None
        else:
            _, s, vt = svds(J, k=k, tol=tol, v0=x0, return_singular_vectors="vh")
            order = np.argsort(-s)
            s, vec = s[order], torch.from_numpy(vt[order[0]].copy())
        return SpectralEstimate(np.asarray(s), "svds", getattr(J, "matvecs", 0) - m0,
                                getattr(J, "rmatvecs", 0) - r0, vec)
    if method != "lanczos":
        raise ValueError(f"unknown method {method!r}")
    apply, apply_t, shape = _torch_ops(J)
    start = _torch_start(v0, shape, seed, getattr(getattr(J, "h", None), "device", "cpu"))
    s, vec, nj, njt = golub_kahan(apply, apply_t, start, max(steps, k))
    return SpectralEstimate(np.asarray(s[:k]), f"lanczos({nj} steps)", nj, njt, vec)


def top_eigenvalues(J, k: int = 1, method: str = "eigs", tol: float = 1e-6, steps: int = 20,
                    v0: torch.Tensor | np.ndarray | None = None, adjoint: bool = False,
                    seed: int = 0) -> SpectralEstimate:
    """The k eigenvalues of J of largest modulus.

    method "eigs": ARPACK (implicitly restarted Arnoldi) to relative accuracy `tol`.
    method "arnoldi": `steps` Arnoldi steps from v0: Ritz values, whose largest modulus is an
    estimate (usually from below) of ρ(J). adjoint=True runs on Jᵀ (same eigenvalues, up to
    conjugation; cheaper reverse-mode products for a LoopJacobian).
    """
    n = J.shape[0]
    op = J.H if adjoint else J
    m0, r0 = getattr(J, "matvecs", 0), getattr(J, "rmatvecs", 0)
    if method == "eigs":
        if n <= k + 2:
            lam = np.linalg.eigvals(op @ np.eye(n))
        else:
            lam = eigs(op, k=k, which="LM", tol=tol, v0=_np_start(v0, n, seed), return_eigenvectors=False)
        lam = lam[np.argsort(-np.abs(lam), kind="stable")][:k]
        if adjoint:
            lam = np.conj(lam)
        return SpectralEstimate(lam, "eigs", getattr(J, "matvecs", 0) - m0, getattr(J, "rmatvecs", 0) - r0)
    if method != "arnoldi":
        raise ValueError(f"unknown method {method!r}")
    apply, apply_t, shape = _torch_ops(J)
    device = getattr(getattr(J, "h", None), "device", "cpu")
    H, _, _ = arnoldi(apply_t if adjoint else apply, _torch_start(v0, shape, seed, device), max(steps, k))
    lam = ritz_values(H)[:k]
    if adjoint:
        lam = np.conj(lam)
    return SpectralEstimate(lam, f"arnoldi({H.shape[1]} steps{', adjoint' if adjoint else ''})",
                            getattr(J, "matvecs", 0) - m0, getattr(J, "rmatvecs", 0) - r0)


def _torch_ops(J):
    if isinstance(J, LoopJacobian):
        shape = (J.h.shape[-1],) if J.token is not None else tuple(J.h.shape)
        return J.apply, J.apply_adjoint, shape
    n = J.shape[0]

    def apply(v):
        return torch.from_numpy(np.asarray(J.matvec(v.reshape(-1).numpy()), dtype=np.float64))

    def apply_t(v):
        return torch.from_numpy(np.asarray(J.rmatvec(v.reshape(-1).numpy()), dtype=np.float64))

    return apply, apply_t, (n,)


def _torch_start(v0, shape, seed, device="cpu"):
    if v0 is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    return torch.as_tensor(v0).to(device, torch.float64).reshape(shape)


def _np_start(v0, n, seed):
    if v0 is None:
        return np.random.default_rng(seed).standard_normal(n)
    return torch.as_tensor(v0).to("cpu", torch.float64).reshape(-1).numpy()


# ---- per-token and dense --------------------------------------------------------------------------

@dataclass
class PerTokenSpectra:
    """Spectral norm and radius of each diagonal token block J_ss (see the module docstring)."""

    tokens: list  # (b, s) pairs
    spectral_norm: np.ndarray
    spectral_radius: np.ndarray
    method: str
    matvecs: int


def token_block(model, h: torch.Tensor, ctx, token: tuple[int, int], cost: Cost | None = None) -> np.ndarray:
    """The dense ds × ds diagonal block J_ss, from ds forward-mode products in one vmapped batch."""
    J = loop_jacobian(model, h, ctx, token=token, cost=cost)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    cols = J.apply_batch(eye)  # row i = J_ss e_i
    return cols.detach().to("cpu", torch.float64).numpy().T


def per_token_spectra(model, h: torch.Tensor, ctx, tokens=None, dense_limit: int = JACOBIAN_BLOCK_LIMIT,
                      cost: Cost | None = None) -> PerTokenSpectra:
    """‖J_ss‖₂ and ρ(J_ss) for the given tokens (default: every token of batch row 0).

    Blocks of width ≤ dense_limit are formed densely (ds vmapped JVPs each); wider ones are
    handled matrix-free (svds/eigs on the token operator). max_s ρ(J_ss) equals ρ(J).
    """
    checks.check_state(h, "h", checks.state_shape(model, ctx))
    B, S, ds = h.shape
    if tokens is None:
        tokens = [(0, s) for s in range(S)]
    tokens = [(0, t) if isinstance(t, int) else tuple(t) for t in tokens]
    norms, radii, mv = [], [], 0
    for tok in tokens:
        if ds <= dense_limit:
            M = token_block(model, h, ctx, tok, cost)
            mv += ds
            norms.append(float(np.linalg.norm(M, 2)))
            radii.append(float(np.abs(np.linalg.eigvals(M)).max()))
        else:
            J = loop_jacobian(model, h, ctx, token=tok, cost=cost)
            norms.append(float(top_singular_values(J, 1, "svds").values[0]))
            radii.append(float(np.abs(top_eigenvalues(J, 1, "eigs").values[0])))
            mv += J.matvecs + J.rmatvecs
    method = "dense blocks" if ds <= dense_limit else "matrix-free"
    return PerTokenSpectra(tokens, np.array(norms), np.array(radii), method, mv)
