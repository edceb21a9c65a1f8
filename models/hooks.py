"""Who watches a model: forward hooks, and the analyses they must not see (docs/design.md §3).

A training monitor watches the model through forward hooks (the state tap, attention, the
head: probes/bus.py); users and libraries may hook any module too. An analysis (dynamics/:
Jacobian products, Lyapunov exponents, forecasts, the exit-gate audit, a monitor's own
Jacobian probe) evaluates the same modules on its own inputs — other states, batched or
graph-carrying tensors — which no hook may see, and which must not change what the model
computes.

    silenced(model)    the analysis context: `in_analysis()` is True for its duration, and the
                       forward (pre-)hooks of `model`'s modules do not fire
    in_analysis()      loopdyn's own hooks (probes/bus.py) return at once when it is True
    watched(*modules)  a hook would fire if these modules were called (never inside an
                       analysis): a fused path that skips their calls must not be taken

PyTorch has no public switch that keeps a module's hooks from firing, so `silenced` sets the
hook registries aside and puts them back afterwards; this module is the only place in loopdyn
that touches them (reads in `watched`, the set-aside in `silenced`). A handle removed during
the analysis (`handle.remove()`) stays removed.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator

from torch import nn

_DEPTH = 0  # nesting depth of `silenced` contexts


def in_analysis() -> bool:
    """An analysis (`silenced`) is running: its model evaluations are not training steps."""
    return _DEPTH > 0


def watched(*modules: nn.Module) -> bool:
    """Some forward (pre-)hook would fire if one of `modules` were called (never inside an
    analysis, where hooks are silenced)."""
    return _DEPTH == 0 and any(m._forward_hooks or m._forward_pre_hooks for m in modules)


@contextlib.contextmanager
def silenced(model) -> Iterator[None]:
    """The analysis context for `model` (see the module docstring). A protocol model that is not
    an nn.Module has no hooks: only `in_analysis()` changes."""
    global _DEPTH
    saved = []
    if isinstance(model, nn.Module):
        for m in model.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                saved.append((m, m._forward_hooks, m._forward_pre_hooks))
                m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        for m, post, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = post, pre
