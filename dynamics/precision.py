"""The precision audit: what rounding in the compute dtype does to the loop.

The same probe runs twice from the same h_0: in the reference precision (float32; float64
when the target itself is float32) and in the target precision (bfloat16, float16, or a mixed
precision: autocast over float32 weights). Each run encodes, loops and decodes in its own
precision (the prelude rounds too, as in the real run); h_0 is the reference's, cast to the
target's state dtype. Per loop t = 1..T:

* relative state divergence per token  d_t = ‖h_t^low − h_t^ref‖₂ / ‖h_t^ref‖₂, and its
  distribution over the B·S tokens (median, 90th percentile, max);
* the share of tokens whose next-token argmax differs, and the mean KL(p_ref ‖ p_low) of the two
  output distributions (nats per token);
* for a model with an exit gate, the share of tokens whose exit loop changes (threshold rule,
  each run's rule in its own arithmetic).

Why, in the terms of the dynamics. A rounding error δ_k made at loop k is carried to loop t by
the product of the loop Jacobians J_{t−1}⋯J_k. On an expanding loop (leading finite-time
Lyapunov exponent λ₁ > 0) the absolute divergence ‖h^low − h^ref‖ grows like e^{λ₁ t} until it
is as large as the state (times a power t^γ, γ ∈ [0, 1], from the rounding of later loops); the
measured divergence rate (λ̂ of log ‖h^low_t − h^ref_t‖ = log c + λ̂ t + γ log t, fitted over the
loops where the relative divergence is still below SATURATION: `divergence_rate`) is reported
next to λ₁ of the reference loop. On a contracting loop (λ₁ < 0) the rounding is forgotten at the rate of the
contraction and the divergence saturates at about u·κ, u the unit roundoff of the compute dtype
and κ = 1/(1 − e^{λ₁}) the condition of the fixed point (‖(I − J)⁻¹‖ for a normal J); the
measured plateau is reported next to that prediction.

The LTI part in the compute dtype. Ā is computed from the parameters (Parcae:
exp(−Δ·exp(A_log))) in the dtype the model runs in; every entry whose modulus rounds to ≥ 1
there is flagged (bf16 has no number between 1 − 2⁻⁹ and 1: a decay of 0.9999 is stored as
exactly 1.0), and ρ(Ā) is reported as stored (the float32/float64 parameters) and as computed.
The verdict in the compute dtype is the worse of the audit's verdict there and that of the LTI
part there (ρ(Ā) as computed: < 1 stable, = 1 marginal, > 1 explosive): an injection that is a
contraction in float32 can sit on the unit circle in bf16, and the guarantee it gave is gone.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from loopdyn.dynamics.loopmap import analysis, require_loop
from loopdyn.models import protocol
from loopdyn.models.precision import MixedPrecisionLoop, Precision, dtype_name, model_precision, precision

SATURATION = 0.1  # relative divergence above which the divergence no longer grows freely (fit stops)
SEVERITY = {"stable": 0, "marginal": 1, "explosive": 2}


@dataclass(frozen=True)
class FlaggedEntry:
    """An entry of Ā (diagonal index, or (row, col) for a dense Ā) whose modulus rounds to ≥ 1."""

    index: tuple
    stored: float  # |Ā| in the stored precision (float64 of the parameters)
    computed: float  # |Ā| as computed in the compute dtype

    def to_json(self) -> dict:
        return {"index": list(self.index), "stored": self.stored, "computed": self.computed}


@dataclass(frozen=True)
class PrecisionAudit:
    """What the compute dtype does to the loop, loop by loop (module docstring)."""

    dtype: str  # target precision name (models/precision.py)
    reference: str  # "float32" (or "float64" for a float32 target)
    unit_roundoff: float  # u of the compute dtype
    loops: np.ndarray  # 1..T
    divergence_median: np.ndarray  # (T,) relative state divergence per token: median over tokens
    divergence_p90: np.ndarray
    divergence_max: np.ndarray
    divergence_tokens: np.ndarray = field(repr=False)  # (T, tokens)
    absolute_divergence: np.ndarray = field(repr=False)  # (T,) ‖h^low − h^ref‖ over the batch
    argmax_changed: np.ndarray = field(repr=False)  # (T,) share of tokens whose argmax differs
    kl: np.ndarray = field(repr=False)  # (T,) mean KL(p_ref ‖ p_low), nats per token
    exit_changed: float | None = None  # share of tokens whose exit loop changes (exit-gate models)
    divergence_rate: float = math.nan  # nats/loop, λ̂ of ‖h^low − h^ref‖ ≈ c·t^γ·e^{λ̂t} before saturation
    fit_loops: tuple = ()  # (first, last) loop of the fit
    lyapunov: float = math.nan  # λ₁ of the reference loop, nats/loop
    regime: str = "n/a"  # "expanding" | "contracting" | "n/a"
    predicted_plateau: float = math.nan  # u·κ, κ = 1/(1 − e^{λ₁}) (contracting loops)
    measured_plateau: float = math.nan  # median relative divergence over the last loops
    flagged: tuple = ()  # FlaggedEntry, every entry of Ā whose modulus rounds to ≥ 1
    n_entries: int = 0  # entries of Ā checked
    rho_stored: float = math.nan  # ρ(Ā) of the stored parameters (float64 arithmetic on them)
    rho_computed: float = math.nan  # ρ(Ā) as computed in the compute dtype
    verdict: str | None = None  # verdict in the compute dtype
    verdict_reference: str | None = None  # the float32 verdict
    reason: str = ""

    def to_json(self) -> dict:
        f = _num
        return {
            "dtype": self.dtype, "reference": self.reference, "unit_roundoff": self.unit_roundoff,
            "loops": [int(t) for t in self.loops],
            "divergence": {"median": f(self.divergence_median), "p90": f(self.divergence_p90),
                           "max": f(self.divergence_max), "absolute": f(self.absolute_divergence)},
            "argmax_changed": f(self.argmax_changed), "kl": f(self.kl), "exit_changed": _num(self.exit_changed),
            "divergence_rate": _num(self.divergence_rate), "fit_loops": list(self.fit_loops),
            "lyapunov": _num(self.lyapunov), "regime": self.regime,
            "predicted_plateau": _num(self.predicted_plateau), "measured_plateau": _num(self.measured_plateau),
            "flagged": [e.to_json() for e in self.flagged[:100]], "n_flagged": len(self.flagged),
            "n_entries": int(self.n_entries),
            "rho_stored": _num(self.rho_stored), "rho_computed": _num(self.rho_computed),
            "verdict": None if self.verdict is None else str(self.verdict),
            "verdict_reference": None if self.verdict_reference is None else str(self.verdict_reference),
            "reason": self.reason,
        }

    def to_text(self) -> str:
        g = _g
        T = len(self.loops)
        lines = [f"precision audit: {self.dtype} against {self.reference} from the same h_0 "
                 f"(unit roundoff {g(self.unit_roundoff)})"]
        lines.append(f"  {'loop':>4} {'d median':>10} {'d p90':>10} {'d max':>10} {'argmax≠':>8} {'KL nats':>10}")
        for i in sorted(set(np.unique(np.linspace(0, T - 1, min(T, 8)).round().astype(int)))):
            lines.append(f"  {int(self.loops[i]):>4} {g(self.divergence_median[i]):>10} {g(self.divergence_p90[i]):>10} "
                         f"{g(self.divergence_max[i]):>10} {100 * self.argmax_changed[i]:>7.2f}% {g(self.kl[i]):>10}")
        if self.exit_changed is not None:
            lines.append(f"  exit loop changes for {100 * self.exit_changed:.2f}% of tokens")
        if self.regime == "expanding":
            lines.append(f"  expanding loop (λ₁ = {g(self.lyapunov)}/loop): divergence grows at {g(self.divergence_rate)}"
                         f"/loop (loops {self.fit_loops[0]}..{self.fit_loops[1]}), rounding is amplified like e^(λ₁ t)"
                         if self.fit_loops else f"  expanding loop (λ₁ = {g(self.lyapunov)}/loop)")
        elif self.regime == "contracting":
            lines.append(f"  contracting loop (λ₁ = {g(self.lyapunov)}/loop): rounding is forgotten; divergence "
                         f"plateau {g(self.measured_plateau)} vs u·κ = {g(self.predicted_plateau)}"
                         + (f"; measured rate {g(self.divergence_rate)}/loop" if math.isfinite(self.divergence_rate) else ""))
        if self.n_entries:
            lines.append(f"  Ā: ρ {g(self.rho_stored)} as stored, {g(self.rho_computed)} as computed in {self.dtype}; "
                         f"{len(self.flagged)} of {self.n_entries} entries round to modulus ≥ 1")
        if self.verdict is not None:
            same = self.verdict == self.verdict_reference or self.verdict_reference is None
            beside = "" if same else f" (in {self.reference if self.reference == 'float32' else 'float32'}: " \
                                     f"{str(self.verdict_reference).upper()})"
            lines.append(f"  VERDICT in {self.dtype}: {str(self.verdict).upper()}{beside} — {self.reason}")
        return "\n".join(lines)


def _num(x):
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return [None if not np.isfinite(v) else float(v) for v in x]
    x = float(x)
    return x if math.isfinite(x) else None


def _g(x) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}"


# ---- running the loop in a precision -----------------------------------------------------------

@contextlib.contextmanager
def parameters_in(model, dtype: torch.dtype):
    """The model's floating-point parameters cast to `dtype` for the duration, then put back
    exactly (the originals are kept, so float32 → bf16 → float32 loses nothing)."""
    saved = []
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                saved.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield model
    finally:
        for p, data in saved:
            p.data = data


def _base(model):
    return model.inner if isinstance(model, MixedPrecisionLoop) else model


@contextlib.contextmanager
def running_in(model, prec: Precision):
    """`model` as it runs in `prec`: parameters cast (pure) or under autocast (mixed)."""
    base = _base(model)
    with parameters_in(base, prec.weights):
        yield MixedPrecisionLoop(base, prec) if prec.mixed else base


@dataclass
class _Run:
    states: list  # h_1..h_T (float64 copies are made lazily)
    logp: list  # log-softmax of the logits at each loop, float64 (T of (B, S, V)) — or None
    gate: np.ndarray | None  # (T, B, S) exit probabilities λ_t, or None


def _run(model, idx, h0, T: int, decode: bool) -> _Run:
    with analysis(model):
        ctx = model.encode(idx)
        h = h0.to(model.init_state(ctx).dtype)
        states, logp, gate = [], [], []
        has_gate = callable(getattr(model, "exit_gate", None))
        for _ in range(T):
            h = model.step(h, ctx)
            states.append(h)
            if decode:
                logp.append(F.log_softmax(model.decode(h, ctx).to(torch.float64), dim=-1))
            if has_gate:
                gate.append(model.exit_gate(h, ctx).detach().to(torch.float64).cpu().numpy())
    return _Run(states, logp if decode else None, np.array(gate) if gate else None)


# ---- the audit ---------------------------------------------------------------------------------

def precision_audit(model, idx: torch.Tensor, loops: int | None = None, dtype=None, *,
                    reference=None, lyapunov: float | None = None, exit_threshold: float = 0.5,
                    verdict: str | None = None, verdict_reference: str | None = None,
                    decode: bool = True) -> PrecisionAudit:
    """The precision audit of `model` on the probe `idx` (B, S) over `loops` loops (default μ_rec).

    dtype: the target precision (default: the one the model runs in, `model_precision`);
    reference: float32 (float64 when the target is float32). lyapunov: λ₁ of the loop (nats/loop)
    when the caller has it (the audit does); otherwise it is measured here on the reference loop.
    verdict / verdict_reference: the audit's verdicts in the target and in float32, combined with
    the LTI part as computed in each (module docstring). The model's parameters are cast for each
    run and put back exactly afterwards; decode=False skips the output distributions.
    """
    require_loop(model)
    T = model.mean_loops if loops is None else int(loops)
    low = precision(dtype) if dtype is not None else model_precision(model)
    ref = precision(reference) if reference is not None else \
        precision("float64" if low.compute == torch.float32 and not low.mixed else "float32")
    base = _base(model)
    with running_in(base, ref) as m_ref:
        with analysis(m_ref):
            ctx = m_ref.encode(idx)
            h0 = protocol.initial_state(m_ref, ctx)
        r_ref = _run(m_ref, idx, h0, T, decode)
        lti_ref = _lti(m_ref)
        if lyapunov is None:
            from loopdyn.dynamics.lyapunov_exponents import lyapunov as lyap_fn

            lyapunov = float(lyap_fn(m_ref, idx, T, k=1).exponents[0])
    with running_in(base, low) as m_low:
        r_low = _run(m_low, idx, h0, T, decode)
        lti_low = _lti(m_low)

    med, p90, mx, absd = (np.full(T, math.nan) for _ in range(4))
    per_token = np.full((T, h0[..., 0].numel()), math.nan)
    flips, kl = np.full(T, math.nan), np.full(T, math.nan)
    for t in range(T):
        a, b = r_low.states[t].detach().to(torch.float64), r_ref.states[t].detach().to(torch.float64)
        diff = torch.linalg.vector_norm(a - b, dim=-1)
        norm = torch.linalg.vector_norm(b, dim=-1).clamp_min(1e-300)
        d = (diff / norm).reshape(-1).cpu().numpy()
        per_token[t] = d
        if np.all(np.isfinite(d)):
            med[t], p90[t], mx[t] = np.median(d), np.quantile(d, 0.9), d.max()
        absd[t] = float(torch.linalg.vector_norm(a - b))
        if decode:
            lp_low, lp_ref = r_low.logp[t], r_ref.logp[t]
            flips[t] = float((lp_low.argmax(-1) != lp_ref.argmax(-1)).double().mean())
            kl[t] = float((lp_ref.exp() * (lp_ref - lp_low)).sum(-1).clamp_min(0).mean())
    exit_changed = None
    if r_ref.gate is not None and r_low.gate is not None:
        from loopdyn.dynamics.exit_gate import exit_loops

        e_ref = exit_loops(r_ref.gate, exit_threshold, ref.compute)
        e_low = exit_loops(r_low.gate, exit_threshold, low.compute)
        exit_changed = float(np.mean(e_ref != e_low))

    rate, fit = divergence_rate(absd, med)
    lam = float(lyapunov) if lyapunov is not None else math.nan
    regime = "n/a" if not math.isfinite(lam) else ("expanding" if lam > 0 else "contracting")
    kappa = 1.0 / max(1.0 - math.exp(lam), 1e-12) if regime == "contracting" else math.nan
    tail = med[-max(1, T // 4):]
    plateau = float(np.median(tail)) if np.all(np.isfinite(tail)) else math.nan

    flagged, n_entries, rho_stored, rho_computed = _compare_lti(lti_ref, lti_low)
    v_low = v_ref = None
    reason = ""
    if verdict is not None:
        v_low, reason = combine_verdict(verdict, rho_computed, len(flagged), low.name)
        v_ref, _ = combine_verdict(verdict_reference if verdict_reference is not None else verdict,
                                   lti_ref[1] if lti_ref else math.nan, 0, ref.name)
    return PrecisionAudit(low.name, ref.name, low.unit_roundoff, np.arange(1, T + 1), med, p90, mx, per_token, absd,
                          flips, kl, exit_changed, rate, fit, lam, regime, low.unit_roundoff * kappa, plateau,
                          tuple(flagged), n_entries, rho_stored, rho_computed, v_low, v_ref, reason)


def divergence_rate(absolute: np.ndarray, relative: np.ndarray) -> tuple[float, tuple]:
    """The divergence rate λ̂ (nats/loop) of ‖h^low_t − h^ref_t‖ over the first run of loops
    (1-based) where the divergence is nonzero, finite and the median relative divergence is below
    SATURATION (at least 3 loops; else NaN, ()); returns (λ̂, (first, last)).

    A rounding error made at loop s is carried to loop t with gain e^{λ₁(t−s)}, so the divergence
    is a sum of such terms, ‖h^low_t − h^ref_t‖ ≈ c · t^γ · e^{λ₁ t}: γ = 0 when the first
    rounding dominates (a bounded state), ½ when every loop's fresh rounding is as large as the
    amplified old ones and they add in quadrature (a state growing at λ₁), 1 when they add
    coherently (a fixed perturbation, such as rounded weights, on a growing state). The plain
    slope of log ‖·‖ would overstate λ₁ by γ/t (10–15 % at λ₁ = 0.18 over loops 1–40), so λ̂ is
    the least-squares fit of log ‖·‖ = log c + λ̂ t + γ log t with γ constrained to [0, 1].
    """
    t = np.arange(1, len(absolute) + 1, dtype=np.float64)
    ok = np.isfinite(absolute) & (absolute > 0) & np.isfinite(relative) & (relative < SATURATION)
    # the free-growth window: from the first usable loop to the last one before saturation
    idx = np.flatnonzero(ok)
    if idx.size < 3:
        return math.nan, ()
    stop = idx[0]
    while stop + 1 < len(ok) and ok[stop + 1]:
        stop += 1
    if stop + 1 - idx[0] < 3:
        return math.nan, ()
    sel = slice(idx[0], stop + 1)
    tt, y = t[sel], np.log(absolute[sel])
    window = (int(tt[0]), int(tt[-1]))
    if tt.size >= 4:  # (c, λ, γ) by least squares; γ outside [0, 1] → refit at the nearer bound
        (_, lam, gamma), *_ = np.linalg.lstsq(np.stack([np.ones_like(tt), tt, np.log(tt)], 1), y, rcond=None)
        if 0.0 <= gamma <= 1.0:
            return float(lam), window
        gamma = min(max(gamma, 0.0), 1.0)
    else:
        gamma = 0.0
    return float(np.polyfit(tt, y - gamma * np.log(tt), 1)[0]), window


def combine_verdict(verdict: str, rho_computed: float, n_flagged: int, dtype: str) -> tuple[str, str]:
    """The worse of the audit's verdict and the LTI part's as computed in `dtype`, with the reason."""
    lti = "stable"
    if math.isfinite(rho_computed):
        lti = "explosive" if rho_computed > 1 else "marginal" if rho_computed >= 1 else "stable"
    verdict = str(verdict)
    flags = (f"{n_flagged} entr{'y' if n_flagged == 1 else 'ies'} of Ā round to modulus ≥ 1 in {dtype}, so the "
             f"injection no longer contracts those channels (a rounding effect the float32 loop does not have)")
    if SEVERITY.get(lti, 0) > SEVERITY.get(verdict, 0):
        return lti, f"ρ(Ā) as computed in {dtype} is {rho_computed:.6g}: {flags}"
    why = f"the audit's verdict in {dtype}"
    if math.isfinite(rho_computed):
        why += f"; ρ(Ā) as computed {rho_computed:.6g}"
    return verdict, why + (f"; {flags}" if n_flagged else "")


def _lti(model):
    """(|Ā| entries as a float64 numpy array in the model's arithmetic, ρ(Ā) float64) or None."""
    from loopdyn.models.operator import DiagonalOperator, IdentityOperator

    part = protocol.linear_part(model)
    if part is None:
        return None
    A = part.A
    if isinstance(A, IdentityOperator):
        return np.ones(1), 1.0
    if isinstance(A, DiagonalOperator):  # the entries are the eigenvalues
        mod = np.abs(A.diagonal_numpy())
        return mod, float(mod.max()) if mod.size else math.nan
    M64 = A.dense_numpy()
    return np.abs(M64), float(np.abs(np.linalg.eigvals(M64)).max()) if M64.size else math.nan


def _compare_lti(ref, low):
    if ref is None or low is None:
        return [], 0, math.nan, math.nan
    (m_ref, rho_ref), (m_low, rho_low) = ref, low
    flagged = []
    if m_ref.shape == m_low.shape and m_ref.ndim == 1:  # a diagonal Ā: entries are its eigenvalues
        for i in np.flatnonzero((m_low >= 1) & (m_ref < 1)):
            flagged.append(FlaggedEntry((int(i),), float(m_ref[i]), float(m_low[i])))
    elif m_ref.shape == m_low.shape:
        for i, j in zip(*np.nonzero((m_low >= 1) & (m_ref < 1))):
            flagged.append(FlaggedEntry((int(i), int(j)), float(m_ref[i, j]), float(m_low[i, j])))
    return flagged, int(m_ref.size), rho_ref, rho_low


def audit_with_precision(model, idx: torch.Tensor, report, *, loops: int, horizon: int, dtype=None,
                         exit_threshold: float = 0.5, audit_kwargs: dict | None = None,
                         progress=None) -> PrecisionAudit:
    """The precision audit beside a finished `report` (an AuditReport of `model` in `dtype`,
    default the model's own precision): λ₁ from the report, the verdict in the compute dtype
    from the report, the float32 verdict from a second audit with the parameters in float32
    (the cost of `--precision`: one more audit, plus two plain runs with decoding). The result
    is also stored as `report.precision`."""
    from loopdyn.dynamics.auditing import audit

    low = precision(dtype) if dtype is not None else model_precision(model)
    verdict_ref = report.verdict
    if not low.is_default:
        with running_in(model, precision("float32")) as m32:
            kwargs = dict(audit_kwargs or {})
            kwargs.pop("progress", None)
            verdict_ref = audit(m32, idx, loops, horizon, exit_threshold=exit_threshold, progress=progress,
                                **kwargs).verdict
    lam = float(report.lyapunov.exponents[0]) if len(report.lyapunov.exponents) and report.lyapunov.loops else None
    if lam is not None and not math.isfinite(lam):
        lam = None
    result = precision_audit(model, idx, loops, low, lyapunov=lam, exit_threshold=exit_threshold,
                             verdict=report.verdict, verdict_reference=verdict_ref)
    report.precision = result
    return result
