"""Test-time loop sweeps: validation loss at T = 1..N loops, as a CSV for the scaling laws
(`loopdyn sweep-loops CHECKPOINT`, then `loopdyn fit CSV --law testtime`; docs/design.md §7).

One unroll per batch: the prelude runs once, the loop steps N times, and the readout/coda/head
decode the state after every step, so the sweep costs N loop steps and N decodes per batch
instead of the N(N+1)/2 steps of N separate `model(idx, n_loops=T)` calls. Each loss equals
`loopdyn.train.evaluate(model, data, K, B, S, n_loops=T)`: the mean over the same K fixed
validation batches of the mean cross-entropy per token (nats; bytes for the default corpus).

The CSV (written atomically) has the header `loops,mean_recurrence,params,tokens,loss`:
`mean_recurrence` is the trained μ_rec, `params` the unrolled parameter count N(μ_rec)
(`loopdyn.scaling.flops.unrolled_params`, embeddings included), `tokens` the training tokens D:
`--tokens`, else what loopdyn's trainer recorded in the checkpoint
(`config.extra["train_tokens"]`), else empty (the test-time law does not need it, the unified
law does). `loopdyn fit CSV --law testtime` reads the file as is.
A non-finite loss (a loop count where the model blows up) is written as `nan`/`inf` and named
in a warning: `loopdyn fit` refuses such rows, so lower `--max-loops` to fit.

Loops past the trained depth. The sweep also says whether the model *overthinks* — the loss rises
past the trained depth μ (by more than 0.5%, `loopdyn.dynamics.overthinking.overthinking`) — and
the best test-time loop count, with the dynamical reason from a forecast of the loop on the first
validation sequence to N loops and its per-token phases (`--no-dynamics` skips that forecast).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from loopdyn.dynamics.loopmap import MAX_LOOPS  # larger max_loops values are refused as a typo
from loopdyn.dynamics.overthinking import loop_overthinking, sweep_losses
from loopdyn.models import LoopConfig, LoopedLM, protocol
from loopdyn.models.errors import InputError
from loopdyn.scaling.flops import unrolled_params

CSV_HEADER = ("loops", "mean_recurrence", "params", "tokens", "loss")


@dataclass
class LoopSweep:
    """Validation loss (nats per token) at T = loops[i] loops for one model."""

    loops: np.ndarray  # 1..N
    loss: np.ndarray
    mean_recurrence: int  # trained μ_rec
    params: int | None  # unrolled parameters N(μ_rec); None when the model is not a loopdyn config
    tokens: float | None  # training tokens D, if known
    eval_tokens: int  # validation tokens per loss value
    overthinking: object = None  # loopdyn.dynamics.overthinking.Overthinking

    def to_csv(self) -> str:
        buf = io.StringIO()
        buf.write(",".join(CSV_HEADER) + "\n")
        tokens = "" if self.tokens is None else f"{self.tokens:.17g}"
        params = "" if self.params is None else str(self.params)
        for T, loss in zip(self.loops, self.loss):
            buf.write(f"{int(T)},{self.mean_recurrence},{params},{tokens},{float(loss):.9g}\n")
        return buf.getvalue()

    def table(self) -> str:
        """A text table: T, loss, change against T = μ_rec (or the largest T, if smaller)."""
        mu = self.mean_recurrence
        ref_T = min(mu, len(self.loss))
        ref = float(self.loss[ref_T - 1])
        lines = [f"{'loops':>5}  {'loss':>9}  {f'vs T={ref_T}':>8}"]
        for T, loss in zip(self.loops, self.loss):
            rel = 100.0 * (float(loss) / ref - 1.0) if math.isfinite(ref) and ref else math.nan
            note = "  <- trained mean" if T == mu else ""
            lines.append(f"{int(T):>5}  {float(loss):>9.5f}  {rel:>+7.2f}%{note}")
        return "\n".join(lines)


def require_loop(model) -> None:
    """An InputError (one line, the protocol's reason) unless `model` is a looped model."""
    try:
        protocol.require_looped(model)
    except protocol.ProtocolError as err:
        raise InputError(str(err)) from None


def sweep_loops(model: LoopedLM, data, max_loops: int | None = None, *, n_batches: int = 16,
                batch_size: int = 16, seq_len: int = 64, tokens: float | None = None,
                progress: bool = False, dynamics: bool = True) -> LoopSweep:
    """Sweep T = 1..max_loops (default 3·μ_rec) on `n_batches` fixed validation batches of
    `data` (a loopdyn.data.TextData) and return a LoopSweep; its `overthinking` says whether the loss
    rises past μ_rec and the best loop count (with the dynamical reason when dynamics=True)."""
    require_loop(model)
    mu = model.mean_loops
    _, max_len = protocol.token_limits(model)
    if max_loops is None:
        max_loops = 3 * mu
    check_positive("max-loops", max_loops)
    if max_loops > MAX_LOOPS:
        raise InputError(f"--max-loops {max_loops} is too large (at most {MAX_LOOPS})")
    for name, v in (("batches", n_batches), ("batch-size", batch_size), ("seq-len", seq_len)):
        check_positive(name, v)
    if max_len is not None and seq_len > max_len:
        raise InputError(f"--seq-len {seq_len} is longer than the model supports ({max_len} tokens)")
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise InputError(f"--tokens must be a positive number, got {tokens:g}")
    config = getattr(model, "config", None)
    if tokens is None and isinstance(config, LoopConfig):
        tokens = config.extra.get("train_tokens")  # recorded by loopdyn's trainer
    batches = data.val_batches(n_batches, batch_size, seq_len)
    from loopdyn.progress import progress as progress_bar

    bar = progress_bar(n_batches * max_loops, "sweep-loops") if progress else None
    try:
        loss = sweep_losses(model, batches, max_loops, on_step=(bar.update if bar else None))
    finally:
        if bar is not None:
            bar.close()
    params = unrolled_params(config, mu) if isinstance(config, LoopConfig) else None
    sweep = LoopSweep(loops=np.arange(1, max_loops + 1), loss=loss, mean_recurrence=mu, params=params, tokens=tokens,
                      eval_tokens=n_batches * batch_size * seq_len)
    sweep.overthinking = loop_overthinking(model, sweep.loops, sweep.loss, mu, batches[0][0][:1] if dynamics else None)
    return sweep


def check_positive(name: str, v) -> None:
    """An InputError naming the option `--name` unless `v` is a positive integer."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"--{name} must be a positive integer, got {v!r}")


def spans(values: list[int]) -> str:
    """1, 2, 3, 7 -> "1, 2, 3, 7"; 4..9 when contiguous."""
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
