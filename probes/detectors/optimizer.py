"""Learning-rate and optimiser-setting changes, read before the update they will drive
(`OptimizerWatch`): a precursor source of the early-warning detector."""
from __future__ import annotations

import math
from dataclasses import dataclass

from loopdyn.probes.detectors.base import Detector, Precursor

SIGNAL = "param_groups"  # update(step, "param_groups", (groups, n_state))


@dataclass
class OptimizerWatch(Detector):
    """Learning-rate and optimiser-setting changes, read in the optimiser's step pre-hook, i.e.
    BEFORE the update they will drive (host values of param_groups: no device sync).

    update(step, "param_groups", (groups, n_state)): groups is, per param group, a dict with
    "lr" and the other scalar settings; n_state the number of parameters with optimiser state.
    The precursors found by the last update are in `new`; compute(step) returns those seen within
    the last `hold` steps (the strongest per signal).

    jump    lr ≥ `jump` × the previous step's lr in any group (after 3 steps; a linear warm-up
            rises by (k+1)/k ≤ 2 per step): strong on its own.
    climb   after the lr has not risen for `settle` steps (warm-up over), it rises to
            ≥ climb[0]× (moderate) / ≥ climb[1]× (strong) that plateau: a ramp.
    setting any other hyper-parameter of a group changes (betas, eps, weight decay, …), or the
            optimiser state is reset (fewer parameters with state): moderate.
    hold    a precursor counts for the step it was seen on and `hold` steps after.
    """

    jump: float = 3.0
    settle: int = 10
    hold: int = 5
    climb: tuple = (1.5, 3.0)

    def __post_init__(self) -> None:
        if not self.jump > 1:
            raise ValueError(f"OptimizerWatch: jump must be > 1, got {self.jump!r}")
        self._groups: list[dict] = []
        self._n_state = 0
        self._found: list[tuple[int, Precursor]] = []
        self.new: list[Precursor] = []

    def update(self, step: int, signal: str, value) -> None:
        if signal != SIGNAL:
            return
        groups, n_state = value
        new: list[Precursor] = []
        if len(groups) != len(self._groups):
            self._groups = [{"prev": None, "peak": 0.0, "since": 0, "base": None, "seen": 0, "settings": None}
                            for _ in groups]
        moderate, strong = self.climb
        for gi, (g, st) in enumerate(zip(groups, self._groups)):
            lr = g.get("lr")
            if isinstance(lr, (int, float)) and math.isfinite(lr):
                prev = st["prev"]
                if prev and st["seen"] >= 2 and lr >= self.jump * prev:
                    new.append(Precursor("lr", 1.0, f"learning rate of group {gi} jumped ×{lr / prev:.3g} "
                                         f"({prev:.3g} → {lr:.3g}) at this step", lead=0.0, value=lr,
                                         magnitude=lr / prev, absolute=True))
                if lr > st["peak"] * (1 + 1e-9):
                    if st["base"] is None and st["since"] >= self.settle:
                        st["base"] = st["peak"]
                    st["peak"], st["since"] = lr, 0
                else:
                    st["since"] += 1
                    if st["since"] >= self.settle:
                        st["base"] = None
                if st["base"]:
                    ratio = lr / st["base"]
                    if ratio >= moderate:
                        new.append(Precursor("lr", 1.0 if ratio >= strong else 0.5,
                                             f"learning rate of group {gi} climbing: ×{ratio:.3g} its plateau "
                                             f"{st['base']:.3g}", value=lr, magnitude=ratio, absolute=True))
                st["prev"], st["seen"] = lr, st["seen"] + 1
            settings = {k: v for k, v in g.items() if k != "lr"}
            if st["settings"] is not None:
                changed = [k for k, v in settings.items() if st["settings"].get(k) != v]
                if changed:
                    what = ", ".join(f"{k} {st['settings'].get(k)!r} → {settings[k]!r}" for k in changed)
                    new.append(Precursor("optimizer", 0.5, f"optimiser setting changed in group {gi}: {what}",
                                         value=math.nan, magnitude=1.0, absolute=True))
            st["settings"] = settings
        if n_state < self._n_state:
            new.append(Precursor("optimizer", 0.5, f"optimiser state reset ({self._n_state} → {n_state} "
                                 "parameters with state)", value=float(n_state), magnitude=1.0,
                                 absolute=True))
        self._n_state = n_state
        self._found = [(s, p) for s, p in self._found if step - s <= self.hold] + [(step, p) for p in new]
        self.new = new

    def compute(self, step: int) -> list[Precursor]:
        """The precursors seen within the last `hold` steps; the strongest per signal."""
        best: dict[str, Precursor] = {}
        for s, p in self._found:
            if step - s <= self.hold and (p.signal not in best or p.score > best[p.signal].score):
                best[p.signal] = p
        return list(best.values())

    def state_dict(self) -> dict:
        return {"groups": [dict(g) for g in self._groups], "n_state": self._n_state}

    def load_state_dict(self, state: dict) -> None:
        self._groups = [dict(g) for g in state["groups"]]
        self._n_state = int(state["n_state"])
