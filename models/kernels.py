"""Kernels: the fast implementations behind models/layers.py, and the one rule for when they run.

The modules in models/layers.py and models/looped.py are plain PyTorch; where a faster kernel
computes the same function, they call it from here (docs/design.md §3):

    fast_linear        x·Wᵀ + b through oneDNN (`_OneDNNLinear` when a gradient is wanted; the
                       custom operator `loopdyn::onednn_linear` in code torch.compile traces)
    rms_norm           PyTorch's fused RMS-norm kernel, closed-form backward (`_RMSNormFunction`)
    apply_rope         RoPE as one complex multiplication
    causal_attention   explicit softmax(q·kᵀ + mask)·v at short lengths (cached masks), else SDPA
    relu2              0.5·relu(x)² in place without gradients, `_ReLU2` with them

Each computes the plain function to float round-off (tests/test_fast_path.py). Which one runs is
decided in three layers, each once:

1. what this build offers (oneDNN, the fused RMS-norm kernel, `torch.library.custom_op`): probed
   once, at import;
2. what a module's configuration allows (e.g. the fused QKV product needs no clip and no QK bias):
   decided in the module's constructor, as nanoGPT decides `self.flash`;
3. per call, what the inputs allow: dtype, device, whether a gradient is wanted, whether the call
   runs under a function transform (`under_transform`) or is traced by torch.compile
   (`fast_paths_enabled`), and whether a module the fused path would skip is watched
   (`models.hooks.watched`). Under `meta_as_cpu()` meta tensors decide as CPU tensors do.

`fast_paths(False)` turns the fast paths off for the duration: tests and benchmarks use it to
reproduce the official kernel choice bit for bit (tests/test_official_parity.py) or to measure the
gain (bench/throughput.py). Code that torch.compile traces takes the plain path, which inductor
fuses itself, except the linear layers (`fast_linear`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

# Sequences up to this length use explicit causal attention (matmul, masked softmax, matmul)
# instead of PyTorch's fused CPU kernel when the inputs are float32/float64 on the CPU; the
# explicit form also has forward-mode and double-backward derivatives. Measured (torch 2.13,
# 2 threads, 8 sequences × 4 heads of 64, forward + backward, min of 36): S = 64: 1.2 vs 1.9 ms
# fused; 128: 4.9 vs 6.3; 256: 40.0 vs 42.0 (forward alone 12.0 vs 10.4); 512: 183 vs 110.
# Above the limit the fused kernel (and its O(S) memory) wins.
EXPLICIT_ATTENTION_MAX_LEN = 256

# ---- the switch -------------------------------------------------------------------------------
_FAST = True


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Turn the fast paths of models.kernels (and the loop's, models.looped) on or off for the
    duration; nested uses restore the previous setting."""
    global _FAST
    saved, _FAST = _FAST, bool(enabled)
    try:
        yield
    finally:
        _FAST = saved


# ---- the device a pass is planned for -----------------------------------------------------------
_META_AS_CPU = [False]  # set while loopdyn.scaling.plan traces a CPU pass on the meta device


@contextlib.contextmanager
def meta_as_cpu() -> Iterator[None]:
    """Within: meta tensors take the paths CPU tensors take (oneDNN linear layers, as the one
    operator `loopdyn::onednn_linear`; the explicit attention; the SDPA kernel PyTorch picks for CPU
    tensors; the low-precision upcast of models/precision.py), so a pass traced on meta runs the
    operators, and allocates the memory, of the same pass on this CPU (loopdyn.scaling.plan)."""
    old, _META_AS_CPU[0] = _META_AS_CPU[0], True
    try:
        yield
    finally:
        _META_AS_CPU[0] = old


def on_cpu(t: torch.Tensor) -> bool:
    """t is a CPU tensor, or a meta tensor standing for one (`meta_as_cpu`)."""
    return t.device.type == "cpu" or (_META_AS_CPU[0] and t.device.type == "meta")


def fast_paths_enabled() -> bool:
    """The fast paths are on, and this is not code that torch.compile is tracing: there the model
    takes its plain path, which inductor fuses itself, except that linear layers still call
    oneDNN (`fast_linear`)."""
    return _FAST and not torch.compiler.is_compiling()


