"""Transformer building blocks: RMSNorm, RoPE, causal attention, MLPs, pre-norm and sandwich blocks.

Numerics follow the official Parcae code (shared/reference/parcae-checkpoint-format.md §4.3)
so that imported checkpoints reproduce its logits to float32 round-off:
RMSNorm computes in float32 and multiplies by the gain after casting back; RoPE rotates
interleaved channel pairs (2j, 2j+1) in float32; QK-norm is a weightless RMS norm with the
dtype's machine epsilon, applied after RoPE; ReLU² carries a factor 0.5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = (x / sqrt(mean(x²) + eps)) · g, the mean over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps)


def rope_table(max_len: int, head_dim: int, base: float, device=None) -> torch.Tensor:
    """(max_len, head_dim/2, 2) float32: [..., 0] = cos, [..., 1] = sin of t·base^(−2j/head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    angle = torch.outer(t, inv_freq)
    return torch.stack([angle.cos(), angle.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, H, s) by the angles of rope (S, s/2, 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, s/2, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with optional grouped KV heads, QK-norm and value embeddings.

    Width w, h query heads, hk ≤ h key/value heads of size s = w/h. A value embedding ve
    (B, S, hk·s), when given, is added to v through a gate g = 2·sigmoid(Wg · a[..., :32]),
    one gate per kv head, read from the first 32 channels of the normed input a.
    """

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, *, bias: bool = False,
                 qk_norm: bool = True, qk_bias: bool = False, clip_qkv: float | None = None,
                 value_gate: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, width // n_heads
        self.qk_norm, self.clip_qkv = qk_norm, clip_qkv
        kv_width = n_kv_heads * self.head_dim
        self.c_q = nn.Linear(width, width, bias=bias)
        self.c_k = nn.Linear(width, kv_width, bias=bias)
        self.c_v = nn.Linear(width, kv_width, bias=bias)
        self.c_proj = nn.Linear(width, width, bias=bias)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, n_heads, self.head_dim)) if qk_bias else None
        self.ve_gate = nn.Linear(32, n_kv_heads, bias=False) if value_gate else None

    def qkv(self, a: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None):
        """Queries, keys, values as (B, S, heads, s), after RoPE and QK-norm."""
        B, S, _ = a.shape
        q = self.c_q(a).view(B, S, self.n_heads, self.head_dim)
        k = self.c_k(a).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.c_v(a).view(B, S, self.n_kv_heads, self.head_dim)
        if ve is not None and self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(a[..., :32]))
            v = v + gate.unsqueeze(-1) * ve.view(B, S, self.n_kv_heads, self.head_dim)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.qk_bias is not None:
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        return q, k, v

    def forward(self, a: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, S, W = a.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(a, rope, ve))  # (B, heads, S, s)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = _causal_sdpa(q, k, v, 1.0 / math.sqrt(self.head_dim))
        return self.c_proj(y.transpose(1, 2).reshape(B, S, W))

    @torch.no_grad()
    def max_logit(self, a: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        """Largest pre-softmax attention logit q·k/√s over allowed (causal) pairs, a 0-d tensor."""
        q, k, _ = (t.transpose(1, 2) for t in self.qkv(a, rope, ve))
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        S = logits.shape[-1]
        causal = torch.ones(S, S, dtype=torch.bool, device=logits.device).tril()
        return logits.masked_fill(~causal, float("-inf")).amax()


def _under_function_transform(t: torch.Tensor) -> bool:
    """True inside torch.func transforms (jvp, vmap, ...) or for a forward-AD dual tensor."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(t):
        return True
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA. The fused CPU kernel has no forward-AD formula (torch.func.jvp fails) and no
    vmap batching rule, so under a function transform we pick the math kernel; otherwise the
    default kernel, which the official code uses (bit-exact parity)."""
    if any(_under_function_transform(t) for t in (q, k, v)):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """The official ReLU²: 0.5 · relu(x)²."""
    return 0.5 * torch.relu(x).square()


ACTIVATIONS = {"relu2": relu2, "relu": torch.relu, "gelu": F.gelu, "swiglu": F.silu, "geglu": F.gelu}


class MLP(nn.Module):
    """proj(φ(fc(x))), or for gated kinds (swiglu, geglu) proj(φ(p) ⊙ q) with [p, q] = fc(x)."""

    def __init__(self, width: int, hidden: int, kind: str = "relu2", bias: bool = False):
        super().__init__()
        self.gated = kind in ("swiglu", "geglu")
        self.act = ACTIVATIONS[kind]
        self.fc = nn.Linear(width, 2 * hidden if self.gated else hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            p, q = self.fc(x).chunk(2, dim=-1)
            return self.proj(self.act(p) * q)
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """A transformer block with two residual branches.

    prenorm  (GPT, Parcae):  x ← x + Attn(N1(x));      x ← x + MLP(N2(x))
    sandwich (Huginn):       x ← N3(x + Attn(N1(x)));  x ← N4(x + MLP(N2(x)))
    """

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, d_mlp: int, *, mlp: str, norm: str,
                 norm_eps: float, kind: str = "prenorm", bias: bool = False, qk_norm: bool = True,
                 qk_bias: bool = False, clip_qkv: float | None = None, value_gate: bool = False):
        super().__init__()
        self.norm_1 = make_norm(norm, width, norm_eps)
        self.attn = CausalSelfAttention(width, n_heads, n_kv_heads, bias=bias, qk_norm=qk_norm,
                                        qk_bias=qk_bias, clip_qkv=clip_qkv, value_gate=value_gate)
        self.norm_2 = make_norm(norm, width, norm_eps)
        self.mlp = MLP(width, d_mlp, mlp, bias)
        self.sandwich = kind == "sandwich"
        if self.sandwich:
            self.norm_3 = make_norm(norm, width, norm_eps)
            self.norm_4 = make_norm(norm, width, norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        if self.sandwich:
            x = self.norm_3(x + self.attn(self.norm_1(x), rope, ve))
            return self.norm_4(x + self.mlp(self.norm_2(x)))
        x = x + self.attn(self.norm_1(x), rope, ve)
        return x + self.mlp(self.norm_2(x))
