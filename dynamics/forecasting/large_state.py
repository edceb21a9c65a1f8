"""The large-state limit: does the loop tend to its LTI part Ā at large states? (docs/design.md §4)"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from loopdyn.dynamics.forecasting.result import ForecastModel, LargeState
from loopdyn.dynamics.loopmap import Cost, analysis
from loopdyn.dynamics.numbers import fmt
from loopdyn.dynamics.verdict import UNIT_BAND
from loopdyn.models import protocol
from loopdyn.models.weights import all_finite

def large_state_limit(model, ctx, h: torch.Tensor, h_next: torch.Tensor, part, cost: Cost | None = None,
                      scales=(10.0, 1000.0)) -> LargeState:
    """Does the loop tend to its LTI part at large states? Two loop steps.

    A loop whose core is sublinear at large states tends to its LTI part there: with u = s·h (h a
    measured state, h_next = F(h) the next one), the core's increment c(u) = F(u) − Āu − B̄e − b is
    compared at s = 10 and 1000: δ(s) = ‖c(s h) − c(h)‖ / ‖(s − 1) h‖. δ(1000) ≤ 0.05 and falling like
    1/s (δ(1000) ≤ 0.1 δ(10), or ≤ 1e-3) means the limit is Ā (a pre-norm core: its sublayers see
    norm(u)). Then ρ(Ā) > 1 is explosive: the core may hold the state for a while, but a large enough
    state grows like ρ(Ā)ᵗ; with ρ(Ā) < 1 growth past the horizon saturates. A model whose state is
    renormalised inside the step (`state_norm_kind` "pre"/"post") has no large-state growth: skipped."""
    if part is None:
        return LargeState(False, math.nan, (), "no LTI part (the model has no linear_part()): the large-state "
                                                "limit is not known and the LTI model is skipped")
    rho = float(part.A.radius()) if part.A.is_finite() else math.nan
    kind = protocol.state_norm_kind(model)
    if kind != "none":
        return LargeState(False, rho, (), f"the state is renormalised inside the step (state_norm_kind "
                                          f"'{kind}'): ‖h‖ cannot grow without bound")
    if not part.A.is_finite():
        return LargeState(False, rho, (), "Ā is not finite")
    ratios = []
    with analysis(model):
        base = h_next.to(torch.float64) - part.A.apply(h.to(torch.float64))  # c(h) + B̄e + b
        for s in scales:
            x = (s * h).to(h.dtype)
            y = model.step(x, ctx)
            if cost is not None:
                cost.steps += 1
            if not all_finite(y):
                ratios.append(math.inf)
                continue
            c = y.to(torch.float64) - part.A.apply(x.to(torch.float64)) - base  # c(s h) − c(h)
            ratios.append(float(c.norm()) / max(float(((s - 1) * h.to(torch.float64)).norm()), 1e-300))
    lo, hi = ratios
    sublinear = math.isfinite(hi) and hi <= 0.05 and (hi <= 0.1 * lo or hi <= 1e-3)
    if sublinear:
        text = (f"the core is sublinear at large states (its increment is {fmt(lo)} of the state at 10× h, "
                f"{fmt(hi)} at 1000×): the loop tends to Ā, ρ(Ā) = {fmt(rho)}"
                + (" > 1: it cannot be stable — at large states the state grows like ρ(Ā)ᵗ, the core can only "
                   "hold it for a while" if rho > 1 else " < 1: large states contract" if rho < 1 else ""))
    else:
        text = (f"the core does not fade at large states (increment {fmt(lo)} of the state at 10× h, "
                f"{fmt(hi)} at 1000×): the large-state limit is not Ā")
    return LargeState(bool(sublinear), rho, tuple(ratios), text)


def large_state_floor(m: ForecastModel, large: LargeState) -> ForecastModel:
    """A prediction corrected by the large-state limit: when the loop tends to Ā at
    large states with ρ(Ā) > 1, a state the core cannot hold grows like ρ(Ā)ᵗ, so a model that grows
    slower (rate < log ρ(Ā) − UNIT_BAND: it does not know that growth) is raised to
    ‖ĥ_{T+j}‖ ≥ ‖h_T‖ ρ(Ā)ʲ at the rate log ρ(Ā) (docs/design.md §4). Returns a new result."""
    if not large.forbids_stable or not m.rate < math.log(large.spectral_radius) - UNIT_BAND:
        return m
    rate = math.log(large.spectral_radius)
    j = np.arange(len(m.state_norm), dtype=float)
    with np.errstate(over="ignore"):
        grow = np.exp(rate * j)
    return replace(m, total_norm=np.fmax(m.total_norm, m.total_norm[0] * grow),
                   state_norm=np.fmax(m.state_norm, m.state_norm[0] * grow), rate=rate, exact_rate=True,
                   limit_state=None,
                   detail=m.detail + f"; raised to the large-state growth ‖h_T‖ ρ(Ā)ʲ (ρ(Ā) = {fmt(large.spectral_radius)}: "
                                     f"its own rate {fmt(m.rate)}/loop is slower)")
