"""The explosion forecast in stages (docs/design.md §4): what does the state do as the loop count
grows past what was measured?

One module per stage, each returning frozen results (no stage mutates another's):

* `result`      — `ForecastModel` (one model's prediction, then its judged copy), `LargeState`, `Forecast`;
* `common`      — the measured loops in float64, exact per-token norms, the hindcast window, propagation;
* `dmd`         — the trajectory model (exact DMD of the measured residual vectors);
* `lti`         — the LTI model (the loop's exact Ā);
* `jacobian`    — the Jacobian model (J_T in Krylov spaces) and the Krylov runs the audit shares;
* `measured`    — the measured-norm fallback;
* `large_state` — the large-state limit (does the loop tend to Ā?) and its correction of a model;
* `select`      — judging each model, selecting the one that decides, the verdict, the `Forecast`;
* `api`         — `forecast(model, idx, …)` and `forecast_from(model, traj, …)`.

The package is `forecasting` (not `forecast`) so that `loopdyn.dynamics.forecast` stays the function.
"""
from loopdyn.dynamics.forecasting.api import forecast, forecast_from, lyapunov_evidence
from loopdyn.dynamics.forecasting.common import forecast_loops, hindcast_window
from loopdyn.dynamics.forecasting.jacobian import (KrylovResult, Subspace, jacobian_model, jacobian_subspace, krylov_at,
                                                   lti_projection)
from loopdyn.dynamics.forecasting.large_state import large_state_floor, large_state_limit
from loopdyn.dynamics.forecasting.result import Forecast, ForecastModel, LargeState
from loopdyn.dynamics.forecasting.select import combine, judge, nonfinite_forecast, select

__all__ = ["Forecast", "ForecastModel", "KrylovResult", "LargeState", "Subspace", "combine", "forecast", "forecast_from",
           "forecast_loops", "hindcast_window", "jacobian_model", "jacobian_subspace", "judge", "krylov_at",
           "large_state_floor", "large_state_limit", "lti_projection", "lyapunov_evidence", "nonfinite_forecast",
           "select"]
