"""Dynamics of looped language models: the loop h_{t+1} = F(h_t) as a dynamical system.

Linearisation and spectra (matrix-free, torch autograd products wrapped as SciPy
LinearOperators), the LTI surrogate of the injection, finite-time Lyapunov exponents, the
explosion forecast, the signal-flow gain graph, and `audit`, which combines them
(shared/DESIGN.md §4). `dynamics.laws` (scaling laws) is a separate module, imported on use.
"""
from __future__ import annotations

import importlib
import importlib.util

from dynamics.audit_report import AuditReport, JacobianSweep, ModelInfo, audit, format_report
from dynamics.explosion import Forecast, ForecastModel, forecast
from dynamics.gain import gain_graph, gain_graph_json
from dynamics.jacobian import (LoopJacobian, LTIJacobian, PerTokenSpectra, SpectralEstimate, loop_jacobian,
                               lti_jacobian, per_token_spectra, token_block, top_eigenvalues,
                               top_singular_values)
from dynamics.loopmap import Cost, DynamicsError, Linearisation
from dynamics.lti import InjectionSpectrum, injection_spectrum, kreiss_constant, lti_fixed_point
from dynamics.lyapunov_exponents import LyapunovResult, lyapunov
from dynamics.trajectory import Trajectory, measure_trajectory

__all__ = [
    "injection_spectrum", "InjectionSpectrum", "kreiss_constant", "lti_fixed_point",
    "loop_jacobian", "LoopJacobian", "lti_jacobian", "LTIJacobian", "top_singular_values",
    "top_eigenvalues", "per_token_spectra", "token_block", "SpectralEstimate", "PerTokenSpectra",
    "lyapunov", "LyapunovResult", "forecast", "Forecast", "ForecastModel", "gain_graph",
    "gain_graph_json", "audit", "AuditReport", "JacobianSweep", "ModelInfo", "format_report",
    "measure_trajectory", "Trajectory", "Linearisation", "Cost", "DynamicsError", "laws",
]


def __getattr__(name: str):
    # Submodules written separately (`dynamics.laws`, `dynamics.flops`) are imported only when
    # asked for, so that a missing or broken one never breaks the rest of the package.
    if not name.startswith("_") and importlib.util.find_spec(f"dynamics.{name}") is not None:
        return importlib.import_module(f"dynamics.{name}")
    raise AttributeError(f"module 'dynamics' has no attribute {name!r}")
