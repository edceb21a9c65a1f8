"""Side-by-side training of injection parameterizations over a learning-rate grid.

Every run trains the same preset with the same seed, data, token budget and batch order;
only the injection (diagonal = Parcae, linear = Huginn/RDM, additive, or the fixed-depth twin
with the same number of distinct blocks) and the learning rate change. Along the way it records
ρ(Ā) and ‖Ā‖₂ of the injection and the per-loop state norms ‖h_t‖ on a fixed probe batch; at
the end, the validation loss at several test-time loop counts and an audit of the trained model.

Each finished run is one folder `runs/<name>/` holding `record.json` (written last, atomically:
its presence marks the run finished), the trained model, the step log and the alerts. A run
trains in its own attempt folder and is renamed into `runs/` whole (loopdyn.gridstore); the
grid runs on a launcher (local, Ray, Slurm: loopdyn.launchers) under loopdyn.coordinator.

Outcome of a run (`classify`), by these stated criteria (tested on synthetic curves):

- diverged: the loss stopped being finite; or the final smoothed training loss is more than
  DIVERGE_MARGIN nats above its best smoothed value (it learned, then blew up); or the final
  validation loss is not below the unigram baseline while the training loss has stalled more
  than DIVERGE_MARGIN above that baseline (it did not even learn byte frequencies).
- residual explosion (not diverged): the trained loop's state blows up as loops grow: a state
  norm is not finite at T ≤ EXPLOSION_LOOPS·μ_rec, or ‖h_{4μ}‖ / ‖h_μ‖ > EXPLOSION_RATIO
  (geometric growth; linear growth, as with the additive injection, gives about 4).
- inconclusive (not diverged, no explosion): too short to judge. The final validation loss
  is not yet below the unigram baseline, but nothing diverged: the training loss is finite,
  has not risen from its best, and is either still falling steeply (`still_falling`: the
  mean of the last quarter of the steps is below the mean of the quarter before by more than
  STEEP_T standard errors and by at least STEEP_DROP nats) or resting on the unigram plateau
  (within DIVERGE_MARGIN of the baseline) that byte-level models sit on before they learn
  context; or the run has fewer than MIN_TREND_STEPS steps, too few to show a trend. A
  longer run decides it.
- converged: otherwise. A state that grows between 1.5× and EXPLOSION_RATIO over that range
  is noted as "state grows with loops" (marginal).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from loopdyn.models import LoopConfig, LoopedLM, protocol, save
from loopdyn.models.errors import InputError
from loopdyn.models.fileio import atomic_write_json, json_safe
from loopdyn.data import load_text
from loopdyn.train import TrainConfig, evaluate, train

INJECTIONS = ("diagonal", "linear", "additive", "autonomous", "fixed")
DIVERGE_MARGIN = 0.5  # nats
EXPLOSION_LOOPS = 4  # state norms are measured up to 4·μ_rec loops
EXPLOSION_RATIO = 10.0  # ‖h_{4μ}‖ / ‖h_μ‖ above this is a residual explosion
MARGINAL_RATIO = 1.5
STEEP_T = 2.0  # the last quarter's mean loss must be this many standard errors below the previous quarter's
STEEP_DROP = 0.02  # nats, and at least this much lower
MIN_TREND_STEPS = 8  # fewer steps cannot show a trend: such a run is inconclusive unless it diverged
OUTCOMES = ("converged", "inconclusive", "residual explosion", "diverged")
RECORD = "record.json"


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


# ---- classification -------------------------------------------------------------------------

def smoothed(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start); NaN stays NaN."""
    x = np.asarray(losses, dtype=float)
    if len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def still_falling(losses: list[float]) -> tuple[bool, float, float]:
    """(falling, drop, t): is the training loss still falling at the end of the run?

    drop = mean of the third quarter of the steps − mean of the last quarter (nats), t its
    Welch t statistic; falling when t ≥ STEEP_T and drop ≥ STEEP_DROP. Needs 8 steps."""
    x = np.asarray(losses, dtype=float)
    q = len(x) // 4
    if len(x) < MIN_TREND_STEPS or q < 2 or not np.isfinite(x).all():
        return False, float("nan"), float("nan")
    a, b = x[-2 * q:-q], x[-q:]
    drop = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / q + b.var(ddof=1) / q)
    t = drop / se if se > 0 else (math.inf if drop > 0 else 0.0)
    return bool(t >= STEEP_T and drop >= STEEP_DROP), drop, float(t)


