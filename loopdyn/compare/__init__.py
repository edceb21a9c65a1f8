"""Side-by-side training of injection parameterizations over a learning-rate grid.

Every run trains the same preset with the same seed, data, token budget and batch order;
only the injection (diagonal = Parcae, linear = Huginn/RDM, additive, or the fixed-depth twin
with the same number of distinct blocks) and the learning rate change. Along the way it records
ρ(Ā) and ‖Ā‖₂ of the injection and the per-loop state norms ‖h_t‖ on a fixed probe batch; at
the end, the validation loss at several test-time loop counts and an audit of the trained model.

Each finished run is one folder `runs/<name>/` holding `record.json` (written last, atomically:
its presence marks the run finished), the trained model, the step log and the alerts.

Outcome of a run: `loopdyn.compare.outcome` (converged / inconclusive / residual explosion /
diverged, by stated criteria). The package: `records` (RunSpec, RunRecord, CompareResult, the
grid, the `--out` folder), `outcome` (the outcome rule), `run` (one run), `runner` (the grid,
on a launcher through loopdyn.coordinator). The figures are in `loopdyn.plots.compare`; summary.json and report.html in
`loopdyn.report`.
"""
from loopdyn.compare.outcome import (DIVERGE_MARGIN, EXPLOSION_LOOPS, EXPLOSION_RATIO, MARGINAL_RATIO, MIN_TREND_STEPS,
                                     STEEP_DROP, STEEP_T, classify, smoothed, still_falling)
from loopdyn.compare.records import (INJECTIONS, OUTCOMES, RECORD, UNIT, CompareResult, RunRecord, RunSpec, grid,
                                     injections_in_order, load_record, prepare_out)
from loopdyn.compare.run import injection_norms, run_one, state_norms, test_time_loops
from loopdyn.compare.runner import _worker_init, quiet_resource_tracker, run_grid  # noqa: F401 - the launchers' pool
from loopdyn.io import OutLock  # noqa: F401 - the coordinator's lock

__all__ = [
    "DIVERGE_MARGIN", "EXPLOSION_LOOPS", "EXPLOSION_RATIO", "MARGINAL_RATIO", "MIN_TREND_STEPS", "STEEP_DROP",
    "STEEP_T", "classify", "smoothed", "still_falling", "INJECTIONS", "OUTCOMES", "RECORD", "UNIT",
    "CompareResult", "RunRecord", "RunSpec", "grid", "injections_in_order", "load_record", "prepare_out",
    "injection_norms", "run_one", "state_norms", "test_time_loops", "run_grid", "OutLock",
]
