"""Constructed loops with known behaviour, for the forecast and phase tests (and bench/forecast_accuracy.py).

Every case is a LoopedModel: `LoopAdapter` around a small hand-built map in float64 (so the ground
truth is exact), or a small `LoopedLM` with hand-set weights. The forecast measures T = 8 loops
(the trained depth μ = 8) and predicts H = 64 (8T); the truth is the loop itself, run to 4H = 256
loops by plain `model.step` calls (nothing from loopdyn.dynamics), and labelled with the docs/design.md §4
meanings:

* explosive — a non-finite state; a state above 10 × ‖h_μ‖ within the horizon reached while the
  residual grows (a burst) or by a bounded transient (the loop converges, to a state outside the
  safe region: a distant fixed point); geometric growth after it (‖h_{4H}‖ > 10 × max_{t≤H} ‖h_t‖
  with ‖h‖ still growing by > 0.1%/loop over the last half); and any loop whose large-state limit is
  Ā with ρ(Ā) > 1 (by construction; docs/design.md §4: a large enough state grows like ρ(Ā)ᵗ);
* stable — bounded and converging: the residual decays (‖r_{4H}‖ ≤ ½‖r_{2H}‖) or is at round-off;
* marginal — everything else (a cycle, quasi-periodic motion, drift — also a drift that leaves the
  safe region within the horizon).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from loopdyn.models import LoopAdapter

T, MU, H = 8, 8, 64
TRUTH_LOOPS = 4 * H
N_TOK, D = 4, 12


@dataclass
class Case:
    name: str
    cls: str  # the class of the list this case belongs to
    build: Callable[[], object]  # -> LoopedModel
    large_state_unstable: bool = False  # the large-state limit is Ā with ρ(Ā) > 1 (by construction)
    idx: torch.Tensor | None = None


def _rng(seed):
    return np.random.default_rng(seed)


def _t(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def with_spectrum(blocks, rng, normal=True):
    """A real d × d matrix with the given eigenvalues (real numbers or complex numbers standing for a
    conjugate pair), similar by a random orthogonal (normal=True) or well-conditioned matrix."""
    parts = []
    for lam in blocks:
        if isinstance(lam, complex):
            r, th = abs(lam), math.atan2(lam.imag, lam.real)
            parts.append(r * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]))
        else:
            parts.append(np.array([[float(lam)]]))
    n = sum(p.shape[0] for p in parts)
    Dm = np.zeros((n, n))
    i = 0
    for p in parts:
        k = p.shape[0]
        Dm[i:i + k, i:i + k] = p
        i += k
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    if normal:
        return Q @ Dm @ Q.T
    S = Q @ np.diag(np.linspace(1, 3, n)) @ np.linalg.qr(rng.standard_normal((n, n)))[0]
    return S @ Dm @ np.linalg.inv(S)


def fill(eigs, d=D, rng=None, rest=0.3):
    """Eigenvalue list padded to d channels with contracting real modes spread in (0, rest]."""
    n = sum(2 if isinstance(x, complex) else 1 for x in eigs)
    return list(eigs) + list(np.linspace(0.1, rest, d - n))


def rms(u):
    return u / torch.sqrt((u * u).mean(-1, keepdim=True) + 1e-12)


class PreNormCore:
    """c(u) = W2 tanh(W1 · rms(u)): bounded, so its Jacobian falls like 1/‖u‖ (a pre-norm MLP)."""

    def __init__(self, d, gain, seed, width=16):
        rng = _rng(seed)
        self.W1 = _t(rng.standard_normal((width, d)) / math.sqrt(d))
        self.W2 = _t(rng.standard_normal((d, width)) * gain / math.sqrt(width))

    def __call__(self, u):
        return torch.tanh(rms(u) @ self.W1.T) @ self.W2.T


def affine_loop(A, B=None, core=None, seed=0, linear_part=True, init=None, mean_loops=MU, d=None):
    """h ← u + core(u), u = Ā h + B̄ e (float64); the LTI part is declared unless linear_part=False."""
    A = _t(A)
    d = A.shape[0] if d is None else d
    B = _t(np.eye(d) if B is None else B)
    e = _t(_rng(seed + 100).standard_normal((1, N_TOK, d)))

    def step(h, e):
        u = (h * A if A.dim() == 1 else h @ A.T) + e @ B.T
        return u if core is None else u + core(u)

    kw = {}
    if linear_part:
        kw["linear_part"] = lambda: (A, B)
    if init is not None:
        kw["init_state"] = init
    return LoopAdapter(encode=lambda idx: e, step=step, decode=lambda h, e: h, mean_loops=mean_loops, **kw)


def circle_map(theta, d=6, mu=0.5, seed=0, contract=0.5, flip=False):
    """A limit cycle: the first two channels z ↦ e^{iθ} z (1 + μ)/(1 + μ|z|²) (the circle |z| = 1
    attracts: the radius map has slope (1 − μ)/(1 + μ) there), or for flip=True the first channel
    x ↦ −x(1 + μ)/(1 + μx²) (a period-2 orbit x = ±1: a flip, period doubling); the other channels
    contract to a fixed point, x ← contract · x + e. No LTI part is declared."""
    e = _t(_rng(seed + 7).standard_normal((1, N_TOK, d)))
    c, s = math.cos(theta), math.sin(theta)

    def step(h, e):
        out = contract * h + e
        if flip:
            x = h[..., :1]
            out = torch.cat([-x * (1 + mu) / (1 + mu * x * x), out[..., 1:]], -1)
        else:
            z1, z2 = h[..., :1], h[..., 1:2]
            g = (1 + mu) / (1 + mu * (z1 * z1 + z2 * z2))
            out = torch.cat([g * (c * z1 - s * z2), g * (s * z1 + c * z2), out[..., 2:]], -1)
        return out

    def init(e):
        h = torch.zeros_like(e)
        h[..., 0] = 0.3 + 0.1 * torch.arange(e.shape[1], dtype=e.dtype)
        return h

    return LoopAdapter(encode=lambda idx: e, step=step, decode=lambda h, e: h, mean_loops=MU, init_state=init)


def nonnormal(peak_after=True, core=None, seed=0):
    """Ā = [[0.3 I, 0], [0, λI + βN]] (N the shift): a fast mode fed by the input dominates the
    measured loops; the shift chain (fed 1e-3 of the input when peak_after; the state then grows 28× to a distant fixed point) grows as C(k, m)βᵐλᵏ⁻ᵐ and
    peaks after the measured loops; with peak_after=False the chain is short and peaks within them."""
    d = D
    A = np.zeros((d, d))
    A[:6, :6] = 0.3 * np.eye(6)
    if peak_after:
        A[6:, 6:] = 0.8 * np.eye(6) + 1.5 * np.eye(6, k=1)
        gains = np.r_[np.ones(6), 1e-3 * np.ones(6)]
    else:
        A[6:, 6:] = 0.4 * np.eye(6) + 1.0 * np.eye(6, k=1)
        gains = np.ones(d)
    return affine_loop(A, np.diag(gains), core=core, seed=seed)


def nonnormal_distant(core=None, seed=0):
    """Ā = [[0.3 I, 0], [0, 0.96 I + 3N]] (a 2-long shift chain N, fed by the input): a bounded transient
    that carries the state to a distant fixed point, ≈ 26× the state at the trained depth, leaving the safe
    region (10 × ‖h_μ‖) at loop 33 — residual shrinking all the way (no burst), so a rule that calls only
    bursts and geometric growth explosive calls it marginal (issue 20's first class)."""
    d = D
    A = np.zeros((d, d))
    A[:d - 2, :d - 2] = 0.3 * np.eye(d - 2)
    A[d - 2:, d - 2:] = 0.96 * np.eye(2) + 3.0 * np.eye(2, k=1)
    return affine_loop(A, core=core, seed=seed)


def slow_parcae_lm(a_max=0.985, seed=0, perturb=0.03):
    """A LoopedLM with the Parcae diagonal injection, Ā = diag(a), a spread up to a_max (hand-set
    A_log, dt_bias), and a small nonlinear core."""
    from tests.helpers import small_loop_model

    model = small_loop_model("diagonal", d=16, perturb=perturb, seed=seed, mean_loops=MU)
    inj = model.injection
    with torch.no_grad():
        delta = torch.nn.functional.softplus(inj.dt_bias)
        rates = torch.linspace(-math.log(0.6), -math.log(a_max), inj.A_log.numel())
        inj.A_log.copy_(torch.log(rates / delta))
    return model


def linear_lm(rho, perturb, seed=0, block="prenorm"):
    """A LoopedLM with the linear injection, Ā a random dense matrix scaled to spectral radius rho."""
    from tests.helpers import small_loop_model

    kw = {} if block == "prenorm" else {"block": block}
    model = small_loop_model("linear", d=16, perturb=perturb, seed=seed, mean_loops=MU, **kw)
    G = _rng(seed + 3).standard_normal((16, 16))
    G = G * rho / np.abs(np.linalg.eigvals(G)).max()
    with torch.no_grad():
        model.injection.W.weight[:, :16] = torch.tensor(G, dtype=torch.float32)
    return model


LM_IDX = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))


