"""Sizes: how parameters are counted, and how large a matrix may be before it is handled
matrix-free (docs/design.md §3). The one home of both; dynamics/, probes/ and loopdyn/ import
them from here.

Dense-size limits (a dimension n; above the limit the same quantity is computed matrix-free,
from products only):

    DENSE_LIMIT          2048   eigenvalues / spectral norm of a stored Ā, B̄ (numpy on the n × n
                                matrix; above: ARPACK `eigs` / `svds`)
    SVD_LIMIT             256   2-norm of a dense matrix by a full SVD; above (≤ DENSE_LIMIT):
                                √λ_max of the smaller Gram matrix
    JACOBIAN_BLOCK_LIMIT  256   per-token Jacobian blocks J_ss formed densely (n vmapped JVPs
                                each); above: matrix-free Lanczos / Arnoldi per token
    EVERY_STEP_LIMIT       96   a training monitor computes ρ(Ā) of a dense Ā exactly on every
                                step: eigvals costs ~1 ms at 64 (under 1 % of a CPU training step
                                of a model that narrow) but ~15-30 ms at 256, so wider ones get it
                                every `spectral_every` steps and the per-step ‖Ā‖₂ in between
"""
from __future__ import annotations

from typing import Iterable

import torch

DENSE_LIMIT = 2048
SVD_LIMIT = 256
JACOBIAN_BLOCK_LIMIT = 256
EVERY_STEP_LIMIT = 96


def count_params(params: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """The number of unique parameters: each tensor counted once (a tied head and embedding are
    one tensor), none of `exclude`. Meta tensors count too (shapes only)."""
    skip = {id(p) for p in exclude}
    seen = {id(p): p.numel() for p in params if id(p) not in skip}
    return int(sum(seen.values()))
