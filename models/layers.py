"""Transformer building blocks: RMSNorm, RoPE, causal attention, MLPs, pre-norm and sandwich blocks.

Numerics follow the official Parcae code (shared/reference/parcae-checkpoint-format.md §4.3)
so that imported checkpoints reproduce its logits to float32 round-off:
RMSNorm computes in float32 and multiplies by the gain after casting back; RoPE rotates
interleaved channel pairs (2j, 2j+1) in float32; QK-norm is a weightless RMS norm with the
dtype's machine epsilon, applied after RoPE; ReLU² carries a factor 0.5.

The modules are plain; their products, norms, RoPE, attention and ReLU² are computed by
models/kernels.py, which picks a fast kernel where one computes the same function
(docs/design.md §3). What a module's configuration allows is decided in its constructor
(`CausalSelfAttention.fuse_qkv`, `MLP.fuse_relu2`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopdyn.models.hooks import watched
from loopdyn.models.kernels import (apply_rope, causal_attention, fast_linear, fast_paths_enabled, head_rms_norm,
                                    relu2, rms_norm, use_fast)


class RMSNorm(nn.Module):
    """y = (x / sqrt(mean(x²) + eps)) · g, the mean over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `kernels.fast_linear` (oneDNN on the fast path). Same
    parameters and state-dict keys; hooks fire as for any module, and the kernel does not
    depend on whether something watches the layer (a probe never changes the numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)


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
        self.c_q = Linear(width, width, bias=bias)
        self.c_k = Linear(width, kv_width, bias=bias)
        self.c_v = Linear(width, kv_width, bias=bias)
        self.c_proj = Linear(width, width, bias=bias)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, n_heads, self.head_dim)) if qk_bias else None
        self.ve_gate = nn.Linear(32, n_kv_heads, bias=False) if value_gate else None
        # c_q, c_k, c_v as one matmul (decided here): not with per-channel extras (clip, qk bias)
        self.fuse_qkv = clip_qkv is None and not qk_bias

    def _fused(self) -> bool:
        """Take the fused QKV product on this call: on the fast path, and only when nobody watches
        c_q, c_k, c_v (their hooks would not fire)."""
        return self.fuse_qkv and fast_paths_enabled() and not watched(self.c_q, self.c_k, self.c_v)

    def qkv(self, a: torch.Tensor, rope: torch.Tensor, ve: torch.Tensor | None = None):
        """Queries, keys, values as (B, S, heads, s), after RoPE and QK-norm.

        Fast path: one matmul with [Wq; Wk; Wv] (B, S, (h + 2hk)·s) instead of three, and RoPE
        and QK-norm applied to queries and keys together (both act per head, so the numbers are
        those of the separate calls; the matmul may round differently, tests/test_fast_path.py).
        """
        B, S, _ = a.shape
        if self._fused():
            H, Hk, s = self.n_heads, self.n_kv_heads, self.head_dim
            w = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
            b = None if self.c_q.bias is None else torch.cat([self.c_q.bias, self.c_k.bias, self.c_v.bias])
            qkv = fast_linear(a, w, b)  # (B, S, (H + 2Hk)·s)
            qk, v = qkv.split([(H + Hk) * s, Hk * s], dim=-1)
            v = v.view(B, S, Hk, s)
            if ve is not None and self.ve_gate is not None:
                gate = 2 * torch.sigmoid(self.ve_gate(a[..., :32]))
                v = v + gate.unsqueeze(-1) * ve.view(B, S, Hk, s)
            qk = apply_rope(qk.view(B, S, H + Hk, s), rope)  # (B, S, H + Hk, s)
            if self.qk_norm:
                qk = head_rms_norm(qk)
            q, k = qk.split([H, Hk], dim=2)
            return q, k, v
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
        y = causal_attention(q, k, v, 1.0 / math.sqrt(self.head_dim))
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


ACTIVATIONS = {"relu2": relu2, "relu": torch.relu, "gelu": F.gelu, "swiglu": F.silu, "geglu": F.gelu}


class MLP(nn.Module):
    """proj(φ(fc(x))), or for gated kinds (swiglu, geglu) proj(φ(p) ⊙ q) with [p, q] = fc(x)."""

    def __init__(self, width: int, hidden: int, kind: str = "relu2", bias: bool = False):
        super().__init__()
        self.gated = kind in ("swiglu", "geglu")
        self.act = ACTIVATIONS[kind]
        self.fc = Linear(width, 2 * hidden if self.gated else hidden, bias=bias)
        self.proj = Linear(hidden, width, bias=bias)
        # without gradients, 0.5·proj(relu(z)²) in place (decided here: ReLU², no bias)
        self.fuse_relu2 = kind == "relu2" and not bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            p, q = self.fc(x).chunk(2, dim=-1)
            return self.proj(self.act(p) * q)
        if self.fuse_relu2 and not torch.is_grad_enabled() and use_fast(x) and not watched(self.proj):
            # proj(0.5·relu(z)²) = 0.5·proj(relu(z)²) bit for bit (proj is linear, 0.5 a power of
            # two): halve the narrow output instead of the wide hidden, square in place
            z = self.fc(x).relu_()
            return self.proj(z.mul_(z)).mul_(0.5)
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