def cases() -> list[Case]:
    r = _rng
    out = [
        Case("lti_rho_0.97", "ρ(Ā) just below 1", lambda: affine_loop(with_spectrum(fill([0.97]), r(1)))),
        Case("lti_rho_1.03", "ρ(Ā) just above 1", lambda: affine_loop(with_spectrum(fill([1.03]), r(2)))),
        Case("prenorm_rho_0.97", "ρ(Ā) just below 1", lambda: affine_loop(with_spectrum(fill([0.97]), r(3)),
                                                                            core=PreNormCore(D, 0.3, 3))),
        Case("prenorm_rho_1.03", "ρ(Ā) just above 1", lambda: affine_loop(with_spectrum(fill([1.03]), r(4)),
                                                                            core=PreNormCore(D, 0.3, 4)),
             large_state_unstable=True),
        Case("rotation_on_circle", "rotating mode on the unit circle",
             lambda: affine_loop(with_spectrum(fill([complex(math.cos(0.9), math.sin(0.9))]), r(5)))),
        Case("rotation_near_circle", "rotating mode near the unit circle",
             lambda: affine_loop(with_spectrum(fill([0.97 * complex(math.cos(0.9), math.sin(0.9))]), r(6)))),
        Case("rotation_outside", "rotating mode just outside the unit circle",
             lambda: affine_loop(with_spectrum(fill([1.03 * complex(math.cos(0.9), math.sin(0.9))]), r(7)))),
        Case("flip_on_circle", "sign-flipping mode on the unit circle",
             lambda: affine_loop(with_spectrum(fill([-1.0]), r(8)))),
        Case("flip_near_circle", "sign-flipping mode near the unit circle",
             lambda: affine_loop(with_spectrum(fill([-0.97]), r(9)))),
        Case("flip_and_rotation_sum", "sum of rotating and sign-flipping modes",
             lambda: affine_loop(with_spectrum(fill([-0.99, 0.99 * complex(math.cos(2.0), math.sin(2.0))]), r(10)))),
        Case("nonnormal_peak_after", "non-normal transient peaking after the measured loops",
             lambda: nonnormal(True)),
        Case("nonnormal_peak_before", "non-normal transient peaking before the measured loops",
             lambda: nonnormal(False)),
        Case("nonnormal_peak_after_core", "non-normal transient after the measured loops, with a core",
             lambda: nonnormal(True, core=PreNormCore(D, 0.2, 11))),
        Case("nonnormal_peak_before_core", "non-normal transient before the measured loops, with a core",
             lambda: nonnormal(False, core=PreNormCore(D, 0.2, 12))),
        Case("nonnormal_distant_fixed_point", "non-normal transient to a distant fixed point",
             lambda: nonnormal_distant()),
        Case("nonnormal_distant_fixed_point_core", "non-normal transient to a distant fixed point, with a core",
             lambda: nonnormal_distant(core=PreNormCore(D, 0.2, 11))),
        Case("contractive_expansive_core", "contractive Ā with an expansive core",
             lambda: affine_loop(0.5 * np.linalg.qr(r(13).standard_normal((D, D)))[0], core=PreNormCore(D, 3.0, 13))),
        Case("parcae_slow_0.98", "slow Parcae convergence",
             lambda: affine_loop(np.linspace(0.5, 0.98, D), np.diag(1 - np.linspace(0.5, 0.98, D)),
                                 core=PreNormCore(D, 0.05, 14))),
        Case("parcae_slow_0.99", "slow Parcae convergence",
             lambda: affine_loop(np.linspace(0.3, 0.99, D), np.diag(1 - np.linspace(0.3, 0.99, D)))),
        Case("invisible_mode_lti", "mode invisible at T = 8 that dominates later",
             lambda: affine_loop(np.r_[np.linspace(0.2, 0.6, D - 1), 1.1], np.diag(np.r_[np.ones(D - 1), 1e-9]))),
        Case("invisible_mode_no_lti_part", "mode invisible at T = 8 that dominates later",
             lambda: affine_loop(np.r_[np.linspace(0.2, 0.6, D - 1), 1.1], np.diag(np.r_[np.ones(D - 1), 1e-9]),
                                 linear_part=False)),
        Case("limit_cycle_period_3", "limit cycle", lambda: circle_map(2 * math.pi / 3)),
        Case("limit_cycle_quasi_periodic", "limit cycle", lambda: circle_map(1.0)),
        Case("limit_cycle_period_2", "limit cycle", lambda: circle_map(0.0, flip=True)),
        Case("additive_drift", "mode on the unit circle (drift)", lambda: affine_loop(np.eye(D))),
        Case("lm_parcae_slow", "slow Parcae convergence", lambda: slow_parcae_lm(), idx=LM_IDX),
        Case("lm_linear_rho_1.03_core", "ρ(Ā) just above 1", lambda: linear_lm(1.03, 0.02), large_state_unstable=True,
             idx=LM_IDX),
        Case("lm_linear_rho_0.97_core", "ρ(Ā) just below 1", lambda: linear_lm(0.97, 0.02), idx=LM_IDX),
        Case("lm_linear_rho_1.05_core_holds", "ρ(Ā) just above 1, a core that holds the state for a while",
             lambda: linear_lm(1.05, 0.15, seed=2), large_state_unstable=True, idx=LM_IDX),
        Case("lm_sandwich_rho_1.3", "renormalised state, ρ(Ā) above 1", lambda: linear_lm(1.3, 0.05, block="sandwich"),
             idx=LM_IDX),
    ]
    return out


