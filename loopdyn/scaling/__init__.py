"""Scaling laws and FLOP counts of looped language models (docs/design.md §7).

- `loopdyn.scaling.forms`: the laws' functional forms and `predict_law` (test-time, Parcae,
  unified, routed), with the routed law's `effective_params` and `n_cutoff`;
- `loopdyn.scaling.fit`: `fit_law` and its wrappers, `LawFit`, `compare_testtime`;
- `loopdyn.scaling.powerlaw`: `fit_power_law`, isoFLOP parabolas, compute-optimal exponents;
- `loopdyn.scaling.data`: `read_law_csv`;
- `loopdyn.scaling.report`: `format_fit`, `fit_warnings` (the text `loopdyn fit` prints);
- `loopdyn.scaling.flops`: unrolled parameter counts and FLOPs from a `LoopConfig`;
- `loopdyn.scaling.sweep`: `sweep_loops`, the test-time loop sweep of a checkpoint, and its CSV
  (`LoopSweep`) — both imported on use.

Everything but `flops` and `sweep` is re-exported here: `from loopdyn import scaling; scaling.fit_law(...)`.
"""
from loopdyn.scaling.data import read_law_csv
from loopdyn.scaling.fit import (LawFit, TestTimeComparison, compare_testtime, fit_law, fit_parcae, fit_routed,
                                 fit_testtime, fit_unified, holdout_mask)
from loopdyn.scaling.forms import (CLARK_N_CUTOFF, CLARK_PUBLISHED, COLUMNS, LAW_COLUMNS, LAW_PARAMS, LAWS,
                                   PARCAE_PUBLISHED, TESTTIME_FORMS, effective_params, n_cutoff, predict_law,
                                   routed_loss, saturating_experts)
from loopdyn.scaling.powerlaw import (ComputeOptimalFit, IsoFLOPFit, PowerLawFit, fit_compute_optimal, fit_isoflop,
                                      fit_power_law)
from loopdyn.scaling.report import fit_warnings, format_fit

__all__ = [
    "COLUMNS", "LAWS", "TESTTIME_FORMS", "LAW_COLUMNS", "LAW_PARAMS",
    "PARCAE_PUBLISHED", "CLARK_PUBLISHED", "CLARK_N_CUTOFF",
    "LawFit", "TestTimeComparison", "PowerLawFit", "IsoFLOPFit", "ComputeOptimalFit",
    "read_law_csv", "fit_law", "fit_testtime", "compare_testtime", "fit_parcae",
    "fit_unified", "fit_routed", "predict_law",
    "saturating_experts", "routed_loss", "effective_params", "n_cutoff",
    "fit_power_law", "fit_isoflop", "fit_compute_optimal", "holdout_mask", "format_fit", "fit_warnings",
]