# ---- function transforms ----------------------------------------------------------------------
# The checks below use internals of torch (there is no public API); each is looked up once and a
# torch without it counts as "not under a transform" for that check.
_functorch = getattr(torch._C, "_functorch", None)
_INTERPRETER_STACK = getattr(_functorch, "peek_interpreter_stack", None)  # torch.func levels
_IS_WRAPPED = getattr(_functorch, "is_functorch_wrapped_tensor", None)
# autograd.grad(..., is_grads_batched=True) runs the backward under the legacy vmap
_IS_BATCHED = getattr(_functorch, "is_legacy_batchedtensor", None)


def _safe(check, *args) -> bool:
    try:
        return bool(check(*args)) if check is not None else False
    except Exception:  # noqa: BLE001 - an internal that changed: assume not
        return False


def under_transform(*tensors: torch.Tensor) -> bool:
    """True inside a torch.func transform (grad, vjp, jvp, vmap, ...), or when one of `tensors`
    is a functorch-wrapped tensor, a forward-AD dual tensor, or a batched gradient
    (`autograd.grad(..., is_grads_batched=True)`): the autograd Functions and oneDNN calls of
    this module have no rules there, so callers take the plain path. False while torch.compile
    traces (it cannot trace these checks, and traces the plain path anyway)."""
    if torch.compiler.is_compiling():
        return False
    if _safe(_INTERPRETER_STACK):
        return True
    for t in tensors:
        if (_safe(_IS_WRAPPED, t) or _safe(_IS_BATCHED, t)
                or torch.autograd.forward_ad.unpack_dual(t).tangent is not None):
            return True
    return False


def use_fast(*tensors: torch.Tensor) -> bool:
    """The per-call rule shared by every fast path: switched on, not traced by torch.compile,
    not under a function transform."""
    return _FAST and not torch.compiler.is_compiling() and not under_transform(*tensors)


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- RMS norm ---------------------------------------------------------------------------------
_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)  # (y, 1/rms) in one CPU kernel


class _RMSNormFunction(torch.autograd.Function):
    """y = x·r ⊙ w, r = (mean(x²) + eps)^(−1/2) over the last axis, with the closed-form
    backward dx = r·(ĝ − n·mean(ĝ ⊙ n)), ĝ = g ⊙ w, n = x·r; dw = Σ g ⊙ n. Forward: PyTorch's
    fused kernel (the same numbers as the composite); backward: a handful of kernels instead of
    the composite's chain (pow, mean, rsqrt, mul, ... and their derivatives). Written with
    differentiable ops, so double backward works."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        if _FUSED_RMS_NORM is not None:  # the kernel F.rms_norm runs, which also returns r
            y, r = _FUSED_RMS_NORM(x, [x.shape[-1]], weight, eps)
        else:
            y, r = F.rms_norm(x, (x.shape[-1],), weight, eps), None
        ctx.save_for_backward(x, weight, r)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        if r is None or torch.is_grad_enabled():  # double backward needs r as a function of x
            r = torch.rsqrt(x.square().mean(-1, keepdim=True) + ctx.eps)
        n = x * r
        g_hat = grad if weight is None else grad * weight
        dx = (g_hat - n * (g_hat * n).mean(-1, keepdim=True)) * r if ctx.needs_input_grad[0] else None
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (grad * n).sum(dim=tuple(range(grad.dim() - 1)))  # over every axis but the last
        return dx, dw, None


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None) -> torch.Tensor | None:
    """RMS norm over the last axis on the fast path (float32/float64, no function transform):
    the fused kernel without gradients, `_RMSNormFunction` with them; None when not applicable.
    eps None means the dtype's machine epsilon (F.rms_norm's default)."""
    if (x.dtype not in (torch.float32, torch.float64) or (weight is not None and weight.dtype != x.dtype)
            or not use_fast(x)):
        return None
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if _wants_grad(x, weight):
        return _RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused kernel, same float ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(x / sqrt(mean(x²) + eps)) · w over the last axis, computed in float32 and multiplied by
    the gain after casting back (the official numerics); float32 inputs on the fast path."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        y = fast_rms_norm(x, weight, eps)
        if y is not None:
            return y
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def head_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """The weightless QK-norm: F.rms_norm over the last axis with the dtype's machine epsilon."""
    y = fast_rms_norm(x, None, None)  # None e.g. under a function transform
    return y if y is not None else F.rms_norm(x, (x.shape[-1],))


