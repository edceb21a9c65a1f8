"""The loop's signal-flow graph with per-edge gains, and the small-gain bound of the cycle.

Nodes are signals of one loop step h → h' (and the readout):

    h ──Ā──▶ Ā ──▶ u ◀── B̄e          u = Ā h + B̄ e (+ b)
    u ──▶ core.0.attn ──▶ core.0.attn+res ◀── u            (pre-norm block j: residual skip)
      core.0.attn+res ──▶ core.0.mlp ──▶ core.0.mlp+res ◀── core.0.attn+res
      … last block's mlp+res ──▶ h                         (the next loop)
    h ──C──▶ C                                             (readout to the coda)

Edge gains (attribute `kind` says which):

* `spectral_norm`: exact operator 2-norms, ‖Ā‖₂ (edge h → Ā) and ‖C‖₂ (edge h → C); the
  input node B̄e carries ‖B̄‖₂ as its `gain` attribute.
* `local_lipschitz`: for each sublayer increment x ↦ attn(norm₁(x)) or x ↦ mlp(norm₂(x)) the
  largest singular value of its Jacobian at the sublayer's actual input on the probe
  trajectory (the last measured state), from a few Golub–Kahan–Lanczos steps: a measured
  local Lipschitz constant (a lower bound on the sublayer's global one; attention has none).
  For sandwich blocks, whose output norm sits after the residual sum, the edge carries the
  gain of the whole normalised map and there is no skip edge.
* `identity`: sums, skips and the loop's return edge, gain 1.

Cycle gain = ‖Ā‖₂ · Π_blocks Π_sublayers (1 + g) for pre-norm blocks (the skip and the branch
in parallel: Lip(x + f(x)) ≤ 1 + Lip f), or · g for sandwich ones. It is a small-gain bound:
below 1, the loop step is a contraction near the trajectory (a unique, attracting fixed
point). It is sufficient, not necessary: residual factors are ≥ 1, so a stable loop can have
a cycle gain above 1; compare it with the measured ρ(J) and ρ(Ā).
"""
from __future__ import annotations

import math

import networkx as nx
import torch

from loopdyn.dynamics.jacobian import norm_lower_bound
from loopdyn.dynamics.loopmap import Cost, DynamicsError, Linearisation, analysis, require_loop
from loopdyn.dynamics.trajectory import run_loop
from loopdyn.models import protocol
from loopdyn.models.weights import all_finite


def _local_gain(fn, x: torch.Tensor, model, steps: int, cost: Cost, seed: int) -> float:
    def w0(shape):  # a random start in fn's output space
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.device)

    s, _, _, _ = norm_lower_bound(Linearisation.of(fn, x, model, cost, w0=w0), steps)
    return float(s[0])


def gain_graph(model, idx: torch.Tensor | None = None, *, h: torch.Tensor | None = None, ctx=None,
               n_loops: int | None = None, steps: int = 4, cost: Cost | None = None, seed: int = 0) -> nx.DiGraph:
    """The loop's signal-flow DiGraph with edge gains (see the module docstring).

    The sublayer gains are measured at state h with context ctx if given; else at the state
    after n_loops (default mean_loops) loops on idx (required then). Built from the model's
    `sublayers(ctx)` when it has them; otherwise the whole step is one edge whose gain is the
    measured local Lipschitz constant σ_max(J) at h (kind "measured_step", stated in
    G.graph["method"]). Graph attributes: cycle_gain, small_gain (cycle_gain < 1),
    spectral_radius_A (NaN without an LTI part), input_gain (‖B̄‖₂), readout_gain (‖C‖₂, NaN
    when the model exposes no `readout_part()`), method, where (the state used).
    """
    require_loop(model)
    cost = cost if cost is not None else Cost()
    where = "given state"
    if h is None or ctx is None:
        if idx is None:
            raise DynamicsError("gain_graph needs a probe batch idx, or a state h with its context ctx")
        T = model.mean_loops if n_loops is None else int(n_loops)
        with analysis(model):
            ctx = model.encode(idx)
        h = run_loop(model, ctx, T, cost=cost)[-1]
        where = f"probe, state after {T} loops"
    part = protocol.linear_part(model)
    a_norm, a_rho = (part.A.norm(), part.A.radius()) if part is not None else (math.nan, math.nan)
    b_norm = part.B.norm() if part is not None else math.nan
    readout = getattr(model, "readout_part", None)
    c_norm = readout().norm() if callable(readout) else math.nan
    finite = all_finite(h)

    G = nx.DiGraph()
    G.add_node("h", role="state")
    stages = model.sublayers(ctx) if callable(getattr(model, "sublayers", None)) else None
    if stages is None:
        gain = _local_gain(lambda z: model.step(z, ctx), h, model, steps, cost, seed) if finite else math.nan
        G.add_node("step", role="whole loop step")
        G.add_edge("h", "step", gain=gain, kind="measured_step")
        G.add_edge("step", "h", gain=1.0, kind="identity")
        cycle, method = gain, "no sublayers(): one edge, the measured local Lipschitz constant σ_max(J) of the whole step"
    else:
        cycle, method = 1.0, "sublayers(): exact ‖Ā‖₂ for the injection, measured local gains for the rest"
        prev, x = "h", h
        for j, s in enumerate(stages):
            if s.kind == "injection" and part is not None:
                G.add_node("Ā", role="injection")
                G.add_node("B̄e", role="input", gain=b_norm)
                G.add_node("u", role="sum")
                G.add_edge(prev, "Ā", gain=a_norm, kind="spectral_norm")
                G.add_edge("Ā", "u", gain=1.0, kind="identity")
                G.add_edge("B̄e", "u", gain=1.0, kind="identity")
                cycle *= a_norm
                prev = "u"
                with analysis(model):
                    x = s.fn(x)
                continue
            gain = _local_gain(s.fn, x, model, steps, cost, seed + j) if finite else math.nan
            G.add_node(s.name, role=f"{s.kind} sublayer")
            G.add_edge(prev, s.name, gain=gain, kind="local_lipschitz")
            if s.kind == "residual":
                out = f"{s.name}+res"
                G.add_node(out, role="sum")
                G.add_edge(s.name, out, gain=1.0, kind="identity")
                G.add_edge(prev, out, gain=1.0, kind="identity")
                cycle *= 1.0 + gain
                with analysis(model):
                    x = x + s.fn(x)
                prev = out
            else:
                cycle *= gain
                with analysis(model):
                    x = s.fn(x)
                prev = s.name
        G.add_edge(prev, "h", gain=1.0, kind="identity")
    if math.isfinite(c_norm):
        G.add_node("C", role="readout")
        G.add_edge("h", "C", gain=c_norm, kind="spectral_norm")
    G.graph.update(cycle_gain=float(cycle), small_gain=bool(cycle < 1.0), spectral_radius_A=a_rho,
                   input_gain=b_norm, readout_gain=c_norm, method=method, where=where)
    return G


def gain_graph_json(G: nx.DiGraph) -> dict:
    """The docs/design.md §7 `gain_graph` record."""
    return {"nodes": list(G.nodes),
            "edges": [[u, v, float(d.get("gain", math.nan))] for u, v, d in G.edges(data=True)],
            "cycle_gain": float(G.graph.get("cycle_gain", math.nan)), "method": G.graph.get("method")}
