"""The compare grid and its records: `RunSpec` (one configuration), `RunRecord` (one finished
run, `runs/<name>/record.json`), `CompareResult`, the grid and the `--out` folder's contents.

docs/design.md ("loopdyn compare") states the record format; the outcome rule is in
`loopdyn.compare.outcome`, the training of one run in `loopdyn.compare.run` and the running
of the grid in `loopdyn.compare.runner`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loopdyn.models import LoopConfig
from loopdyn.models.config import INJECTIONS, canonical_injection
from loopdyn.models.errors import InputError

OUTCOMES = ("converged", "inconclusive", "residual explosion", "diverged")
RECORD = "record.json"
UNIT = "nats/byte"  # loopdyn.data reads every corpus as bytes (a 256-id vocabulary): losses are per byte


def injections_in_order(names) -> list[str]:
    """Parameterisations in the canonical order (INJECTIONS first, then any other, sorted)."""
    names = set(names)
    return [i for i in INJECTIONS if i in names] + sorted(names - set(INJECTIONS))


@dataclass(frozen=True)
class RunSpec:
    injection: str  # diagonal | linear | additive | autonomous | fixed
    lr: float
    seed: int = 0
    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    data: str | None = None
    dtype: str = "float32"  # loopdyn.models.precision name

    @property
    def name(self) -> str:
        return f"{self.injection}-lr{self.lr:g}-seed{self.seed}"

    def config(self) -> LoopConfig:
        base = LoopConfig.preset(self.preset)
        if self.injection == "fixed":
            return base.fixed_depth_twin(match="params")
        return base.replace(injection=self.injection)


@dataclass
class RunRecord:
    spec: dict
    params: int  # unique parameters
    mean_loops: int | None  # μ_rec (None for the fixed-depth twin)
    steps: int  # optimiser steps taken
    tokens: int
    seconds: float
    losses: list[float]  # training loss per step
    val_by_loops: dict[str, float]  # test-time loops → validation loss (nats/byte)
    probe_steps: list[int] = field(default_factory=list)
    spectral_radius: list[float] = field(default_factory=list)  # ρ(Ā) at each probe step
    spectral_norm: list[float] = field(default_factory=list)  # ‖Ā‖₂ at each probe step
    state_norms: list[list[float]] = field(default_factory=list)  # per probe step: ‖h_t‖, t = 0..4μ
    final_state_norms: list[float] = field(default_factory=list)  # trained model, t = 0..4μ
    alerts: list[dict] = field(default_factory=list)
    audit: dict | None = None  # verdict, evidence, growth rate of the trained model
    unigram_loss: float = float("nan")
    diverged: bool = False
    stop_reason: str | None = None
    outcome: str = ""
    outcome_reason: str = ""
    note: str = ""

    @classmethod
    def from_json(cls, data: dict, source: str) -> "RunRecord":
        try:
            record = cls(**data)
        except TypeError as err:
            raise InputError(f"{source}: not a loopdyn compare record ({err})") from None
        # JSON stores NaN/±Inf as null; restore them as NaN in every numeric field
        def numbers(x):
            if isinstance(x, list):
                return [numbers(v) for v in x]
            return float("nan") if x is None else x

        for name in ("losses", "spectral_radius", "spectral_norm", "state_norms", "final_state_norms"):
            setattr(record, name, numbers(getattr(record, name)))
        record.val_by_loops = {k: numbers(v) for k, v in record.val_by_loops.items()}
        return record


@dataclass
class CompareResult:
    out: Path
    records: list[RunRecord]
    skipped: list[str]  # runs found finished in `out` and not redone
    jobs: int = 1  # parallel processes used for the runs done now (for the report's header)
    threads: int = 1  # torch threads per process
    status: dict | None = None  # every run's state while the grid runs (loopdyn.coordinator.status_dict)

    def matrix(self) -> dict[str, dict[str, str]]:
        """injection → lr → outcome (one seed: its outcome; several: counts, e.g. '2/3 converged')."""
        cells: dict[str, dict[str, list[str]]] = {}
        for r in self.records:
            cells.setdefault(r.spec["injection"], {}).setdefault(f"{r.spec['lr']:g}", []).append(r.outcome)
        for r in (self.status or {}).get("runs", []):  # runs not finished: pending, running, failed
            if r["state"] != "done":
                cells.setdefault(r["injection"], {}).setdefault(f"{r['lr']:g}", []).append(r["state"])
        out = {}
        for inj, by_lr in cells.items():
            out[inj] = {}
            for lr, outcomes in by_lr.items():
                if len(set(outcomes)) == 1:
                    out[inj][lr] = outcomes[0]
                else:
                    out[inj][lr] = ", ".join(f"{outcomes.count(o)}/{len(outcomes)} {o}" for o in sorted(set(outcomes)))
        return out


def grid(injections: list[str], lrs: list[float], seeds: list[int], **common: Any) -> list[RunSpec]:
    injections = [canonical_injection(i) for i in injections]  # "none" → "fixed"
    unknown = [i for i in injections if i not in INJECTIONS]
    if unknown:
        raise InputError(f"unknown injection(s) {', '.join(unknown)}; choose from {', '.join(INJECTIONS)}")
    if not injections or not lrs or not seeds:
        raise InputError("the grid is empty: give at least one injection, learning rate and seed")
    bad = [lr for lr in lrs if not (lr > 0 and math.isfinite(lr))]
    if bad:
        raise InputError(f"--lrs: learning rates must be positive finite numbers, got {bad}")
    from loopdyn.models.checks import check_seed

    for s in seeds:
        check_seed(s, "--seeds")
    for option, values, show in (("--injections", injections, str), ("--lrs", lrs, lambda v: f"{v:g}"),
                                 ("--seeds", seeds, str)):
        seen: dict[str, Any] = {}
        for v in values:
            key = show(v)  # the run folder's name uses this spelling: 0.01 and 1e-2 are one run
            if key in seen:
                same = "twice" if seen[key] == v else f"twice ({seen[key]!r} and {v!r} name the same run)"
                raise InputError(f"{option}: {key} is given {same}; each grid value must be distinct")
            seen[key] = v
    return [RunSpec(injection=i, lr=lr, seed=s, **common) for i in injections for lr in lrs for s in seeds]


def prepare_out(out: Path, specs: list[RunSpec], resume: bool) -> tuple[list[RunSpec], list[RunRecord]]:
    """Check `out` and split the grid into runs to do and finished runs to keep.

    With `resume`, a finished run is kept only if it was made with exactly this run's settings
    (steps, batch size, sequence length, preset, data, ...); otherwise the command refuses,
    naming the run and the settings that differ."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"the grid holds the run {twice[0]} more than once")
    todo, done = [], []
    for spec in specs:
        run_dir = out / "runs" / spec.name
        record_path = run_dir / RECORD
        if record_path.exists():
            if not resume:
                raise InputError(f"{out}: already holds finished runs (e.g. {spec.name}); "
                                 f"use --resume to keep them or choose another --out")
            record = load_record(record_path)
            differ = _differing_settings(record.spec, spec)
            if differ:
                raise InputError(f"--resume: the stored run {run_dir} was made with other settings ({differ}); "
                                 f"use the same settings, another --out, or move that run away")
            done.append(record)
        else:
            todo.append(spec)
    return todo, done


def _differing_settings(stored: dict, spec: RunSpec) -> str:
    wanted = asdict(spec)
    stored = {"dtype": "float32", **stored}  # records written before --dtype existed
    parts = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            parts.append(f"{key.replace('_', '-')} {stored.get(key)!r} there, {wanted.get(key)!r} now")
    return "; ".join(parts)


def load_record(path: Path) -> RunRecord:
    try:
        from loopdyn.io import CONFIG_LIMIT, read_small_json

        data = read_small_json(path, CONFIG_LIMIT, "run record")
    except InputError as err:
        raise InputError(f"{path}: corrupted earlier run ({err}); move it away to redo that run") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: corrupted earlier run (not a JSON object); move it away to redo that run")
    return RunRecord.from_json(data, str(path))
