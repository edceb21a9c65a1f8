"""The per-loop lens: what the model "thinks" at every loop, per token and summarised.

For every loop t = 1..H (the long run) and every token n, read from `LoopSignals`: the loss
−log p_t(target) (nats), the entropy H(p_t) (nats), whether the top-1 prediction agrees with
the long-run one (argmax p_t = argmax p_H), KL(p_H ‖ p_t) (nats), the relative residual
‖h_t − h_{t−1}‖/‖h_t‖, the top-1 token itself, and per token its long-run phase label. The summary
per loop is the mean over tokens (the loss over tokens with a target) and the fraction of tokens
whose top-1 agrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _list(a, digits: int = 6) -> list:
    return [None if not math.isfinite(float(x)) else round(float(x), digits) for x in np.ravel(a)]


@dataclass(frozen=True)
class LoopLens:
    """Per loop t = 1..H (index t − 1), per token n (module docstring)."""

    loops: int  # H
    mean_loops: int  # μ
    loss: np.ndarray  # (H, N)
    entropy: np.ndarray
    top1_agreement: np.ndarray  # (H, N) bool
    kl_to_long_run: np.ndarray
    rel_residual: np.ndarray
    top1: np.ndarray  # (H, N) int
    phases: tuple  # (N,)

    @property
    def n_tokens(self) -> int:
        return int(self.loss.shape[1])

    def summary(self) -> dict:
        """Per loop the mean over tokens (loss over scored tokens), and the fraction agreeing."""
        scored = np.isfinite(self.loss).all(0)
        loss = self.loss[:, scored].mean(1) if scored.any() else np.full(self.loops, np.nan)
        return {"loss": loss, "entropy": self.entropy.mean(1), "top1_agreement": self.top1_agreement.mean(1),
                "kl_to_long_run": self.kl_to_long_run.mean(1), "rel_residual": self.rel_residual.mean(1)}

    def phase_counts(self) -> dict:
        out: dict = {}
        for lab in self.phases:
            out[lab] = out.get(lab, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_text(self, every: int | None = None) -> str:
        s = self.summary()
        step = every or max(1, self.loops // 16)
        lines = [f"per-loop lens ({self.n_tokens} tokens, {self.loops} loops; trained depth μ = {self.mean_loops}; "
                 f"phases: {', '.join(f'{k} {v}' for k, v in self.phase_counts().items())})",
                 f"  {'loop':>4} {'loss':>8} {'entropy':>8} {'top-1 = long run':>16} {'KL to long run':>14} "
                 f"{'residual':>9}"]
        shown = sorted(set(range(1, self.loops + 1, step)) | {self.mean_loops, self.loops})
        for t in shown:
            i = t - 1
            mark = "  <- μ" if t == self.mean_loops else ""
            lines.append(f"  {t:>4} {s['loss'][i]:>8.4g} {s['entropy'][i]:>8.4g} "
                         f"{100 * s['top1_agreement'][i]:>15.1f}% {s['kl_to_long_run'][i]:>14.3g} "
                         f"{s['rel_residual'][i]:>9.3g}{mark}")
        return "\n".join(lines)

    def to_json(self, per_token: bool = True) -> dict:
        s = self.summary()
        out = {"loops": list(range(1, self.loops + 1)), "mean_loops": self.mean_loops, "tokens": self.n_tokens,
               "summary": {k: _list(v) for k, v in s.items()}, "phase_counts": self.phase_counts()}
        if per_token:  # [loop][token]
            out["per_token"] = {
                "loss": [_list(r, 5) for r in self.loss], "entropy": [_list(r, 5) for r in self.entropy],
                "top1_agreement": self.top1_agreement.astype(int).tolist(),
                "kl_to_long_run": [_list(r, 6) for r in self.kl_to_long_run],
                "rel_residual": [_list(r, 6) for r in self.rel_residual], "top1": self.top1.tolist(),
                "phase": list(self.phases)}
        return out


def loop_lens(signals) -> LoopLens:
    """The lens of a measured loop (`loop_signals`)."""
    return LoopLens(signals.horizon, signals.mean_loops, signals.loss, signals.entropy, signals.top1_final,
                    signals.kl_final, signals.rel_residual, signals.argmax, tuple(signals.phases))


__all__ = ["LoopLens", "loop_lens"]
