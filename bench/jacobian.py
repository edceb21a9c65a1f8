"""Matrix-free vs dense: the top singular value of the loop Jacobian.

A looped model with d = 128 (state width) on one 64-token sequence (N = 64·128 = 8192 state
entries), its core output projections perturbed so the loop is nonlinear. At the state after
μ_rec loops:

* dense: `torch.autograd.functional.jacobian` (N reverse-mode passes) and
  `numpy.linalg.norm(J, ord=2)` (a full SVD of an 8192 × 8192 matrix);
* matrix-free: `loopdyn.dynamics.loop_jacobian` as a SciPy LinearOperator and ARPACK `svds`
  (tol 1e-7), and Golub–Kahan–Lanczos (`top_singular_values(method="lanczos")`, 40 steps).

Both run in this process, one after the other, single-threaded; the speedup is dense time ÷
matrix-free (svds) time. Ends with: RESULT jacobian speedup=<x> rel_err=<e>.

    python bench/jacobian.py [--d 128 --seq 64 --threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from loopdyn.dynamics import loop_jacobian, top_singular_values
from loopdyn.models import LoopConfig, LoopedLM


def build(d: int, seed: int = 0) -> LoopedLM:
    torch.manual_seed(seed)
    cfg = LoopConfig.preset("tiny", d_model=d, n_heads=max(2, d // 32), d_mlp=4 * d)
    model = LoopedLM(cfg).eval()
    with torch.no_grad():
        for blk in model.core:
            blk.attn.c_proj.weight.normal_(0, 0.5 / d ** 0.5)
            blk.mlp.proj.weight.normal_(0, 0.5 / (4 * d) ** 0.5)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.d)
    idx = torch.randint(0, 256, (1, args.seq), generator=torch.Generator().manual_seed(1))
    ctx = model.encode(idx)
    with torch.no_grad():
        h = model.init_state(ctx)
        for _ in range(model.config.mean_loops):
            h = model.step(h, ctx)
    N = h.numel()
    print(f"model: d = {args.d}, {args.seq} tokens, N = {N} state entries; Jacobian at loop {model.config.mean_loops}")

    t0 = time.perf_counter()
    J = loop_jacobian(model, h, ctx)
    est = top_singular_values(J, k=1, method="svds", tol=1e-7)
    t_free = time.perf_counter() - t0
    sigma_free = float(est.values[0])
    print(f"matrix-free svds:   σ_max = {sigma_free:.8f}   {t_free:8.2f} s   "
          f"({est.matvecs} J·v + {est.rmatvecs} Jᵀ·w products)")

    t0 = time.perf_counter()
    gkl = top_singular_values(loop_jacobian(model, h, ctx), k=1, method="lanczos", steps=40)
    t_gkl = time.perf_counter() - t0
    print(f"matrix-free GKL-40: σ_max = {float(gkl.values[0]):.8f}   {t_gkl:8.2f} s   "
          f"({gkl.matvecs} J·v + {gkl.rmatvecs} Jᵀ·w products)")

    t0 = time.perf_counter()
    dense = torch.autograd.functional.jacobian(lambda x: model.step(x, ctx), h).reshape(N, N)
    t_jac = time.perf_counter() - t0
    sigma_dense = float(np.linalg.norm(dense.numpy().astype(np.float64), ord=2))
    t_dense = time.perf_counter() - t0
    print(f"dense:              σ_max = {sigma_dense:.8f}   {t_dense:8.2f} s   "
          f"(jacobian {t_jac:.1f} s, SVD {t_dense - t_jac:.1f} s; {N * N * 4 / 2 ** 20:.0f} MiB)")

    rel = abs(sigma_free - sigma_dense) / sigma_dense
    rel_gkl = abs(float(gkl.values[0]) - sigma_dense) / sigma_dense
    speedup = t_dense / t_free
    print(f"svds: {speedup:.1f}× faster, relative error {rel:.2e};  GKL-40: {t_dense / t_gkl:.1f}× faster, "
          f"relative error {rel_gkl:.2e}")
    print(f"RESULT jacobian speedup={speedup:.1f} rel_err={rel:.2e} gkl_speedup={t_dense / t_gkl:.1f} "
          f"gkl_rel_err={rel_gkl:.2e}")


if __name__ == "__main__":
    main()
