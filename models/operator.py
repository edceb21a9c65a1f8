"""Structured linear operators for the loop's LTI part (Ā, B̄): one interface, three structures.

In the manner of `scipy.sparse.linalg.LinearOperator`, every operator has a `shape`
(n_out, n_in) and acts on the last axis of a tensor. The structure decides how the spectral
facts are computed, so no caller ever switches on a kind string:

| class               | matrix     | ‖·‖₂, ρ          | eigenvalues       |
|---------------------|------------|------------------|-------------------|
| `IdentityOperator`  | I          | 1, 1 (closed)    | all 1             |
| `DiagonalOperator`  | diag(a)    | max |aᵢ| (closed) | the aᵢ            |
| `DenseOperator`     | M          | SVD / eigvals    | numpy, or ARPACK above `dense_limit` |

`kind` ("identity" | "diagonal" | "dense") is kept for display and JSON only. The stored
tensor is `DiagonalOperator.diagonal` / `DenseOperator.matrix`; `dtype` and `device` are its
(None for the identity). `normal` is
True for identity and diagonal operators (then ‖Aᵏ‖₂ = ρᵏ exactly and sup_k ‖Aᵏ‖ has a
closed form). Values are detached float tensors; numpy views (`dense_numpy()`,
`diagonal_numpy()`) are float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from loopdyn.models.sizes import DENSE_LIMIT, SVD_LIMIT
from loopdyn.models.weights import all_finite


class Operator:
    """A linear map R^{n_in} → R^{n_out} acting on the last axis of a tensor."""

    kind: str = "abstract"
    normal: bool = False

    def __init__(self, n_out: int, n_in: int):
        self.n_out, self.n_in = int(n_out), int(n_in)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    # ---- action -------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A·x over the last axis of x."""
        raise NotImplementedError

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ·y over the last axis of y."""
        raise NotImplementedError

    def adjoint(self) -> "Operator":
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The matrix, (n_out, n_in)."""
        raise NotImplementedError

    def dense_numpy(self) -> np.ndarray:
        return self.dense().detach().to("cpu", torch.float64).numpy()

    # ---- spectral facts ---------------------------------------------------------------------
    def is_finite(self) -> bool:
        return True

    def norm(self) -> float:
        """Spectral norm ‖A‖₂."""
        raise NotImplementedError

    def radius(self) -> float:
        """Spectral radius ρ(A) (square operators)."""
        raise NotImplementedError

    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues, complex, by decreasing modulus (square operators)."""
        raise NotImplementedError

    def shifted_solve(self, rhs: torch.Tensor) -> torch.Tensor | None:
        """(I − A)⁻¹·rhs over the last axis, or None when I − A is (numerically) singular."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the stored tensor (None for the identity, which stores none)."""
        return None

    @property
    def device(self) -> torch.device | None:
        """The device of the stored tensor (None for the identity)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.shape}"


class IdentityOperator(Operator):
    kind, normal = "identity", True

    def __init__(self, n: int, n_in: int | None = None):
        super().__init__(n, n if n_in is None else n_in)

    def apply(self, x):
        return x

    def apply_adjoint(self, y):
        return y

    def adjoint(self):
        return IdentityOperator(self.n_in, self.n_out)

    def dense(self):
        return torch.eye(self.n_out, self.n_in)

    def diagonal_numpy(self) -> np.ndarray:
        return np.ones(min(self.shape))

    def norm(self):
        return 1.0

    def radius(self):
        return 1.0

    def eigenvalues(self):
        return np.ones(self.n_out, dtype=complex)

    def shifted_solve(self, rhs):
        return None


class DiagonalOperator(Operator):
    kind, normal = "diagonal", True

    def __init__(self, diagonal: torch.Tensor):
        d = diagonal.detach()
        super().__init__(d.numel(), d.numel())
        self._d = d

    @property
    def diagonal(self) -> torch.Tensor:
        """a, the stored diagonal (n,)."""
        return self._d

    dtype = property(lambda self: self._d.dtype)
    device = property(lambda self: self._d.device)

    def apply(self, x):
        return x * self._d.to(x.dtype)

    apply_adjoint = apply

    def adjoint(self):
        return self

    def dense(self):
        return torch.diag(self._d)

    def diagonal_numpy(self) -> np.ndarray:
        return self._d.to("cpu", torch.float64).numpy()

    def is_finite(self):
        return all_finite(self._d)

    def norm(self):
        return float(self._d.abs().max()) if self.n_out else 0.0

    radius = norm

    def eigenvalues(self):
        a = self.diagonal_numpy()
        return a[np.argsort(-np.abs(a), kind="stable")].astype(complex)

    def shifted_solve(self, rhs):
        denom = 1.0 - self._d.to(torch.float64)
        if bool((denom.abs() <= 1e-12).any()):
            return None
        return rhs.to(torch.float64) / denom


class DenseOperator(Operator):
    kind, normal = "dense", False
    dense_limit = DENSE_LIMIT  # above this many channels, spectra are computed matrix-free (ARPACK)

    def __init__(self, matrix: torch.Tensor):
        M = matrix.detach()
        super().__init__(*M.shape)
        self._m = M

    @property
    def matrix(self) -> torch.Tensor:
        """M, the stored matrix (n_out, n_in)."""
        return self._m

    dtype = property(lambda self: self._m.dtype)
    device = property(lambda self: self._m.device)

    def apply(self, x):
        return x @ self._m.to(x.dtype).T

    def apply_adjoint(self, y):
        return y @ self._m.to(y.dtype)

    def adjoint(self):
        return DenseOperator(self._m.T)

    def dense(self):
        return self._m

    def is_finite(self):
        return all_finite(self._m)

    def norm(self):
        if not self.is_finite():
            return math.inf
        from scipy.sparse.linalg import svds

        M = self.dense_numpy()
        if min(M.shape) <= SVD_LIMIT:
            return float(np.linalg.norm(M, 2))
        if min(M.shape) <= self.dense_limit:
            gram = M.T @ M if M.shape[1] <= M.shape[0] else M @ M.T
            return float(math.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))
        return float(svds(M, k=1, tol=1e-8, return_singular_vectors=False, rng=np.random.default_rng(0))[0])

    def eigenvalues(self):
        M = self.dense_numpy()
        if self.n_out <= self.dense_limit:
            lam = np.linalg.eigvals(M)
        else:
            from scipy.sparse.linalg import eigs

            lam = eigs(M, k=min(6, self.n_out - 2), which="LM", return_eigenvectors=False, tol=1e-8,
                       v0=np.random.default_rng(0).standard_normal(self.n_out))
        return lam[np.argsort(-np.abs(lam), kind="stable")]

    def radius(self):
        if not self.is_finite():
            return math.nan
        lam = self.eigenvalues()
        return float(np.abs(lam[0])) if lam.size else 0.0

    def shifted_solve(self, rhs):
        M = torch.eye(self.n_out, dtype=torch.float64, device=self._m.device) - self._m.to(torch.float64)
        if torch.linalg.cond(M) > 1e12:
            return None
        flat = rhs.to(torch.float64).reshape(-1, self.n_out)
        return torch.linalg.solve(M, flat.T).T.reshape(rhs.shape)


def as_operator(x, n: int | None = None) -> Operator:
    """An Operator from an Operator, None (identity of size n), a 1-D tensor (diagonal) or a
    2-D tensor (dense). Lets users hand plain tensors to `LoopAdapter(linear_part=...)`."""
    if isinstance(x, Operator):
        return x
    if x is None:
        if n is None:
            raise ValueError("an identity operator needs its size")
        return IdentityOperator(n)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an Operator, a 1-D (diagonal) or 2-D (dense) tensor, got {type(x).__name__}")
    if x.dim() == 1:
        return DiagonalOperator(x)
    if x.dim() == 2:
        return DenseOperator(x)
    raise TypeError(f"an operator tensor must be 1-D (diagonal) or 2-D (dense), got shape {tuple(x.shape)}")
