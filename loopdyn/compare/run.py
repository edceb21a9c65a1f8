"""One compare run: train one configuration, measure it along the way and at the end, audit it,
and write its folder `runs/<name>/` (`record.json` last, atomically: its presence marks the run
finished), with the trained model, the step log and the alerts.

Along the way it records ρ(Ā) and ‖Ā‖₂ of the injection and the per-loop state norms ‖h_t‖ on a
fixed probe batch; at the end, the validation loss at several test-time loop counts and an
audit of the trained model (docs/design.md, "loopdyn compare").
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from loopdyn.compare.outcome import EXPLOSION_LOOPS, classify
from loopdyn.compare.records import RECORD, RunRecord, RunSpec
from loopdyn.data import load_text
from loopdyn.io import atomic_write_json, json_safe
from loopdyn.models import LoopedLM, protocol, save
from loopdyn.train import TrainConfig, evaluate, train


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
                      seed=spec.seed, eval_every=0, progress=False, log_path=str(run_dir / "train.jsonl"),
                      dtype=spec.dtype)
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
