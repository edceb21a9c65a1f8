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
import numpy as np
import torch

from loopdyn.dynamics.jacobian import golub_kahan
from loopdyn.dynamics.loopmap import Cost, Linearisation, analysis, require_loop
from loopdyn.dynamics.lti import norm2
from loopdyn.dynamics.trajectory import initial_state


def _local_gain(fn, x: torch.Tensor, model, steps: int, cost: Cost, seed: int) -> float:
    lin = Linearisation.of(fn, x, model, cost)
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device)
    s, _, _, _ = golub_kahan(lin.jvp, lin.vjp, v0, steps)
    return float(s[0])


def gain_graph(model, idx: torch.Tensor | None = None, *, h: torch.Tensor | None = None, ctx=None,
               n_loops: int | None = None, steps: int = 4, cost: Cost | None = None, seed: int = 0) -> nx.DiGraph:
    """The loop's signal-flow DiGraph with edge gains (see the module docstring).

    The sublayer gains are measured at state h with context ctx if given; else at the state
    after n_loops (default μ_rec) loops on idx; else on a fixed probe of 32 random token ids
    (seeded). Graph attributes: cycle_gain, small_gain (cycle_gain < 1), spectral_radius_A,
    input_gain (‖B̄‖₂), readout_gain (‖C‖₂), where (the state used).
    """
    require_loop(model)
    cost = cost if cost is not None else Cost()
    where = "given state"
    if h is None or ctx is None:
        if idx is None:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randint(0, model.config.vocab_size, (1, min(32, model.config.block_size)), generator=g)
            where = "random probe"
        T = model.config.mean_loops if n_loops is None else int(n_loops)
        with analysis(model):
            ctx = model.encode(idx)
            h = initial_state(model, ctx)
            for _ in range(T):
                h = model.step(h, ctx)
                cost.steps += 1
        where = f"{where}, state after {T} loops"
    part = model.injection.linear_part()
    A, B = part.A, part.B
    if A.kind == "identity":
        a_norm, a_rho = 1.0, 1.0
    elif A.kind == "diagonal":
        a_norm = a_rho = float(A.values.abs().max())
    else:
        M = A.values.to("cpu", torch.float64).numpy()
        a_norm, a_rho = norm2(M), float(np.abs(np.linalg.eigvals(M)).max())
    b_norm = 1.0 if B.kind == "identity" else norm2(B.dense().to("cpu", torch.float64).numpy())
    c_norm = norm2(model.readout.weight.detach().to("cpu", torch.float64).numpy())

    G = nx.DiGraph()
    G.add_node("h", role="state")
    G.add_node("Ā", role="injection")
    G.add_node("B̄e", role="input", gain=b_norm)
    G.add_node("u", role="sum")
    G.add_edge("h", "Ā", gain=a_norm, kind="spectral_norm")
    G.add_edge("Ā", "u", gain=1.0, kind="identity")
    G.add_edge("B̄e", "u", gain=1.0, kind="identity")
    cycle = a_norm
    finite = bool(torch.isfinite(h).all())
    with analysis(model):
        x = model.injection(h, ctx.e)
    prev = "u"
    for j, (blk, ve) in enumerate(zip(model.core, ctx.core_ve)):
        subs = [("attn", blk.norm_1, lambda a, blk=blk, ve=ve: blk.attn(a, ctx.rope, ve),
                 getattr(blk, "norm_3", None)),
                ("mlp", blk.norm_2, lambda a, blk=blk: blk.mlp(a), getattr(blk, "norm_4", None))]
        for name, pre, body, post in subs:
            node, out = f"core.{j}.{name}", f"core.{j}.{name}+res"
            if blk.sandwich:
                def fn(z, pre=pre, body=body, post=post):
                    return post(z + body(pre(z)))
            else:
                def fn(z, pre=pre, body=body):
                    return body(pre(z))
            gain = _local_gain(fn, x, model, steps, cost, seed + 2 * j + (name == "mlp")) if finite else math.nan
            G.add_node(node, role=f"{name} sublayer")
            G.add_node(out, role="sum")
            G.add_edge(prev, node, gain=gain, kind="local_lipschitz")
            G.add_edge(node, out, gain=1.0, kind="identity")
            if blk.sandwich:
                cycle *= gain
            else:
                G.add_edge(prev, out, gain=1.0, kind="identity")
                cycle *= 1.0 + gain
            with analysis(model):
                x = fn(x) if blk.sandwich else x + fn(x)
            prev = out
    G.add_edge(prev, "h", gain=1.0, kind="identity")
    G.add_node("C", role="readout")
    G.add_edge("h", "C", gain=c_norm, kind="spectral_norm")
    G.graph.update(cycle_gain=float(cycle), small_gain=bool(cycle < 1.0), spectral_radius_A=a_rho,
                   input_gain=b_norm, readout_gain=c_norm, where=where)
    return G


def gain_graph_json(G: nx.DiGraph) -> dict:
    """The DESIGN §7 `gain_graph` record."""
    return {"nodes": list(G.nodes),
            "edges": [[u, v, float(d.get("gain", math.nan))] for u, v, d in G.edges(data=True)],
            "cycle_gain": float(G.graph.get("cycle_gain", math.nan))}