def classify(losses: list[float], final_val: float | None, unigram: float,
             state_norms: list[float], mean_loops: int | None) -> tuple[str, str, str]:
    """(outcome, reason, note) by the criteria in the module docstring.

    `state_norms` are ‖h_t‖ of the trained model for t = 0..EXPLOSION_LOOPS·μ (empty for a
    fixed-depth model, with mean_loops None)."""
    x = np.asarray(losses, dtype=float)
    if len(x) == 0:
        return "diverged", "no training step finished", ""
    if not np.isfinite(x).all():
        step = int(np.argmin(np.isfinite(x))) + 1
        return "diverged", f"the loss became {x[step - 1]} at step {step}", ""
    s = smoothed(losses, max(5, len(x) // 10))
    if s[-1] > s.min() + DIVERGE_MARGIN:
        return "diverged", (f"the smoothed loss rose from {s.min():.2f} to {s[-1]:.2f} "
                            f"(> {DIVERGE_MARGIN} nats above its best)"), ""
    if final_val is not None and not math.isfinite(final_val):
        return "diverged", f"the validation loss is {final_val}", ""
    learned = final_val is not None and final_val < unigram
    pending = ""  # why the run is inconclusive, if it is
    if not learned:
        shown = "n/a" if final_val is None else f"{final_val:.3f}"
        falling, drop, t = still_falling(losses)
        if len(x) < MIN_TREND_STEPS:
            pending = (f"too short to judge: {len(x)} step(s) are too few to tell a trend (validation loss {shown}, "
                       f"unigram baseline {unigram:.3f}); nothing diverged")
        elif falling:
            pending = (f"too short to judge: validation loss {shown} is not yet below the unigram baseline "
                       f"{unigram:.3f}, and the training loss is still falling steeply (by {drop:.3f} nats "
                       f"between the last two quarters of the run, t = {t:.1f})")
        elif s[-1] <= unigram + DIVERGE_MARGIN:
            pending = (f"too short to judge: the training loss ({s[-1]:.3f}) rests on the unigram plateau "
                       f"({unigram:.3f}) without having risen; validation loss {shown}; "
                       f"a longer run decides whether it learns context")
        else:
            return "diverged", (f"validation loss {shown} is not below the unigram baseline {unigram:.3f}, and the "
                                f"training loss stalled at {s[-1]:.3f} (> {DIVERGE_MARGIN} above the baseline, "
                                f"not falling)"), ""
    if mean_loops is None or not state_norms:
        return ("inconclusive", pending, "") if pending else ("converged", f"validation loss {final_val:.3f}", "")
    norms = np.asarray(state_norms, dtype=float)
    if not np.isfinite(norms).all():
        t = int(np.argmin(np.isfinite(norms)))
        return "residual explosion", f"the state norm is not finite at T = {t}", ""
    mu, last = mean_loops, len(norms) - 1
    ratio = norms[last] / max(norms[mu], 1e-30)
    if ratio > EXPLOSION_RATIO:
        return "residual explosion", (f"‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.3g} > {EXPLOSION_RATIO:g} "
                                      f"(the state grows geometrically with loops)"), ""
    note = f"state grows with loops (‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.2f})" if ratio > MARGINAL_RATIO else ""
    if pending:
        return "inconclusive", pending, note
    return "converged", f"validation loss {final_val:.3f}; ‖h_{last}‖ / ‖h_{mu}‖ = {ratio:.2f}", note


# ---- measurements along a run -------------------------------------------------------------

@torch.no_grad()
def injection_norms(model: LoopedLM) -> tuple[float, float]:
    """(ρ(Ā), ‖Ā‖₂) of the injection's state operator, exactly (Ā is at most d_state²).

    `loopdyn.dynamics.injection_spectrum` gives these too, but also the Kreiss constant, which costs
    ~0.4 s for a 64-wide dense Ā: too slow for the 20 probes of every run."""
    part = protocol.linear_part(model)
    if part is None or not part.A.is_finite():
        return float("nan"), float("nan")
    return part.A.radius(), part.A.norm()


def state_norms(model: LoopedLM, idx: torch.Tensor, n_loops: int) -> list[float]:
    """Mean over batch and tokens of ‖h_t‖₂ for t = 0..n_loops (NaN from a non-finite state on)."""
    from loopdyn.dynamics import measure_trajectory  # imported on use: every `loopdyn` start loads this module

    return measure_trajectory(model, idx, n_loops, keep_states=False).state_norm.tolist()


def test_time_loops(mean_loops: int) -> list[int]:
    return sorted({1, max(1, mean_loops // 2), mean_loops, 2 * mean_loops, EXPLOSION_LOOPS * mean_loops})


# ---- one run ---------------------------------------------------------------------------------

def run_one(spec: RunSpec, run_dir: Path, progress: Callable[[int], None] | None = None,
            probes: int = 20, audit: bool = True) -> RunRecord:
    """Train one configuration and write its folder; return the record."""
    data = load_text(spec.data)
    config = spec.config()
    torch.manual_seed(spec.seed)
    model = LoopedLM(config)
    probe_x, _ = data.val_batches(1, 4, spec.seq_len)[0]
    mu = config.mean_loops if config.looped else None
    record = RunRecord(spec=asdict(spec), params=model.num_params(), mean_loops=mu, steps=0, tokens=0, seconds=0.0,
                       losses=[], val_by_loops={}, unigram_loss=data.unigram_loss())
    every = max(1, spec.steps // probes)

    def probe(step: int) -> None:
        record.probe_steps.append(step)
        if config.looped:
            rho, norm = injection_norms(model)
            record.spectral_radius.append(rho)
            record.spectral_norm.append(norm)
            record.state_norms.append(state_norms(model, probe_x, EXPLOSION_LOOPS * mu))

    def on_step(step: int, rec: dict) -> None:
        if progress:
            progress(1)
        if step % every == 0:
            probe(step)

    run_dir.mkdir(parents=True, exist_ok=True)
    probe(0)
    cfg = TrainConfig(steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, seq_len=spec.seq_len,
                      seed=spec.seed, eval_every=0, progress=False, log_path=str(run_dir / "train.jsonl"))
    result = train(model, data, cfg, monitor_factory=_monitor_factory(run_dir), on_step=on_step)
    record.steps, record.tokens, record.seconds = result.steps, result.tokens, result.seconds
    record.losses, record.diverged, record.stop_reason = result.losses, result.diverged, result.stop_reason
    loops = test_time_loops(mu) if mu else [0]
    for T in loops:
        val = evaluate(model, data, 4, spec.batch_size, spec.seq_len, n_loops=T if mu else None)
        record.val_by_loops[str(T)] = val
    if config.looped:
        record.final_state_norms = state_norms(model, probe_x, EXPLOSION_LOOPS * mu)
        if audit:
            record.audit = _audit_summary(model, probe_x, mu, run_dir)
    record.alerts = _read_alerts(run_dir / "alerts.jsonl")
    final_val = record.val_by_loops.get(str(mu) if mu else "0")
    record.outcome, record.outcome_reason, record.note = classify(
        record.losses, final_val, record.unigram_loss, record.final_state_norms, mu)
    save(model, run_dir / "model")
    atomic_write_json(run_dir / RECORD, json_safe(asdict(record)))
    return record


def _monitor_factory(run_dir: Path):
    """A StabilityMonitor writing alerts to the run folder, when probes are available."""
    try:
        from loopdyn.probes import StabilityMonitor
    except ImportError:
        return None

    def factory(model, optimizer):
        return StabilityMonitor(model, optimizer, jsonl=str(run_dir / "alerts.jsonl"), console=False)

    return factory


def _read_alerts(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _audit_summary(model: LoopedLM, idx: torch.Tensor, mu: int, run_dir: Path) -> dict | None:
    """Audit of the trained model (dynamics.audit), written in full to audit.json."""
    try:
        from loopdyn.dynamics import audit
    except ImportError:
        return None
    report = audit(model, idx, loops=2 * mu, horizon=EXPLOSION_LOOPS * mu)
    full = report.to_json()
    atomic_write_json(run_dir / "audit.json", full)
    forecast = full.get("forecast", {})
    return {"verdict": full.get("verdict"), "evidence": forecast.get("evidence"),
            "growth_rate": forecast.get("growth_rate"), "max_safe_loops": forecast.get("max_safe_loops"),
            "spectral_radius": full.get("injection", {}).get("spectral_radius"),
            "spectral_norm": full.get("injection", {}).get("spectral_norm")}


# ---- the grid ----------------------------------------------------------------------------------

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
    unknown = [i for i in injections if i not in INJECTIONS]
    if unknown:
        raise InputError(f"unknown injection(s) {', '.join(unknown)}; choose from {', '.join(INJECTIONS)}")
    if not injections or not lrs or not seeds:
        raise InputError("the grid is empty: give at least one injection, learning rate and seed")
    bad = [lr for lr in lrs if not (lr > 0 and math.isfinite(lr))]
    if bad:
        raise InputError(f"learning rates must be positive numbers, got {bad}")
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
    parts = []
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            parts.append(f"{key.replace('_', '-')} {stored.get(key)!r} there, {wanted.get(key)!r} now")
    return "; ".join(parts)


class OutLock:
    """An exclusive lock on an output folder, so two processes never write one --out.

    `out/.loopdyn.lock` holds the owner's pid; the lock itself is an `flock` on that file, which
    the kernel releases when the process ends in any way (kill -9 included), so a lock left by a
    dead process is simply taken over. Where flock does not exist, the pid in the file decides:
    a lock whose process is gone is taken over."""

    NAME = ".loopdyn.lock"
    _held: dict[str, list] = {}  # realpath of a lock file this process holds → [fd, depth]

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / self.NAME
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> "OutLock":
        self.out.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in OutLock._held:  # this process holds it already (a command around run_grid)
            OutLock._held[key][1] += 1
            self._nested = True
            return self
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    holder = self._holder(fd)
                    raise InputError(f"{self.out}: in use by another loopdyn process"
                                     f"{f' (pid {holder})' if holder else ''}; wait for it to finish or "
                                     f"choose another --out")
                # the file may have been removed by its previous owner after we opened it
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                OutLock._held[key] = [fd, 1]
                return self
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                raise
        raise InputError(f"{self.out}: could not take the lock {self.path}")

    @staticmethod
    def _lock(fd: int) -> bool:
        try:
            import fcntl
        except ImportError:  # no flock: decide by the pid in the file
            holder = OutLock._holder(fd)
            from loopdyn.models.fileio import _pid_alive

            return not (holder and holder != os.getpid() and _pid_alive(holder))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    @staticmethod
    def _holder(fd: int) -> int | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 32).decode().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        key = os.path.realpath(self.path)
        if self._nested:
            self._nested = False
            if key in OutLock._held:
                OutLock._held[key][1] -= 1
            return
        OutLock._held.pop(key, None)
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still holding it: a waiting process re-checks the inode
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def load_record(path: Path) -> RunRecord:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: corrupted earlier run ({err}); move it away to redo that run") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: corrupted earlier run (not a JSON object); move it away to redo that run")
    return RunRecord.from_json(data, str(path))


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent (which stops them), so they print no tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_grid(specs: list[RunSpec], out: Path, resume: bool = False, jobs: int | None = None,
             progress: bool = True, log: Callable[[str], None] = print, threads: int | None = None,
             launcher=None, on_update: Callable[[CompareResult], None] | None = None) -> CompareResult:
    """Run every spec not already finished in `out` on `launcher` (default: this machine, in
    parallel processes when jobs > 1; loopdyn.launchers), through loopdyn.coordinator. `out` is
    leased and locked for the whole time: a second coordinator on it is refused."""
    from loopdyn.coordinator import coordinate
    from loopdyn.launchers.local import LocalLauncher

    launcher = launcher or LocalLauncher(jobs, threads)
    return coordinate(specs, Path(out), launcher, resume=resume, progress=progress, log=log, on_update=on_update)
