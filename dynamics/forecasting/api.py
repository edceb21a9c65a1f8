"""The forecast's entry points: measure the loop, build the models, select (docs/design.md §4).

The loop is run for T measured loops (h_0..h_T on a probe batch); the forecast extends the state to
the horizon H > T. The residual r_t = h_t − h_{t−1} obeys r_{t+1} = F(h_t) − F(h_{t−1}) ≈ J_t r_t: it is
a tangent vector, so the future state is h_{T+j} = h_T + Σ_{i≤j} r_{T+i} with the residuals propagated
by a linear model — trajectory DMD (`dmd`), the exact LTI part (`lti`), the Jacobian in Krylov spaces
(`jacobian`), or, when none reproduces the past, the measured norms (`measured`); the large-state
limit (`large_state`) corrects them; `select` judges, picks one and builds the `Forecast`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from loopdyn.dynamics.forecasting.common import Measured, rows
from loopdyn.dynamics.forecasting.dmd import trajectory_model
from loopdyn.dynamics.forecasting.jacobian import jacobian_model, jacobian_subspace, lti_projection
from loopdyn.dynamics.forecasting.large_state import large_state_limit
from loopdyn.dynamics.forecasting.lti import lti_model
from loopdyn.dynamics.forecasting.measured import measured_model
from loopdyn.dynamics.forecasting.result import Forecast
from loopdyn.dynamics.forecasting.select import combine, nonfinite_forecast
from loopdyn.dynamics.loopmap import Cost, Linearisation, nonfinite_parameters
from loopdyn.dynamics.numbers import fmt
from loopdyn.models import protocol

def forecast(model, idx: torch.Tensor, max_loops: int, measured_loops: int | None = None, *,
             explosion_factor: float = 10.0, settle_tol: float = 1e-2, krylov_dim: int = 8,
             lyapunov_k: int = 2, n_random: int = 2, random_steps: int = 4, cost: Cost | None = None) -> Forecast:
    """Measure the loop for `measured_loops` loops (default min(mean_loops, max_loops)) on idx and
    forecast the state to `max_loops` loops (the models: module docstring; the safe region and the
    verdict: `select.combine`, `loopdyn.dynamics.verdict`). lyapunov_k > 0 adds finite-time Lyapunov exponents over the measured
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
    return (f"Lyapunov: λ₁ = {fmt(lam)}/loop over {lyap.loops} loops ({trend}; "
            f"k = {len(lyap.exponents)}: {', '.join(fmt(x) for x in lyap.exponents)})")


def forecast_from(model, traj, spec, horizon: int, *, krylovs: dict | None = None,
                  krylov_dim: int = 8, explosion_factor: float = 10.0, settle_tol: float = 1e-2,
                  extra_evidence: list[str] | None = None, sigma_T: float | None = None,
                  n_random: int = 2, random_steps: int = 4, cost: Cost | None = None,
                  subspace=None) -> Forecast:
    """The forecast from a measured trajectory (with its states). `spec` (an InjectionSpectrum, or
    None) only saves recomputing Ā's eigenvalues; `krylovs` ({loop t: KrylovResult}, the audit's
    krylov_dim-step Arnoldi runs at h_t from r_t, with their bases) saves those products;
    `subspace` (the audit's `jacobian_subspace` at h_T, made while its linearisation there was
    alive) saves linearising h_T. Costs the linearisations at h_T and h_{T−w} not saved so,
    about 2·krylov_dim + n_random·random_steps Jacobian products (krylov_dim fewer per given
    run) and two loop steps: the random starts are run at h_T only (the hindcast from h_{T−w}
    propagates r_{T−w} in its Krylov space alone; `jacobian_model`)."""
    T, H = traj.n_loops, int(horizon)
    states = traj.states
    if traj.nonfinite_at is not None:
        return nonfinite_forecast(traj, H, explosion_factor, None, extra_evidence, mean_loops=model.mean_loops)
    cost = cost if cost is not None else Cost()
    data = Measured(T, [rows(s) for s in states], float(torch.finfo(states[T].dtype).eps))
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
        runs = krylovs or {}
        sub = subspace
        if sub is None:
            sub = jacobian_subspace(Linearisation(model, traj.ctx, states[T], cost), r_T, steps, n_random,
                                    random_steps, seed=0, krylov=runs.get(T))
        sub0 = None
        w = data.hindcast_window()
        if w >= 1 and T - w >= 1:
            t0 = T - w
            run0 = runs.get(t0)  # given, the hindcast needs no linearisation
            sub0 = jacobian_subspace(None if run0 is not None else Linearisation(model, traj.ctx, states[t0], cost),
                                     (states[t0] - states[t0 - 1]).to(torch.float64), steps, 0, krylov=run0)
        HL = lti_projection(sub, part.A) if use_scaling else None
        HL0 = lti_projection(sub0, part.A) if use_scaling and sub0 is not None else None
        models.append(jacobian_model(sub, sub0, data, J, HL, HL0, sigma_T, large.spectral_radius))
    return combine(traj, models, H, explosion_factor, settle_tol, extra_evidence, mean_loops=model.mean_loops,
                   large=large)
