"""Compute precision: the dtype a looped model runs in, pure or mixed.

Two different things are called "bf16" in practice, and loopdyn names them apart:

* pure low precision (`bfloat16`, `float16`): the weights are held in that dtype and every
  operation of the loop runs in it (inference as Huginn-0125 is benchmarked, Ouro's bf16
  weights as shipped). The state h_t is a bf16 tensor; each loop rounds it.
* mixed precision (`bf16-mixed`, `fp16-mixed`), as in training: the weights and the state stay
  float32 and `torch.autocast` runs the matrix products (linear layers, attention) in the low
  dtype. The recurrence carries a float32 state; only the products are rounded.

`precision(spec)` reads a name (aliases: bf16, fp16, half, fp32, float, bf16-mixed,
16-mixed, ...) or a torch dtype into a frozen `Precision`; `Precision.apply(model)` casts a
model's floating-point parameters (never its buffers: RoPE tables and other float32 constants
stay float32, as the official code keeps them) and `Precision.context(device)` is the autocast
context (a null context for pure precisions). `MixedPrecisionLoop` wraps a LoopedModel so that
each of its protocol members runs under autocast, for analyses that call the members one by one.

Linear algebra on the loop's products (Krylov bases, eigen/SVD solves, Lyapunov QR) never runs
in the compute dtype: dynamics casts every product to float64 before using it.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from loopdyn.models.errors import InputError
from loopdyn.models.kernels import on_cpu

_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32", "32": "float32",
    "32-true": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "bf16-true": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16", "16-true": "float16",
    "bf16-mixed": "bf16-mixed", "bfloat16-mixed": "bf16-mixed",
    "fp16-mixed": "fp16-mixed", "float16-mixed": "fp16-mixed", "16-mixed": "fp16-mixed",
    "float64": "float64", "fp64": "float64", "double": "float64", "64": "float64",
}
CHOICES = ("float32", "bfloat16", "float16", "bf16-mixed", "fp16-mixed")  # what the CLI offers
DTYPE_HELP = ("compute precision: float32, bfloat16 or float16 (pure: weights and every operation of the loop "
              "in that dtype), bf16-mixed or fp16-mixed (as in training: float32 weights and state, matrix "
              "products under torch.autocast)")


@dataclass(frozen=True)
class Precision:
    """name: canonical name; weights: dtype the parameters are held in; compute: dtype of the
    matrix products; mixed: autocast over float32 weights (True) or pure (False)."""

    name: str
    weights: torch.dtype
    compute: torch.dtype
    mixed: bool = False

    @property
    def state(self) -> torch.dtype:
        """The dtype of the recurrent state h_t (float32 under mixed precision)."""
        return self.weights

    @property
    def unit_roundoff(self) -> float:
        """u = eps/2 of the compute dtype (bf16 2⁻⁸, fp16 2⁻¹¹, float32 2⁻²⁴)."""
        return float(torch.finfo(self.compute).eps) / 2

    @property
    def is_default(self) -> bool:
        return self.name == "float32"

    def apply(self, model):
        """Cast `model`'s floating-point parameters to `weights` in place (buffers untouched);
        returns the model. A no-op when they already are (no copy)."""
        if isinstance(model, nn.Module):
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != self.weights:
                    p.data = p.data.to(self.weights)
        return model

    def context(self, device: str | torch.device = "cpu"):
        """torch.autocast for the mixed precisions, a null context otherwise."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.compute)

    def wrap(self, model):
        """The model as it runs in this precision: parameters cast (pure), or a
        `MixedPrecisionLoop` around it (mixed)."""
        if self.mixed:
            return MixedPrecisionLoop(model, self)
        return self.apply(model)

    def __str__(self) -> str:
        return self.name


