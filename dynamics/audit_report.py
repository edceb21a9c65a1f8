"""The audit's results: `AuditReport` and its parts (docs/design.md §7).

`AuditReport.to_json()` is the docs/design.md §7 record, exactly; `AuditReport.to_text()` the terminal
report (`audit_text`). The pipeline that fills it is `auditing.audit`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loopdyn.dynamics.forecasting import Forecast
from loopdyn.dynamics.gain import gain_graph_json
from loopdyn.dynamics.loopmap import Cost
from loopdyn.dynamics.lti import InjectionSpectrum
from loopdyn.dynamics.lyapunov_exponents import LyapunovResult
from loopdyn.dynamics.trajectory import Trajectory
from loopdyn.dynamics.verdict import Verdict

VERDICTS = tuple(v.value for v in Verdict)


@dataclass
class ModelInfo:
    path: str | None
    format: str  # "loopdyn" | "parcae" | "huginn" | "ouro" | "adapter" (in memory: loopdyn or adapter, path None)
    injection: str
    params: int
    d_state: int
    mean_loops: int

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "injection": self.injection,
                "params": int(self.params), "d_state": int(self.d_state), "mean_loops": int(self.mean_loops)}


@dataclass
class JacobianSweep:
    """‖J_t‖₂ and ρ(J_t) at the measured states h_t (J_t = ∂h_{t+1}/∂h_t at h_t)."""

    loops: list[int]
    spectral_norm: np.ndarray  # lower bounds (Golub–Kahan–Lanczos Ritz values)
    spectral_radius: np.ndarray  # Arnoldi Ritz estimates
    method: str
    matvecs: int  # products with J or Jᵀ used for these estimates
    hindcast_error: np.ndarray  # ‖J_t r_t − r_{t+1}‖/‖r_{t+1}‖ (how well the linearisation predicts the next residual)
    lti_spectral_norm: float = math.nan  # ‖Ā‖₂, the LTI part alone
    lti_spectral_radius: float = math.nan
    lti_ritz_radius: float = math.nan  # Ritz ρ of I ⊗ Ā on the same Krylov space as J at the last loop

    def to_json(self) -> dict:
        return {"loops": list(self.loops), "spectral_norm": [float(x) for x in self.spectral_norm],
                "spectral_radius": [float(x) for x in self.spectral_radius], "method": self.method,
                "matvecs": int(self.matvecs)}

    def core_factor(self) -> float:
        """How much the nonlinear core changes the local rate of the LTI part: the Ritz ρ of J_T
        over the Ritz ρ of I ⊗ Ā on the same Krylov space (like for like: for a non-normal
        operator a short Arnoldi run can overshoot ρ, equally for both)."""
        if not len(self.spectral_radius) or not self.lti_ritz_radius > 0:
            return math.nan
        return float(self.spectral_radius[-1] / self.lti_ritz_radius)


@dataclass
class AuditReport:
    """Everything an audit found; `to_json()` is docs/design.md §7."""

    model: ModelInfo
    injection: InjectionSpectrum
    trajectory: Trajectory
    jacobian: JacobianSweep
    lyapunov: LyapunovResult
    forecast: Forecast
    gain: object  # networkx.DiGraph (or None when it could not be built)
    verdict: str
    probe: str = ""
    cost: Cost = field(default_factory=Cost)
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # "part: why" for each analysis the model's members did not allow
    normalised: object = None  # NormalisedLoop, for a loop that renormalises its state (state_norm_kind ≠ "none")
    exit_gate: object = None  # ExitGateAudit, for a model with an exit gate
    phases: object = None  # loopdyn.dynamics.phases.Phases (None: not computed)
    precision: object = None  # loopdyn.dynamics.precision.PrecisionAudit (`audit --precision`)

    def to_json(self) -> dict:
        gain = gain_graph_json(self.gain) if self.gain is not None else {"nodes": [], "edges": [], "cycle_gain": None}
        return {"model": self.model.to_json(), "injection": self.injection.to_json(),
                "trajectory": self.trajectory.to_json(), "jacobian": self.jacobian.to_json(),
                "lyapunov": self.lyapunov.to_json(), "forecast": self.forecast.to_json(),
                "gain_graph": gain, "verdict": str(self.verdict), "skipped": list(self.skipped),
                "normalised": None if self.normalised is None else self.normalised.to_json(),
                "exit_gate": None if self.exit_gate is None else self.exit_gate.to_json(),
                "phases": self.phases.to_json() if self.phases is not None else None,
                "precision": None if self.precision is None else self.precision.to_json()}

    def to_text(self) -> str:
        from loopdyn.dynamics.audit_text import format_report

        return format_report(self)
