"""Dynamics of looped language models: the loop h_{t+1} = F(h_t) as a dynamical system.

Linearisation and spectra (matrix-free, torch autograd products wrapped as SciPy
LinearOperators), the LTI surrogate of the injection, finite-time Lyapunov exponents, the
explosion forecast, the signal-flow gain graph, and `audit`, which combines them
(docs/design.md §4). Scaling laws and FLOP counts are in `loopdyn.scaling`.
"""
from __future__ import annotations

import importlib
import importlib.util

# Public name → the submodule that defines it. Submodules are imported on first use, so that
# importing one of them does not load networkx and the whole analysis stack.
_EXPORTS = {
    "audit_report": ["AuditReport", "JacobianSweep", "ModelInfo"],
    "auditing": ["audit"],
    "audit_text": ["format_report"],
    "forecasting": ["Forecast", "ForecastModel", "forecast"],
    "gain": ["gain_graph", "gain_graph_json"],
    "jacobian": ["LoopJacobian", "LTIJacobian", "PerTokenSpectra", "SpectralEstimate", "loop_jacobian",
                 "lti_jacobian", "per_token_spectra", "token_block", "top_eigenvalues", "top_singular_values"],
    "loopmap": ["Cost", "DynamicsError", "Linearisation"],
    "lti": ["InjectionSpectrum", "injection_spectrum", "kreiss_constant", "lti_fixed_point"],
    "lyapunov_exponents": ["LyapunovResult", "lyapunov"],
    "overthinking": ["Overthinking"],
    "trajectory": ["Trajectory", "measure_trajectory"],
    "verdict": ["Verdict", "Outcome", "RunStatus"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"loopdyn.dynamics.{_WHERE[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    # Submodules (`loopdyn.dynamics.phases`, ...) are imported when asked for.
    if not name.startswith("_") and importlib.util.find_spec(f"loopdyn.dynamics.{name}") is not None:
        return importlib.import_module(f"loopdyn.dynamics.{name}")
    raise AttributeError(f"module 'dynamics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