CASES = {c.name: c for c in cases()}


# ---- ground truth: the loop itself -------------------------------------------------------------------

@dataclass
class Truth:
    norms: np.ndarray  # mean token ‖h_t‖, t = 0..TRUTH_LOOPS (NaN after a non-finite state)
    resid: np.ndarray  # whole-batch ‖h_t − h_{t−1}‖
    verdict: str
    first_unsafe: int | None  # first loop t > μ with ‖h_t‖ > 10 ‖h_μ‖ or non-finite


def run_truth(model, idx, case: Case, loops: int = TRUTH_LOOPS) -> Truth:
    with torch.no_grad():
        ctx = model.encode(idx)
        try:
            h = model.init_state(ctx, generator=torch.Generator().manual_seed(0))
        except TypeError:
            h = model.init_state(ctx)
        norms, resid = [float(h.double().norm(dim=-1).mean())], [math.nan]
        for _ in range(loops):
            nxt = model.step(h, ctx)
            if not bool(torch.isfinite(nxt).all()):
                break
            resid.append(float((nxt.double() - h.double()).norm()))
            norms.append(float(nxt.double().norm(dim=-1).mean()))
            h = nxt
    n = len(norms)
    norms = np.array(norms + [math.nan] * (loops + 1 - n))
    resid = np.array(resid + [math.nan] * (loops + 1 - n))
    limit = 10 * norms[MU]
    bad = [t for t in range(MU + 1, loops + 1) if not np.isfinite(norms[t]) or norms[t] > limit]
    first = bad[0] if bad else None
    converging = n == loops + 1 and (resid[loops] <= 0.5 * resid[loops // 2] or resid[loops] <= 1e-9 * norms[loops])
    if n < loops + 1 or case.large_state_unstable:
        verdict = "explosive"
    elif first is not None and first <= H:
        burst = np.nanmax(resid[T + 1: first + 1]) > 2 * resid[T]
        verdict = "explosive" if burst or converging else "marginal"  # a bounded transient out, or drift
    elif norms[loops] > 10 * np.nanmax(norms[: H + 1]) and \
            norms[loops] / norms[loops // 2] > math.exp(1e-3 * loops / 2):
        verdict = "explosive"
    elif converging:  # decaying, or converged
        verdict = "stable"
    else:
        verdict = "marginal"
    return Truth(norms, resid, verdict, first)


def idx_of(case: Case) -> torch.Tensor:
    return case.idx if case.idx is not None else torch.zeros(1, N_TOK, dtype=torch.long)
