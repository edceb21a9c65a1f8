"""The forecast's results: one frozen record per model and the forecast itself (docs/design.md §4, §7).

The thresholds of the forecast's *models* (hindcast, selection) live here; the thresholds of the
*verdict* live in `loopdyn.dynamics.verdict`, the one rule table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from loopdyn.dynamics.verdict import UNIT_BAND, Verdict, large_state_unstable

HINDCAST_TOL = 0.5  # a model reproduces the past when it predicts the measured residual vectors within this
EXACT_HINDCAST = 1e-3  # an LTI hindcast this good means the loop is its LTI part
SELECT_BAND = (3.0, 0.05)  # candidates: hindcast error ≤ max(3 × the best, 0.05)
RATE_FLOOR = -20.0  # nats/loop reported for residuals that vanish
OVERFLOW = 3.0e38  # float32 max: beyond it the real loop is non-finite
LONG_RUN = 2000  # loops the reduced models are run for their asymptotic rate
MODEL_ORDER = {"LTI": 0, "Jacobian": 1, "trajectory": 2}  # preference on exact ties
BAND_PER_ERROR = 4.0  # a fitted rate's unit band is hindcast error / (4 w)
SAFE_WIDEN = 2.0  # the largest factor a prediction is widened by for max_safe_loops (the 2× accuracy target)
TREND_R2 = 0.9  # the measured-norm fallback calls a residual trend geometric above this goodness of fit


@dataclass(frozen=True)
class ForecastModel:
    """One residual-propagation model: its prediction for loops T..T+J (index 0 = the measured h_T).

    A model stage returns it with the prediction; `select.judge` returns a copy with the judged
    fields (verdict, first_unsafe, safe_bound, safe_limit, settle_loops, used, band) filled in."""

    name: str  # "trajectory" (DMD) | "LTI" | "Jacobian"
    total_norm: np.ndarray  # predicted whole-batch ‖ĥ_t‖
    residual: np.ndarray  # predicted whole-batch ‖r̂_t‖
    state_norm: np.ndarray  # predicted mean token ‖ĥ_t‖ (the units of `Forecast.state_norm`)
    rate: float  # asymptotic growth of the model's operator, nats per loop
    eigenvalues: np.ndarray  # the model's leading eigenvalues (complex, by decreasing modulus)
    detail: str  # evidence text
    hindcast_error: float = math.nan  # NaN: nothing to check against
    limit_state: float | None = None  # mean token ‖ĥ_∞‖ when the model converges
    verdict: str = ""  # the model's own verdict (set by `judge`)
    first_unsafe: int | None = None  # first loop this model puts outside the safe region
    safe_bound: int | None = None  # the same for its prediction widened by its hindcast error (max_safe_loops)
    safe_limit: float = math.nan
    settle_loops: int | None = None
    used: bool = True  # reproduces the past (hindcast error ≤ HINDCAST_TOL, or unchecked)
    band: float = UNIT_BAND  # its unit band: max(UNIT_BAND, hindcast error / w) for a fitted rate
    exact_rate: bool = False  # the rate is a known spectral radius (log ρ(Ā)), not a fitted one

    @property
    def checked(self) -> bool:
        return bool(np.isfinite(self.hindcast_error))


@dataclass(frozen=True)
class LargeState:
    """What the loop tends to at large states (`large_state.large_state_limit`)."""

    limit_is_lti: bool
    spectral_radius: float  # ρ(Ā), NaN without an LTI part
    ratios: tuple = ()  # δ(10), δ(1000)
    text: str = ""

    @property
    def forbids_stable(self) -> bool:
        """The limit is Ā with ρ(Ā) above 1 beyond the unit band: explosive (docs/design.md §4)."""
        return self.limit_is_lti and large_state_unstable(self.spectral_radius)


@dataclass(frozen=True)
class Forecast:
    """The forecast of the state norm to `horizon` loops and the verdict (docs/design.md §4, §7).

    Frozen: a later stage (the audit adding the overthinking analysis) returns a copy
    (`dataclasses.replace`)."""

    verdict: Verdict  # stable | marginal | explosive
    growth_rate: float  # the deciding model's asymptotic rate, nats per loop
    max_safe_loops: int
    horizon: int
    measured_loops: int
    state_norm: np.ndarray  # loops 1..H: mean token ‖h_t‖ (measured for t ≤ T, predicted after)
    rel_residual: np.ndarray  # loops 1..H, likewise
    safe_limit: float  # the safe bound in state_norm units
    evidence: list[str]  # "kind: text", the deciding one first
    decided_by: str  # "non-finite" | "trajectory" | "LTI" | "Jacobian"
    marginal_rate: float  # the unit band
    explosion_factor: float
    models: list[ForecastModel] = field(default_factory=list, repr=False)
    settle_loops: int | None = None  # stable: the loop by which the relative residual is ≤ settle_tol
    leading_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0, complex), repr=False)
    eigenvalue_source: str = ""  # which model the leading eigenvalues come from
    large_state: LargeState | None = None
    trained_depth: int = 0
    overthinking: object = None  # `Overthinking` of the probe loss past the trained depth, when computed

    @property
    def loops(self) -> list[int]:
        return list(range(1, self.horizon + 1))

    def to_json(self) -> dict:
        """The docs/design.md §7 `forecast` record."""
        return {"verdict": str(self.verdict), "growth_rate": float(self.growth_rate),
                "max_safe_loops": int(self.max_safe_loops), "loops": self.loops,
                "state_norm": [float(x) for x in self.state_norm],
                "measured_loops": int(self.measured_loops), "evidence": list(self.evidence)}