# ---- linear layers through oneDNN -------------------------------------------------------------
def _find_onednn_linear():
    """oneDNN's float32 linear (torch.ops.mkldnn._linear_pointwise), when this build has it
    and it runs. It picks its kernels from the CPU's actual instruction set; MKL, which F.linear
    calls, runs a generic path on AMD CPUs: on this machine (AMD EPYC, 2 threads) a
    1024×256 · 256×1024 product takes 2.1 ms in oneDNN and 4.8 ms in MKL, and the transposed
    products of the backward pass likewise (2.1 vs 4.8, 2.6 vs 5.2 ms)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if not torch.equal(op(x, w, None, "none", [], ""), F.linear(x, w)):
            return None
    except Exception:  # noqa: BLE001 - any failure: keep F.linear
        return None
    return op


_ONEDNN_LINEAR = _find_onednn_linear()


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


def _compiled_onednn_op():
    """The oneDNN linear as a custom operator (`torch.ops.loopdyn.onednn_linear`) for code that
    torch.compile traces: inductor cannot lower oneDNN's own op with weights that are not
    constants, but calls a custom operator as an opaque kernel and fuses everything around it.
    Its gradient is two more calls (dx = g·W, dW = gᵀ·x). None without oneDNN."""
    if _ONEDNN_LINEAR is None or not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("loopdyn::onednn_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def onednn_linear(x, weight, bias):
        return _onednn(x, weight, bias)

    @onednn_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = onednn_linear(g2, weight.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = onednn_linear(g2.t(), x2.t(), None) if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db

    onednn_linear.register_autograd(backward, setup_context=setup_context)
    return onednn_linear


_COMPILED_ONEDNN = _compiled_onednn_op()


class _OneDNNLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with oneDNN forward and backward products (dx = g·W, dW = gᵀ·x). A
    differentiable backward (create_graph) takes them through `fast_linear` again, so the
    reverse-over-reverse products of an audit stay on oneDNN; under function transforms or a
    batched-gradient backward they are ordinary matmuls, which vmap understands."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        # Inside a differentiable backward (create_graph: the audit's reverse-over-reverse J·v)
        # the products go through fast_linear again, itself differentiable; only transforms and
        # batched-gradient backwards take ordinary matmuls.
        plain = under_transform(grad)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (grad @ weight) if plain else fast_linear(g2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = (g2.t() @ x2) if plain else fast_linear(g2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dtype == weight.dtype == torch.float32 and on_cpu(x) and on_cpu(weight)
            and x.dim() >= 2 and (bias is None or (bias.dtype == torch.float32 and on_cpu(bias))))


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on the fast path for float32 CPU tensors through oneDNN
    (`_OneDNNLinear` when a gradient is wanted; the custom operator `loopdyn::onednn_linear`
    in code torch.compile traces). The same product to float32 round-off."""
    if torch.compiler.is_compiling():
        if _FAST and _COMPILED_ONEDNN is not None and _onednn_applies(x, weight, bias):
            return _COMPILED_ONEDNN(x, weight, bias)
        return F.linear(x, weight, bias)
    if _ONEDNN_LINEAR is not None and _onednn_applies(x, weight, bias) and use_fast(x):
        if x.device.type == "meta":  # a CPU pass traced on meta: the same kernel as one operator
            return F.linear(x, weight, bias) if _COMPILED_ONEDNN is None else _COMPILED_ONEDNN(x, weight, bias)
        if _wants_grad(x, weight, bias):
            return _OneDNNLinear.apply(x, weight, bias)
        return _onednn(x, weight, bias)
    if x.dtype in (torch.bfloat16, torch.float16) and use_fast(x):
        from loopdyn.models.precision import takes_upcast, upcast_linear  # bf16 on a CPU without bf16 kernels

        if takes_upcast(x, weight, bias):
            return upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# ---- RoPE -------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, S, H, s) by the angles of rope (S, s/2, 2), in float32.

    Pair (x[2j], x[2j+1]) is the complex number x[2j] + i·x[2j+1], multiplied by cos + i·sin:
    out[2j] = x[2j]·cos − x[2j+1]·sin, out[2j+1] = x[2j+1]·cos + x[2j]·sin (fast path: one
    complex multiplication, the same float32 operations as the two real lines, bit for bit).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, s/2, 2)
    if not fast_paths_enabled():
        cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        x0, x1 = xf[..., 0], xf[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(x.dtype)
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    rot = torch.view_as_complex(rope.float().contiguous())[None, :, None, :]  # (1, S, 1, s/2)
    out = torch.view_as_real(torch.view_as_complex(xf) * rot)
    return out.flatten(-2).to(x.dtype)


# ---- causal attention -------------------------------------------------------------------------
_CAUSAL_MASKS: dict = {}


def _causal_mask(S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(S, S) additive mask: 0 on and below the diagonal, −inf above (cached, read-only)."""
    key = (S, dtype, device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        if len(_CAUSAL_MASKS) > 32:
            _CAUSAL_MASKS.clear()
        mask = torch.full((S, S), float("-inf"), dtype=dtype, device=device).triu(1)
        _CAUSAL_MASKS[key] = mask
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + causal mask)·v for q, k, v of shape (B, heads, S, s).

    Fast path (float32/float64 CPU tensors, S ≤ EXPLICIT_ATTENTION_MAX_LEN, when a gradient
    or a forward-mode derivative will be taken): the explicit formula, which beats the fused
    CPU kernel's backward at short lengths; otherwise `causal_sdpa`, whose forward alone is
    faster (S = 128, 8 sequences × 4 heads of 64, 2 threads: 2.6 ms fused vs 5.2 ms explicit,
    min of 20). The two agree to float round-off.
    """
    S = q.shape[-2]
    if (fast_paths_enabled() and S <= EXPLICIT_ATTENTION_MAX_LEN and on_cpu(q)
            and q.dtype in (torch.float32, torch.float64) and k.dtype == q.dtype and v.dtype == q.dtype
            and (under_transform(q) or _wants_grad(q, k, v))):
        scores = torch.baddbmm(_causal_mask(S, q.dtype, q.device), q.flatten(0, 1),
                               k.flatten(0, 1).transpose(1, 2), alpha=scale)  # (B·heads, S, S)
        return (scores.softmax(-1) @ v.flatten(0, 1)).view(q.shape[:-1] + v.shape[-1:])
    return causal_sdpa(q, k, v, scale)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal SDPA. The fused CPU kernel has no forward-AD formula (torch.func.jvp fails) and no
    vmap batching rule, so under a function transform we pick the math kernel; otherwise the
    default kernel, which the official code uses (bit-exact parity)."""
    if under_transform(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if q.device.type == "meta" and on_cpu(q):
        return _sdpa_as_on_cpu(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _sdpa_as_on_cpu(q, k, v, scale):
    """Causal SDPA on meta tensors standing for CPU ones (`meta_as_cpu`): the kernel the CPU
    would choose, asked of PyTorch with small CPU stand-ins of the same dtype, batch, heads and
    head size (one position: the choice does not depend on the length), then that kernel on meta
    — on meta PyTorch itself would always decompose into the math kernel, with its S×S scores."""
    def stand_in(t):
        if t.stride(-1) != 1:  # the fused kernel needs unit-stride rows: the math kernel runs
            return None
        return torch.empty(*t.shape[:-2], 1, t.shape[-1], dtype=t.dtype).requires_grad_(t.requires_grad)

    from torch.nn.attention import SDPBackend

    proxies = [stand_in(t) for t in (q, k, v)]
    if None not in proxies and int(torch._fused_sdp_choice(*proxies, is_causal=True, scale=scale)) == \
            SDPBackend.FLASH_ATTENTION.value:  # the CPU's flash kernel (and its backward)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


# ---- ReLU² ------------------------------------------------------------------------------------
class _ReLU2(torch.autograd.Function):
    """0.5·relu(x)² with the one-multiplication derivative relu(x) (recomputed from x in the
    backward pass, so double backward is exact too). Bit-identical to the composite: 0.5 and 2
    are powers of two, so (g·0.5)·(2·relu(x)) = g·relu(x) exactly."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        r = torch.relu(x)
        return r.mul_(r).mul_(0.5)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.relu(x)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """The official ReLU²: 0.5 · relu(x)²."""
    if use_fast(x):
        if not _wants_grad(x):
            r = torch.relu(x)
            return r.mul_(r).mul_(0.5)  # r is a fresh tensor: square and halve in place
        return _ReLU2.apply(x)
    return 0.5 * torch.relu(x).square()