def precision(spec: "str | torch.dtype | Precision | None" = None) -> Precision:
    """A Precision from a name, an alias or a torch dtype (None: float32); an InputError names
    the accepted values otherwise."""
    if spec is None:
        spec = "float32"
    if isinstance(spec, Precision):
        return spec
    if isinstance(spec, torch.dtype):
        spec = str(spec).replace("torch.", "")
    name = _ALIASES.get(str(spec).strip().lower().replace("_", "-"))
    if name is None:
        raise InputError(f"unknown dtype {spec!r}: use one of {', '.join(CHOICES)}")
    if name.endswith("-mixed"):
        low = torch.bfloat16 if name.startswith("bf16") else torch.float16
        return Precision(name, torch.float32, low, True)
    dtype = getattr(torch, name)
    return Precision(name, dtype, dtype, False)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_precision(model) -> Precision:
    """The precision a model runs in: a MixedPrecisionLoop's own, else that of its first
    floating-point parameter (float32 for a model that holds none)."""
    own = getattr(model, "precision", None)
    if isinstance(own, Precision):
        return own
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return precision(p.dtype)
    return precision("float32")


class MixedPrecisionLoop(nn.Module):
    """A LoopedModel that runs another one's members under `torch.autocast` (mixed precision).

    encode, init_state, step, decode and the optional members that compute something
    (pre_norm_state, exit_gate, and the functions `sublayers(ctx)` returns) run under autocast;
    every other attribute (mean_loops, linear_part, config, checkpoint_info, ...) is the inner
    model's. The inner model is a registered child, so parameters, hooks and train/eval reach it.
    """

    _WRAPPED = ("encode", "init_state", "step", "decode", "pre_norm_state", "exit_gate")

    def __init__(self, model, prec: Precision):
        super().__init__()
        if not prec.mixed:
            raise InputError(f"MixedPrecisionLoop needs a mixed precision, got {prec.name}")
        self.inner = model
        self.precision = prec
        self._device = _device_of(model)
        for name in self._WRAPPED:
            fn = getattr(model, name, None)
            if callable(fn):
                object.__setattr__(self, name, self._autocast(fn))
        if callable(getattr(model, "sublayers", None)):
            object.__setattr__(self, "sublayers", self._sublayers)

    def _autocast(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.precision.context(self._device):
                return fn(*args, **kwargs)
        return run

    def _sublayers(self, ctx):
        from loopdyn.models.protocol import Sublayer

        return [Sublayer(s.name, self._autocast(s.fn), s.kind) for s in self.inner.sublayers(ctx)]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (the inner model)
        except AttributeError:
            inner = self._modules.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    @property
    def mean_loops(self) -> int:
        return self.inner.mean_loops

    def forward(self, *args, **kwargs):
        with self.precision.context(self._device):
            return self.inner(*args, **kwargs)


def _device_of(model) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


# ---- low-precision products on CPUs without native bf16/fp16 kernels ---------------------------
# On a CPU without AVX512-BF16/AVX-NE-CONVERT (this machine: AVX2 only) PyTorch's bf16 matmul is
# a slow generic loop (measured here, 2 threads, 256×2048 · 2048×2048: bf16 F.linear 936 ms,
# float32 256 ms; 64×5280 · 5280×5280: 1471 vs 677 ms). A native bf16 GEMM multiplies bf16
# inputs exactly and accumulates in float32, rounding the result to bf16 once; `upcast_linear`
# computes the same thing through the float32 kernel (inputs cast to float32, which is exact,
# product in float32, one rounding back), so it agrees with the native kernel to the last bit
# except where the two accumulation orders round across a bf16 boundary (measured: 2.5e-4 of
# the outputs, one bf16 ulp of the row's scale). Only one weight at a time is ever held in
# float32, and the autograd graph keeps the low-precision tensors (the float32 copies are
# remade in the backward pass), so a bf16 model's memory stays that of a bf16 model.

_LOW = (torch.bfloat16, torch.float16)
_NATIVE: dict = {}


def native_matmul(dtype: torch.dtype) -> bool:
    """True when this CPU has native oneDNN kernels for `dtype` products (PyTorch's own check);
    float32/float64 always."""
    if dtype not in _LOW:
        return True
    if dtype not in _NATIVE:
        name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        check = getattr(getattr(torch.ops, "mkldnn", None), name, None)
        try:
            _NATIVE[dtype] = bool(check()) if check is not None else True
        except Exception:  # noqa: BLE001 - unknown: keep PyTorch's own kernel
            _NATIVE[dtype] = True
    return _NATIVE[dtype]


_CHUNK = 2 ** 21  # weight elements cast to float32 at a time (8 MiB: stays in cache for its product)


def _f32_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b through the float32 kernel, rounded once to x's dtype. A large weight is cast a
    block of output rows at a time into one reused buffer: the cast block is still in cache for
    its product, and no weight-sized float32 tensor is allocated (at a few tokens per call the
    cast, not the product, was the cost: 58 % of a bf16 Huginn-0125 audit's time at 64 tokens).
    Each output element is the same K-long float32 reduction as with the whole weight."""
    from loopdyn.models.kernels import fast_linear

    b = None if bias is None else bias.float()
    xf = x.float()
    N, K = weight.shape
    rows = max(_CHUNK // max(K, 1), 1)
    if N * K > _CHUNK and xf.numel() // K <= rows and not weight.is_contiguous() and weight.t().is_contiguous():
        return _f32_product_transposed(xf, weight.t(), b).to(x.dtype)
    if N <= rows or xf.numel() // K > rows or not weight.is_contiguous():  # small weight, many tokens
        # (the cast is cheap then), or a strided one
        return fast_linear(xf, weight.float(), b).to(x.dtype)
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    buf = torch.empty(rows, K, dtype=torch.float32, device=x.device)
    for r in range(0, N, rows):
        n = min(rows, N - r)
        w = buf[:n].copy_(weight[r:r + n])
        out[..., r:r + n] = fast_linear(xf, w, None if b is None else b[r:r + n])
    return out


def _f32_product_transposed(xf: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x·wt + b in float32 for wt (K, N) contiguous low precision (a backward pass's g·W, the weight
    seen transposed): blocks of wt's rows, i.e. of the reduction, cast into one reused buffer and
    accumulated in float32, out += x[:, k-block]·wt[k-block]. Row blocks of wt are contiguous, so
    the cast block is in cache for its product; the whole-weight cast of a transposed view cost
    1.4–1.7× the product here. A float32 reduction as before, summed in K-blocks."""
    K, N = wt.shape
    m = max(_CHUNK // N, 1)
    x2 = xf.reshape(-1, K)
    out = torch.empty(x2.shape[0], N, dtype=torch.float32, device=xf.device)
    buf = torch.empty(min(m, K), N, dtype=torch.float32, device=xf.device)
    for r in range(0, K, m):
        n = min(m, K - r)
        w = buf[:n].copy_(wt[r:r + n])
        if r == 0:
            torch.mm(x2[:, :n], w, out=out)
        else:
            out.addmm_(x2[:, r:r + n], w)
    if b is not None:
        out += b
    return out.view(*xf.shape[:-1], N)


class _UpcastLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for bf16/fp16 tensors, computed in float32 and rounded once; the backward
    products the same way. A differentiable backward (create_graph: an audit's reverse-over-
    reverse J·v) goes through `upcast_linear` again; batched-gradient backwards take plain
    matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _f32_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        from loopdyn.models.kernels import under_transform

        x, weight = ctx.saved_tensors
        plain = under_transform(grad)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (grad.float() @ weight.float()).to(grad.dtype) if plain else upcast_linear(g2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = (g2.t().float() @ x2.float()).to(weight.dtype) if plain else upcast_linear(g2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.float().sum(0).to(grad.dtype)
        return dx, dw, db


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for low-precision CPU tensors through the float32 kernel (see
    above): the same bf16 result as a native kernel up to accumulation order."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _UpcastLinear.apply(x, weight, bias)
    return _f32_product(x, weight, bias)


def low_precision_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; for bf16/fp16 CPU tensors without native kernels through float32 and rounded once
    (what a native kernel computes, up to accumulation order: see above)."""
    if a.dtype in _LOW and b.dtype == a.dtype and on_cpu(a) and on_cpu(b) and not native_matmul(a.dtype):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def takes_upcast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `fast_linear` should compute this low-precision product by `upcast_linear`."""
    return (x.dtype in _LOW and weight.dtype == x.dtype and on_cpu(x) and on_cpu(weight) and x.dim() >= 2
            and (bias is None or (bias.dtype == x.dtype and on_cpu(bias)))
            and not native_matmul(x.dtype))
