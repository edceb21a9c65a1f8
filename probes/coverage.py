"""What the monitor measures in this run, and what it cannot (with the missing piece and the fix).

    family              signals                                   needs
    loss                loss                                      `.loss` in the model output, or record_loss()
    optimiser           grad_norm, update_ratio, lr, lr warnings  the optimiser
    loop state          state_norm(_max), rel_residual,           a LoopedModel, and its state_tap (hook mode)
                        state_growth                              or the batch's token ids (probe pass)
    output log Z        logz                                      logits in the output (hook mode), or
                                                                  token ids and `decode` (probe pass)
    attention logits    attn_logit_max                            modules with `max_logit`, their inputs
    injection spectrum  injection_radius, injection_norm          the loop's `linear_part`
    loop Jacobian       jacobian_norm                             a LoopedModel and token ids
    embedding           embed_outliers                            an nn.Embedding

The monitor logs the missing families once, at the first step, in one line; `coverage()` and
the run verdict repeat it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IDS_FIX = ("no token ids reached the monitor (Lightning: StabilityCallback(batch_to_ids=...); otherwise "
           "call monitor.record_inputs(idx) each step)")


@dataclass(frozen=True)
class Coverage:
    """measured: the signal families measured; missing: family → the missing piece and the fix."""

    measured: tuple = ()
    missing: dict = field(default_factory=dict)
    mode: str = "hooks"  # hooks | compile-safe

    def line(self) -> str:
        """One line naming each missing piece once (families that miss the same piece together)."""
        if not self.missing:
            return f"loopdyn monitor ({self.mode}): every signal family is measured"
        by_fix: dict[str, list[str]] = {}
        for family, fix in self.missing.items():
            by_fix.setdefault(fix, []).append(family)
        parts = [f"{', '.join(fams)}: {fix}" for fix, fams in by_fix.items()]
        return f"loopdyn monitor ({self.mode}): not measured — " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "measured": list(self.measured), "missing": dict(self.missing)}


def coverage(bus) -> Coverage:
    """The coverage of a SignalBus, judged from what reached it so far (call after a step)."""
    loop, seen, probe_mode = bus.loop, bus.seen, bus.compile_safe or bus.tap is None
    found: dict[str, str | None] = {}
    found["loss"] = None if seen["loss"] else ("no loss: the model output has no `.loss`; call "
                                               "monitor.record_loss(loss) each step")
    found["optimiser"] = None if bus.optimizer is not None else "no optimiser: pass it to StabilityMonitor"
    no_loop = ("no LoopedModel in the model: pass loop=loopdyn.models.LoopAdapter(...) "
               "(see loopdyn.models.protocol)")
    if loop is None:
        for fam in ("loop state", "output log Z", "loop Jacobian", "injection spectrum"):
            found[fam] = no_loop
    else:
        ids = None if seen["ids"] else IDS_FIX
        found["loop state"] = ids if probe_mode else None
        if seen["logits"] and not bus.compile_safe:
            found["output log Z"] = None
        elif probe_mode:  # the probe pass decodes h_T
            found["output log Z"] = ids if callable(getattr(loop, "decode", None)) else (
                "the loop has no decode(h, ctx): give LoopAdapter(decode=...)")
        else:
            found["output log Z"] = "no logits in the model output (`.logits`) and no output head found"
        found["loop Jacobian"] = ids
        found["injection spectrum"] = None if bus.spectrum is not None else (
            "the loop has no linear_part: give LoopAdapter(linear_part=...) if it has an LTI part")
    if not bus._attn_modules:
        found["attention logits"] = "no attention module offers max_logit(a, rope, ve)"
    elif bus.compile_safe or loop is not None:
        found["attention logits"] = None if (seen["ids"] or not bus.compile_safe) else IDS_FIX
    found["embedding"] = None if bus.embedding is not None else "no nn.Embedding in the model"
    for name in list(found):
        if name in bus.config.disable:
            del found[name]
    return Coverage(tuple(k for k, v in found.items() if v is None),
                    {k: v for k, v in found.items() if v is not None},
                    "compile-safe" if bus.compile_safe else "hooks")
