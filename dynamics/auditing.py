"""`audit`: everything dynamics knows about a looped model's recurrence, on one probe batch.

One pass runs the loop t = 0..T through linearisations of its step, one at each measured state
h_t (one recorded forward + backward pass, whose output is h_{t+1}: measuring the loop costs no
extra steps), and shares each between

* the Lyapunov tangent vectors (k products J_t·Q per loop, t < T),
* the Jacobian spectra at loops t = 1..T: ‖J_t‖₂ by a few Golub–Kahan–Lanczos steps on J_tᵀ
  warm started from the previous loop's top left singular vector (a lower bound that tightens
  along the sweep; the first product J_tᵀ·u is the linearisation's own backward pass) and
  ρ(J_t) by a short Arnoldi run started from the measured residual r_t = h_t − h_{t−1} (Ritz
  estimate; the runs at t = T and T − w are the forecast's Krylov bases),

so the cost is T + 1 linearisations plus a fixed number of products per loop, independent of
the state size (bench/audit_cost.py measures it in forward passes). The injection spectrum is
closed-form or dense on ds × ds, the gain graph linearises each core sublayer once. The stages
return frozen results; the verdict is `verdict.audit_verdict` (docs/design.md §4).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from loopdyn.dynamics import forecasting as fc
from loopdyn.dynamics.audit_report import AuditReport, JacobianSweep, ModelInfo
from loopdyn.dynamics.gain import gain_graph
from loopdyn.dynamics.jacobian import norm_lower_bound
from loopdyn.dynamics.loopmap import MAX_HORIZON, MAX_LOOPS, Cost, Linearisation, nonfinite_parameters, require_loop
from loopdyn.dynamics.lti import injection_spectrum
from loopdyn.dynamics.lyapunov_exponents import LyapunovAccumulator, LyapunovResult
from loopdyn.dynamics.numbers import fmt
from loopdyn.dynamics.overthinking import overthinking, probe_losses, target_labels
from loopdyn.dynamics.trajectory import check_pure, encode_probe, measure_trajectory, run_loop, trajectory_of
from loopdyn.dynamics.verdict import audit_verdict
from loopdyn.models import checks, protocol
from loopdyn.models.errors import InputError
from loopdyn.models.weights import all_finite


def _nan_sweep(T: int, why: str) -> JacobianSweep:
    nan = np.full(T, math.nan)
    return JacobianSweep(list(range(1, T + 1)), nan, nan.copy(), why, 0, nan.copy())


def _jacobian_loops(T: int, limit: int | None) -> list[int]:
    if limit is None or limit >= T:
        return list(range(1, T + 1))
    picks = np.unique(np.linspace(1, T, max(limit, 1)).round().astype(int))
    return [int(t) for t in picks]


def audit(model, idx: torch.Tensor, loops: int | None = None, horizon: int | None = None, *,
          tol: float = 1e-3, explosion_factor: float = 10.0, settle_tol: float = 1e-2,
          jacobian_steps: int = 4, arnoldi_steps: int = 6, krylov_dim: int = 10, lyapunov_k: int = 4,
          gain_steps: int = 4, jacobian_loops: int | None = 8, path: str | None = None, probe: str = "",
          exit_threshold: float = 0.5, progress=None) -> AuditReport:
    """Audit the recurrence of `model` on the probe batch `idx` (B, S).

    loops: loops measured (default μ_rec, at most MAX_LOOPS); horizon: loops forecast (default
    4 × loops, at most MAX_HORIZON). The other knobs set the budget (module docstring).
    `progress`, if given, is called as progress(stage: str, done: int, total: int).
    Non-finite weights or states give an `explosive` verdict with the evidence "non-finite";
    a model without a loop raises DynamicsError.

    A loop that renormalises its state (`state_norm_kind` "pre"/"post") has a flat ‖h_t‖ by
    construction: the audit then also measures what the norm hides (`dynamics.normalised`:
    pre-norm growth, the gain the norm absorbs, convergence per token) and the verdict follows
    that analysis. A model with an `exit_gate` gets the exit-gate audit (`dynamics.exit_gate`,
    exit threshold q = exit_threshold) in the report; it does not change the verdict.
    """
    start = time.perf_counter()
    require_loop(model)
    checks.check_tokens(idx, "idx")
    T = model.mean_loops if loops is None else loops
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_LOOPS:
        raise InputError(f"loops must be an integer in [1, {MAX_LOOPS}], got {loops!r}")
    H = 4 * T if horizon is None else horizon
    if isinstance(H, bool) or not isinstance(H, int) or not T <= H <= MAX_HORIZON:
        raise InputError(f"horizon must be an integer in [loops = {T}, {MAX_HORIZON}], got {horizon!r}")
    report = progress or (lambda stage, done, total: None)
    cost = Cost()
    notes: list[str] = []
    skipped: list[str] = []
    info = getattr(model, "checkpoint_info", None)
    fmt = getattr(info, "format", None) or getattr(model, "checkpoint_format", None) or "adapter"

    bad = nonfinite_parameters(model)
    from loopdyn.models.precision import model_precision

    prec = model_precision(model)
    if not prec.is_default:
        notes.append(f"the loop ran in {prec.name} (the state in {str(prec.state).replace('torch.', '')}); the "
                     f"analysis runs in float64 on its products")
    report("injection spectrum", 0, 1)
    spec = injection_spectrum(model, horizon=H, tol=tol)
    if spec.absent:
        skipped.append(f"injection spectrum: {spec.notes[0]}")
    report("trajectory", 0, T)
    if bad:
        traj = measure_trajectory(model, idx, T, cost=cost)
    else:  # the loop is run through the sweep's linearisations, which need it anyway
        ctx = encode_probe(model, idx)
        states, swept = _sweep(model, ctx, T, lyapunov_k, jacobian_steps, arnoldi_steps, krylov_dim,
                               _jacobian_loops(T, jacobian_loops), cost, report, keep=set(fc.forecast_loops(T)))
        traj = trajectory_of(states, ctx, T)
    broken = bool(bad) or traj.nonfinite_at is not None
    minfo = ModelInfo(path if path is not None else getattr(info, "path", None), fmt,
                      protocol.injection_name(model), protocol.num_params(model),
                      int(traj.states[0].shape[-1]) if traj.states else 0, model.mean_loops)

    lyap = LyapunovResult(np.full(max(lyapunov_k, 1), math.nan), 0, None, broken)
    sweep = _nan_sweep(T, "not computed (non-finite weights or states)" if broken else "not computed")
    sweep.lti_spectral_norm, sweep.lti_spectral_radius = spec.spectral_norm, spec.spectral_radius
    krylov = None
    G = None
    pres = None  # the pre-norm states r_1..r_T, when the sweep read them off its steps
    if not broken:
        sweep, lyap, krylovs, sub_T, after, pres = swept
        krylov = krylovs.get(T)
        sweep.lti_spectral_norm, sweep.lti_spectral_radius = spec.spectral_norm, spec.spectral_radius
        part = protocol.linear_part(model)
        if part is not None and krylov is not None and krylov.H.shape[0] and part.A.is_finite():
            HL = fc.lti_projection(krylov, part.A)
            if HL is not None and np.all(np.isfinite(HL)):
                sweep.lti_ritz_radius = float(np.abs(np.linalg.eigvals(HL)).max())
        report("gain graph", 0, 1)
        try:
            G = gain_graph(model, h=traj.states[T], ctx=traj.ctx, steps=gain_steps, cost=cost)
            G.graph["where"] = f"probe, state after {T} loops"
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as err:  # never let a side analysis kill the audit
            notes.append(f"gain graph not computed: {err}")
    extra = []
    if not broken:
        extra.append(_jacobian_evidence(sweep))
        if lyap.loops:
            extra.append(fc.lyapunov_evidence(lyap))
        if G is not None:
            extra.append(_gain_evidence(G, sweep))
    report("forecast", 0, 1)
    if broken:
        forecast = fc.combine(traj, [], H, explosion_factor, settle_tol, nonfinite_weights=bad)
    else:
        sigma_T = float(sweep.spectral_norm[-1]) if sweep.loops and sweep.loops[-1] == T else None
        forecast = fc.forecast_from(model, traj, spec, H, krylovs=krylovs, krylov_dim=krylov_dim,
                                    explosion_factor=explosion_factor, settle_tol=settle_tol,
                                    extra_evidence=extra, sigma_T=sigma_T, cost=cost, subspace=sub_T)
        krylovs.clear()  # free the Krylov bases
        sub_T = None
    from loopdyn.dynamics.phases import token_phases
    phases = None if broken else token_phases(traj.states, forecast.leading_eigenvalues, forecast.eigenvalue_source)
    got = None if broken else probe_losses(model, idx, traj, H, cost, after=after, per_token=True)
    losses, token_losses = got if got is not None else (None, None)
    if losses is not None:  # loops past the trained depth: does the model overthink on the probe?
        over = overthinking(np.arange(1, H + 1), losses, model.mean_loops, forecast, phases,
                            token_loss=token_losses, token_labels=target_labels(phases, tuple(idx.shape)))
        forecast = replace(forecast, overthinking=over, evidence=list(forecast.evidence) + [
            f"loops past the trained depth (probe loss): {over.summary()}"])
    norm_result = gate_result = None
    if protocol.state_norm_kind(model) != "none":
        from loopdyn.dynamics.normalised import normalised_loop

        report("normalised loop", 0, 1)
        norm_result = normalised_loop(model, loops=T, ctx=traj.ctx, states=traj.states, jacobian_loops=0, cost=cost,
                                      pre=pres[:T] if pres else None)
    verdict, _ = audit_verdict((forecast.verdict, ""), None if norm_result is None else
                               (norm_result.verdict, norm_result.evidence), broken)
    if callable(getattr(model, "exit_gate", None)) and not broken:
        from loopdyn.dynamics.exit_gate import exit_gate_audit

        report("exit gate", 0, 1)
        gate_result = exit_gate_audit(model, loops=T, ctx=traj.ctx, states=traj.states, threshold=exit_threshold)
    traj.states = []  # free the tensors; the statistics stay
    if G is not None and G.graph.get("method", "").startswith("no sublayers"):
        skipped.append("gain graph per sublayer: the model has no sublayers(); the whole step's measured "
                       "local Lipschitz constant is used instead")
    if broken:
        skipped.append("Jacobian, Lyapunov exponents and gain graph: non-finite weights or states")
    return AuditReport(minfo, spec, traj, sweep, lyap, forecast, G, verdict, probe, cost,
                       time.perf_counter() - start, notes + [n for n in spec.notes if not spec.absent], skipped,
                       norm_result, gate_result, phases)


def _sweep(model, ctx, T: int, lyapunov_k: int, gkl_steps: int, arnoldi_steps: int, krylov_dim: int,
           jac_loops: list[int], cost: Cost, report, keep: set = frozenset()):
    """Run the loop h_0..h_T through the linearisations of its step and analyse it on the way.

    Each state h_{t+1} is the output F(h_t) of the linearisation at h_t, so measuring the loop
    costs no step beyond them; one plain step F(h_0) runs the protocol's checks and shows that F
    is a pure function of h. At each loop: Lyapunov vectors, Jacobian spectra, and at the loops in
    `keep` krylov_dim-step Arnoldi runs; at loop T also the forecast's Jacobian subspace (its
    random starts), so the forecast linearises nothing and runs no Arnoldi twice, and no recorded
    graph outlives its loop (each holds the step's activations: GiB at the real sizes).

    A model that splits its step (`protocol.pre_norm_split`: step = renormalise ∘ pre_norm_state) is
    linearised as that composition, which gives each pre-norm state r_{t+1} on the way.

    Returns (states, analysis): analysis = (sweep, lyapunov, krylovs, the subspace at T, F(h_T),
    [r_1..r_{T+1}] or [] when the model does not split), or None when a state is non-finite (the
    states then end with it).
    """
    states = run_loop(model, ctx, 1, cost=cost)  # h_0 and the plain F(h_0)
    if len(states) < 2 or not all_finite(states[1]):
        return states, None
    plain = states.pop()
    acc = LyapunovAccumulator(states[0].shape, lyapunov_k) if lyapunov_k > 0 else None
    sig, rho, hind = [], [], []
    products = 0
    u_warm = None
    krylovs, sub_T = {}, None
    split, pres = protocol.pre_norm_split(model), []

    def split_step(h):  # the step as its two parts, keeping r = pre_norm_state(h)
        r = split[0](h, ctx)
        pres.append(r.detach())
        return split[1](r, ctx)

    for t in range(T + 1):
        report("linearised loops", t, T + 1)
        spectra = t >= 1 and (t in jac_loops or t == T)
        start = None
        if spectra:
            r_t = (states[t] - states[t - 1]).to(torch.float64)
            # ‖J_t‖₂ by Golub–Kahan on J_tᵀ from the previous loop's top left singular vector (or r_t):
            # the linearisation's own backward pass takes the first product J_tᵀ·start
            start = u_warm if u_warm is not None else r_t
            if float(start.norm()) == 0:
                g = torch.Generator().manual_seed(t)
                start = torch.randn(start.shape, generator=g, dtype=torch.float64).to(start.device)
        lin = Linearisation(model, ctx, states[t], cost, fn=split_step if split else None, w0=start)
        if t == 0:
            try:
                check_pure(model, lin.output, plain, 0)
            except protocol.ProtocolError as err:
                if split is None:
                    raise
                raise protocol.ProtocolError(f"{err}; or LoopedModel.renormalise(pre_norm_state(h)) is not "
                                             f"step(h)") from None
        if t < T:
            states.append(lin.output)
            if not all_finite(lin.output):
                return states, None
        if acc is not None and t < T:
            acc.update(lin)
        if spectra:
            s, u_warm, njt, nj = norm_lower_bound(lin, gkl_steps)
            products += nj + njt
            # at the loops the forecast linearises (T, T − w) its krylov_dim-step run from r_t is done
            # once, here: ρ(J_t) comes from the first arnoldi_steps steps of the same run (at loop T
            # from all krylov_dim), and the forecast gets the first krylov_dim (KrylovResult.head)
            steps = krylov_dim if t == T else max(krylov_dim, arnoldi_steps) if t in keep else arnoldi_steps
            if float(r_t.norm()) > 0:
                run = fc.krylov_at(lin, states[t], r_t, min(steps, r_t.numel()))
                products += run.products
                kry = run.head(arnoldi_steps) if t < T else run
                lam = float(np.abs(kry.ritz[0]))
                image = kry.first_image() if t < T else None
                if image is not None:
                    # the first Arnoldi vector is r_t/‖r_t‖, so J r_t comes for free: its distance to the
                    # measured r_{t+1} is the linearisation's one-step hindcast error
                    r_next = (states[t + 1] - states[t]).to(torch.float64)
                    denom = float(r_next.norm())
                    hind.append(float((image - r_next).norm()) / denom if denom > 0 else math.nan)
                else:
                    hind.append(math.nan)
                if t in keep:
                    krylovs[t] = run.head(krylov_dim)
                del run, kry  # the basis, unless kept
            else:
                lam = 0.0
                hind.append(math.nan)
            if t in jac_loops:
                sig.append(float(s[0]))
                rho.append(lam)
        elif t in keep and t >= 1 and krylov_dim > 0:  # T − w outside the spectra loops: the forecast's run
            r_t = (states[t] - states[t - 1]).to(torch.float64)
            if float(r_t.norm()) > 0:
                krylovs[t] = fc.krylov_at(lin, states[t], r_t, min(krylov_dim, r_t.numel()))
        if t == T:
            after = lin.output  # F(h_T): the first loop past the measured ones
            if krylov_dim > 0:  # the forecast's subspace (forecast_from's defaults for the random starts)
                r_T = (states[T] - states[T - 1]).to(torch.float64)
                sub_T = fc.jacobian_subspace(lin, r_T, min(krylov_dim, r_T.numel()), krylov=krylovs.get(T))
        del lin
    report("linearised loops", T + 1, T + 1)
    loops = [t for t in jac_loops]
    method = (f"matrix-free (autograd J·v and Jᵀ·w at the measured states): ‖J_t‖₂ by {gkl_steps} "
              f"Golub–Kahan–Lanczos steps on J_tᵀ warm-started along the loops (lower bound), ρ(J_t) by "
              f"{arnoldi_steps} Arnoldi steps from r_t ({krylov_dim} at loop {T}; Ritz estimate)")
    sweep = JacobianSweep(loops, np.array(sig), np.array(rho), method, products, np.array(hind))
    lyap = acc.result() if acc is not None else LyapunovResult(np.zeros(0), 0, None)
    return states, (sweep, lyap, krylovs, sub_T, after, pres)


def _jacobian_evidence(sweep: JacobianSweep) -> str:
    if not len(sweep.loops):
        return "Jacobian: not computed"
    t = sweep.loops[-1]
    factor = sweep.core_factor()
    hind = sweep.hindcast_error[np.isfinite(sweep.hindcast_error)]
    h_txt = f"; the linearisation predicts the next residual within {fmt(float(np.max(hind)))} relative error" \
        if hind.size else ""
    core = (f"; on the same Krylov space the LTI part alone has Ritz ρ {fmt(sweep.lti_ritz_radius)}: the core "
            f"scales the local rate by ×{fmt(factor)}") if np.isfinite(factor) else ""
    return (f"Jacobian along the trajectory: ‖J_{t}‖₂ ≥ {fmt(sweep.spectral_norm[-1])} (‖Ā‖₂ {fmt(sweep.lti_spectral_norm)}), "
            f"Ritz ρ(J_{t}) ≈ {fmt(sweep.spectral_radius[-1])} (ρ(Ā) {fmt(sweep.lti_spectral_radius)}){core}{h_txt}")


def _gain_evidence(G, sweep: JacobianSweep) -> str:
    cg = G.graph.get("cycle_gain", math.nan)
    rho = sweep.spectral_radius[-1] if len(sweep.spectral_radius) else math.nan
    verdict = "a contraction (small-gain bound < 1)" if cg < 1 else "inconclusive (small-gain bound ≥ 1)"
    return f"gain graph: cycle gain {fmt(cg)} — {verdict}; measured ρ(J) ≈ {fmt(rho)}"
