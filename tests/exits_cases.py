"""Looped models whose exit behaviour is known by construction (issue 23's evidence), as LoopAdapters
in float64:

* `contraction` — h ← h* + q_n (h − h*) with a known rate q_n per token (or a diagonal of rates per
  channel): ‖h_t − h*‖ = q^t ‖h*‖ from h_0 = 0, so the contraction criterion's value is known in
  closed form;
* `settle_or_cycle` — chosen tokens settle exactly at loop k_n (a saturating counter picks the
  payload), the others rotate with period p_n (an exact cycle); one period-4 token's readout is
  symmetric under the rotation, so its entropy never changes although it cycles;
* `overthinking` — the state settles (a saturating counter), and the target's logit peaks at loop
  t0_n, so the loss falls until t0_n and rises after it.
"""
from __future__ import annotations

import math

import torch

from loopdyn.models import LoopAdapter

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def contraction(rates: torch.Tensor, d: int = 6, V: int = 16, mean_loops: int = 8, seed: int = 0) -> LoopAdapter:
    """rates (B, S) or (B, S, d): per token (per channel) contraction rates."""
    B, S = rates.shape[:2]
    q = rates.to(DT) if rates.dim() == 3 else rates.to(DT)[..., None]
    hstar = torch.randn(B, S, d, generator=_gen(seed), dtype=DT) + 2.0
    W = torch.randn(d, V, generator=_gen(seed + 1), dtype=DT)
    return LoopAdapter(encode=lambda idx: {"e": hstar}, step=lambda h, ctx: ctx["e"] + q * (h - ctx["e"]),
                       decode=lambda h, ctx: h @ W, mean_loops=mean_loops, name="contraction")


def settle_or_cycle(settle: torch.Tensor, period: torch.Tensor, V: int = 12, mean_loops: int = 8,
                    seed: int = 0, symmetric: tuple | None = None) -> LoopAdapter:
    """settle (B, S) int: the loop at which the token settles (0: it cycles instead); period (B, S)
    int: the cycle's period for cycling tokens. symmetric = (b, s): that token (period 4) has a
    readout permuted by its rotation (constant entropy). State = [counter, x1..x4]."""
    B, S = settle.shape
    K = int(settle.max()) + 1
    g = _gen(seed)
    P = 2.0 * torch.randn(B, S, K, 4, generator=g, dtype=DT)  # payload per counter value
    k = settle.to(DT)
    angle = torch.where(period > 0, 2 * math.pi / period.clamp_min(1).to(DT), torch.zeros((), dtype=DT))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cyc = settle == 0
    x0 = torch.zeros(B, S, 4, dtype=DT)
    x0[..., 0] = 2.0
    x0[..., 2:] = torch.randn(B, S, 2, generator=g, dtype=DT)
    if symmetric is not None:
        x0[symmetric][2:] = 0.0
    W = torch.randn(4, V, generator=g, dtype=DT)
    W[:, :4] = 0.0  # the first four logits are ±x1, ±x2 only: a 90° rotation permutes them
    W[0, 0], W[1, 1], W[0, 2], W[1, 3] = 1.0, 1.0, -1.0, -1.0
    W[:2, 4:] = 0.0  # the other logits read x3, x4 only, which the rotation leaves alone

    def init(ctx):
        h = torch.zeros(B, S, 5, dtype=DT)
        h[..., 1:] = torch.where(cyc[..., None], x0, P[:, :, 0])
        return h

    def step(h, ctx):
        c = torch.minimum(h[..., 0] + 1, k)
        idx = c.round().long().clamp(0, K - 1)
        settled_x = P.gather(2, idx[..., None, None].expand(B, S, 1, 4))[:, :, 0]
        x = h[..., 1:]
        rot = torch.stack([cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1],
                           x[..., 2], x[..., 3]], -1)
        out = torch.empty_like(h)
        out[..., 0] = torch.where(cyc, h[..., 0], c)
        out[..., 1:] = torch.where(cyc[..., None], rot, settled_x)
        return out

    return LoopAdapter(encode=lambda idx: {"e": torch.zeros(B, S, 5, dtype=DT)}, init_state=init, step=step,
                       decode=lambda h, ctx: h[..., 1:] @ W, mean_loops=mean_loops, name="settle-or-cycle")


def overthinking(t0: torch.Tensor, targets: torch.Tensor, V: int = 10, saturate: int = 12,
                 mean_loops: int = 8) -> LoopAdapter:
    """t0 (B, S): the loop at which the target's logit peaks; targets (B, S) token ids (−100:
    none). State = [counter, logit]; the counter saturates at `saturate` (> every t0), so the loop
    reaches a fixed point."""
    B, S = t0.shape
    t0 = t0.to(DT)

    def step(h, ctx):
        c = torch.clamp(h[..., 0] + 1, max=float(saturate))
        return torch.stack([c, 4.0 - 0.5 * (c - t0).abs()], -1)

    tgt = targets.clamp_min(0)
    onehot = torch.nn.functional.one_hot(tgt, V).to(DT)

    def decode(h, ctx):
        return h[..., 1:2] * onehot  # the target's logit is the state's second channel, the rest 0

    return LoopAdapter(encode=lambda idx: {"e": torch.zeros(B, S, 2, dtype=DT)}, step=step, decode=decode,
                       mean_loops=mean_loops, name="overthinking")


def uneven_cycle(B: int = 1, S: int = 4, V: int = 8, mean_loops: int = 4) -> LoopAdapter:
    """Every token cycles with period 3 through A, B, C whose steps shrink twice before the jump
    back (‖B − A‖ = 4, ‖C − B‖ ≈ 2.55, ‖A − C‖ ≈ 1.58, then 4 again): into loops 2 and 3 the
    residual ratios are below one, as in a contraction. State = [0.01 × counter mod 3, x (2)]."""
    pts = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.5, 0.5]], dtype=DT) + 10.0
    W = torch.randn(2, V, generator=_gen(9), dtype=DT)

    def init(ctx):
        h = torch.zeros(B, S, 3, dtype=DT)
        h[..., 1:] = pts[0]
        return h

    def step(h, ctx):
        c = torch.remainder((100 * h[..., 0]).round() + 1, 3)
        return torch.cat([0.01 * c[..., None], pts[c.long()]], -1)

    return LoopAdapter(encode=lambda idx: {"e": torch.zeros(B, S, 3, dtype=DT)}, init_state=init, step=step,
                       decode=lambda h, ctx: h[..., 1:] @ W, mean_loops=mean_loops, name="uneven-cycle")
