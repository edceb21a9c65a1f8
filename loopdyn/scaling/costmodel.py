"""The cost model behind `loopdyn plan`: a trace of the operators a pass runs, on the `meta`
device, and the device rates that turn the trace into seconds.

`OpTrace` is a TorchDispatchMode: every aten operator the real pass runs passes through it, on
meta tensors (nothing is allocated). For each operator it keeps

* the FLOPs, by torch.utils.flop_counter's formulas (matmuls and attention; a multiply-add is 2),
  and for a matmul its (m, k, n) shape;
* the bytes it moves: its tensor inputs read plus its outputs written;
* the live activation bytes: a storage an operator creates counts from its creation until the
  last tensor using it is dropped (a weakref finaliser on the storage), so the maximum over the
  pass is the peak of the memory the pass allocates, the weights excluded — the same lifetimes
  as the real eager pass, since the same Python code holds the same references.

Time of a pass on a `Device` (a roofline per operator plus the framework's fixed cost per
operator, which is what dominates small models on a CPU):

    t = Σ_op max(FLOPs_op / rate(shape_op), bytes_op / bandwidth) + n_ops · overhead

where rate(shape) is the device's matmul rate at that shape (measured per shape by
`measure_device`, or one given rate) and non-matmul operators have no FLOPs term.

Measured here (`measure_kernels`, `plan --measure`), the roofline is replaced where it can be:
every distinct operator call of the trace (the aten operator, its arguments' shapes, strides
and dtypes) is replayed on this CPU on tensors of those layouts and timed, so a pass costs
Σ_calls count · t_measured (+ the framework's cost per operator beyond a bare call); what
cannot be replayed (inputs over a memory cap, operators that need real data) keeps its roofline.
That carries what no rate does: bf16 arithmetic emulated in float32 on a CPU without native
bf16, the thread pool's start-up on mid-size tensors, softmax and normalisation kernels.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

_MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear", "onednn_linear"}  # onednn: models/kernels.py
_FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
         "select", "slice", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk",
         "unflatten", "flatten", "view_as_complex", "view_as_real", "_reshape_alias", "lift_fresh", "narrow",
         "empty_like", "empty", "new_empty", "empty_strided", "new_empty_strided",
         "_fused_sdp_choice"}  # the last: a question (models/kernels.py asks it on meta), no work


# FLOPs of the operators a CPU pass runs that torch.utils.flop_counter has no formula for, from
# their tensor inputs and outputs (the SDPA counts are flop_counter's own, S×S in full)
_MORE_FLOPS = {
    "onednn_linear": lambda ins, outs: 2 * ins[0].numel() * outs[0].shape[-1],  # models/kernels.py: x·Wᵀ
    "addmm_": lambda ins, outs: 2 * ins[1].numel() * ins[2].shape[-1],  # models/precision.py's blocked g·W
    "_scaled_dot_product_flash_attention_for_cpu":
        lambda ins, outs: sdpa_flop_count(ins[0].shape, ins[1].shape, ins[2].shape),
    "_scaled_dot_product_flash_attention_for_cpu_backward":
        lambda ins, outs: sdpa_backward_flop_count(ins[0].shape, ins[1].shape, ins[2].shape, ins[3].shape),
}


@dataclass
class PassCost:
    """What one traced pass costs: its distinct operator calls (views and allocations excluded),
    signature → (count, FLOPs per call, bytes moved per call, matmul key (m, k, n, dtype) or None),
    for the whole batch; the totals are derived from them."""

    kernels: dict = field(default_factory=dict, repr=False)

    @property
    def ops(self) -> int:
        """Operator calls that launch work."""
        return sum(c for c, *_ in self.kernels.values())

    @property
    def matmuls(self) -> dict:
        """(m, k, n, dtype) → (calls, FLOPs): the products, by the shape their rate is looked up by."""
        out: dict = {}
        for count, flops, _, key in self.kernels.values():
            if key is not None:
                c, f = out.get(key, (0, 0.0))
                out[key] = (c + count, f + count * flops)
        return out

    def seconds(self, device: "Device", grad: bool = False) -> float:
        """The time of the pass on `device` (module docstring): each call's measured time where
        the device has one (+ the framework's cost per call, with or without gradients), else
        its roofline and the device's fixed cost per operator."""
        extra = device.grad_call_overhead if grad else device.call_overhead
        t = 0.0
        for sig, (count, flops, moved, mm) in self.kernels.items():
            measured = device.kernel_seconds.get(sig)
            t += count * (measured + extra if measured is not None
                          else _roofline(flops, moved, mm, device) + max(device.overhead, extra))
        return t

    def minus(self, other: "PassCost") -> "PassCost":
        """The calls of this pass not in `other`, by signature; a count may be negative (a training
        step through 2 loops calls one operator of the first loop's backward on another layout
        than through 1), so that base + (k − 1)·(step₂ − step₁) keeps every operator's count."""
        kernels = dict(self.kernels)
        for sig, (c, *rest) in other.kernels.items():
            c0, *mine = kernels.get(sig, (0, *rest))
            if c0 == c:
                kernels.pop(sig, None)
            else:
                kernels[sig] = (c0 - c, *mine)
        return PassCost(kernels)


def _roofline(flops: float, moved: float, mm, device: "Device") -> float:
    """One call's roofline time: FLOPs at the rate of its matmul shape (or the device rate), bytes
    at the bandwidth, whichever is longer."""
    if not flops:
        return moved / device.bandwidth
    rate = device.rate(mm[:3], mm[3]) if mm else device.flops
    return max(flops / rate, moved / device.bandwidth)


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor argument by layout: what a replay allocates in its place."""

    shape: tuple
    stride: tuple
    offset: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        if any(n == 0 for n in self.shape):
            return 0
        span = self.offset + 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
        return span * _itemsize(self.dtype)

    def make(self) -> torch.Tensor:
        """A CPU tensor of this layout: floats uniform in [0.5, 1) (no denormals, no NaN from a
        log or a square root), integers and booleans zero (a valid index, an empty mask)."""
        base = torch.empty(self.nbytes // _itemsize(self.dtype), dtype=self.dtype)
        if base.is_floating_point() or base.is_complex():
            base.uniform_(0.5, 1.0)
        else:
            base.zero_()
        return base.as_strided(self.shape, self.stride, self.offset)


class _Opaque:
    """An argument a replay cannot rebuild (a generator, an unhashable object)."""


def _spec(x):
    if isinstance(x, torch.Tensor):
        return _TensorSpec(tuple(x.shape), tuple(x.stride()), x.storage_offset(), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    if isinstance(x, torch.device):
        return torch.device("cpu")
    if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.layout, torch.memory_format)):
        return x
    return _Opaque


def _signature(func, args, kwargs) -> tuple:
    """A hashable key of one operator call: the operator and its arguments by layout."""
    return (func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))


def _materialize(x):
    if isinstance(x, _TensorSpec):
        return x.make()
    if isinstance(x, tuple):
        return tuple(_materialize(v) for v in x)
    return x


def _contains(x, kind) -> bool:
    return x is kind if not isinstance(x, tuple) else any(_contains(v, kind) for v in x)


def _input_bytes(x) -> int:
    if isinstance(x, _TensorSpec):
        return x.nbytes
    return sum(_input_bytes(v) for v in x) if isinstance(x, tuple) else 0


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


class OpTrace(TorchDispatchMode):
    """Operators, FLOPs, bytes and the live-activation peak of a pass on meta tensors."""

    def __init__(self):
        super().__init__()
        self.cost = PassCost()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def snapshot(self) -> PassCost:
        return PassCost(dict(self.cost.kernels))

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._alive:
            return
        n = st.nbytes()
        self._alive.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if key in self._alive:
            self._alive.discard(key)
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not func.is_view:  # an in-place or out= result is an input's storage: nothing new
            held = {id(t.untyped_storage()) for t in ins}
            for t in outs:
                if id(t.untyped_storage()) not in held:
                    self._track(t)
        if name in _FREE or func.is_view or (name == "_to_copy" and ins[0].device != outs[0].device
                                                       and ins[0].dtype == outs[0].dtype):
            return out  # (a move to meta: the trace's own, of a tensor made on the CPU)
        moved = sum(t.numel() * t.element_size() for t in ins + outs)
        packet = func._overloadpacket
        flops = (flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry
                 else _MORE_FLOPS[name](ins, outs) if name in _MORE_FLOPS else 0)
        key = None  # the matmul shape the device's rate table is looked up by
        if flops and name in _MATMULS and outs:
            a = ins[-2] if name in ("addmm", "addmm_", "baddbmm") else ins[0]
            key = (a.numel() // a.shape[-1], a.shape[-1], outs[0].shape[-1], outs[0].dtype)
        elif flops:  # attention and other formulas: at the device's base rate for the dtype
            key = (0, 0, 0, outs[0].dtype if outs else torch.float32)
        sig = _signature(func, args, kwargs)
        kernels = self.cost.kernels
        kernels[sig] = (kernels.get(sig, (0,))[0] + 1, flops, moved, key)
        return out


@dataclass(frozen=True)
class Device:
    """Rates of the device the time estimates use.

    flops: FLOP/s of large matmuls in the compute dtype; bandwidth: bytes/s of memory for
    elementwise work; overhead: seconds of fixed cost per operator (dispatch, kernel launch);
    shape_rates: measured FLOP/s per matmul shape and dtype ((m, k, n, dtype name), FLOP/s),
    when measured here; kernel_seconds: measured seconds per operator call, by trace signature
    (`measure_kernels`); call_overhead and grad_call_overhead: the framework's seconds per call
    on top of a bare call, in no-grad passes and in passes with gradients (module code, Python
    autograd Functions, autograd's graph; calibrate.py)."""

    flops: float
    bandwidth: float
    source: str  # "measured here (...)" | "given"
    overhead: float = 5e-6
    shape_rates: tuple = ()  # ((m, k, n, dtype name), FLOP/s) pairs
    kernel_seconds: dict = field(default_factory=dict, repr=False, compare=False)
    call_overhead: float = 0.0
    grad_call_overhead: float = 0.0

    def rate(self, shape: tuple, dtype=None) -> float:
        """The matmul rate at (m, k, n) in `dtype`: the measured one, else that of the nearest
        measured shape (by FLOPs) of the same dtype, else the device rate."""
        name = _dtype_name(dtype)
        table = {s[:3]: r for s, r in self.shape_rates if s[3] == name}
        if shape == (0, 0, 0) or not table:
            return self.flops
        if shape in table:
            return table[shape]
        size = math.log(max(shape[0] * shape[1] * shape[2], 1))
        best = min(table, key=lambda s: abs(math.log(max(s[0] * s[1] * s[2], 1)) - size))
        return table[best]

    def to_json(self) -> dict:
        out = {"tflops": self.flops / 1e12, "bandwidth_gbs": self.bandwidth / 1e9,
               "op_overhead_us": self.overhead * 1e6, "source": self.source}
        if self.kernel_seconds:
            out["kernels_measured"] = len(self.kernel_seconds)
        return out


def _best_time(fn, seconds: float, min_reps: int = 3) -> float:
    fn()
    best, reps = math.inf, 0
    end = time.perf_counter() + seconds
    while reps < min_reps or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def measure_device(dtype=None, shapes: list | None = None, seconds: float = 2.0,
                   state_numel: int = 2 ** 16) -> Device:
    """Rates measured here: the matmul rate through loopdyn's own linear kernel at each
    (m, k, n, dtype) of `shapes` (the model's own products as the trace records them; default one
    256×2048·2048×2048 in the compute dtype); the memory bandwidth of an elementwise add of two
    16 M-element tensors (2 reads + 1 write, the result newly allocated, as in a pass); and the
    fixed cost of one operator, from the same add on tensors of `state_numel` elements (the
    size of the model's state, B·S·d: the size most of a pass's elementwise operators have, so
    the cost carries the thread pool's start-up at that size) minus its bytes at the bandwidth.
    All in the compute dtype, about `seconds` in all."""
    from loopdyn.models.kernels import fast_linear
    from loopdyn.models.precision import precision

    prec = precision(dtype)
    shapes = [tuple(s) if len(s) == 4 else (*s, prec.compute) for s in (shapes or [(256, 2048, 2048)])]
    shapes = list(dict.fromkeys((m, k, n, _dtype_name(d)) for m, k, n, d in shapes))
    per = seconds / (len(shapes) + 2)
    rates = []
    with torch.no_grad():
        for m, k, n, name in shapes:
            dt = getattr(torch, name)
            x = torch.randn(m, k).to(dt)
            w = torch.randn(n, k).to(dt)
            rates.append(((m, k, n, name), 2 * m * k * n / _best_time(lambda: fast_linear(x, w), per)))
        a = torch.ones(16 * 2 ** 20, dtype=prec.compute)
        b = torch.ones_like(a)
        bw = 3 * a.numel() * a.element_size() / _best_time(lambda: a + b, per)
        s = torch.ones(max(int(state_numel), 1), dtype=prec.compute)
        t_state = _best_time(lambda: [s + s for _ in range(20)], per) / 20
        overhead = max(t_state - 3 * s.numel() * s.element_size() / bw, 1e-7)
    big = max(rates, key=lambda r: r[0][0] * r[0][1] * r[0][2])[1] if rates else math.nan
    label = f"{len(shapes)} matmul shape(s), elementwise at {s.numel():,} elements"
    return Device(big, bw, f"measured here ({label})", overhead, tuple(rates))


def measure_kernels(sigs, seconds: float = 4.0, cap_bytes: float = 2 * 2 ** 30, gap: float = 0.0,
                    sweeps: int = 2) -> dict:
    """Seconds per call of each operator signature in `sigs` (from `PassCost.kernels`), replayed
    here on tensors of the traced layouts: the median of repeated calls (at least 5, or 3 over
    10 ms) in each of `sweeps` sweeps over all the signatures, the least of the sweeps (a
    shared machine's bursts of contention, seconds long, slow every call they cover: a sweep
    apart, they seldom cover a signature twice); about `seconds` in all. Calls are met as a
    pass meets them: inputs cycle through copies of ≥ 64 MiB in all (at most 16), so they are
    not hot in the cache the previous call left them in, and each call follows `gap` seconds of
    Python work (the framework's cost between calls, calibrate.py), so the thread pool is met
    as a pass meets it, not kept spinning by back-to-back calls. A call whose
    inputs exceed `cap_bytes`, or that fails on made-up data (an index out of range, a
    data-dependent shape), is left out: its roofline stands."""
    sigs = [s for s in dict.fromkeys(sigs) if not _contains(s, _Opaque)
            and _input_bytes((s[1], tuple(v for _, v in s[2]))) <= cap_bytes]
    per = seconds / max(len(sigs) * sweeps, 1)
    clock = time.perf_counter
    out = {}
    with torch.no_grad():
        for sig in [sig for _ in range(sweeps) for sig in sigs]:
            func, args, kwargs = sig
            try:
                nbytes = max(_input_bytes((args, tuple(v for _, v in kwargs))), 1)
                sets = [(_materialize(args), {k: _materialize(v) for k, v in kwargs})
                        for _ in range(max(1, min(16, int(64 * 2 ** 20 // nbytes))))]
                func(*sets[0][0], **sets[0][1])  # warm-up
                times, end = [], clock() + per
                for a, kw in itertools.cycle(sets):
                    t = clock() + gap
                    while clock() < t:  # the work between two calls of a pass
                        pass
                    t = clock()
                    func(*a, **kw)
                    times.append(clock() - t)
                    if len(times) >= (5 if times[0] < 0.01 else 3) and clock() > end:
                        break
                out[sig] = min(out.get(sig, math.inf), statistics.median(times))
            except Exception:  # noqa: BLE001 - not replayable on made-up data: keep its roofline
                pass
            finally:
                sets = None
    return out


def given_device(tflops: float, bandwidth_gbs: float, overhead_us: float = 5.0) -> Device:
    """A device that is not here, from its matmul rate (TFLOP/s), memory bandwidth (GB/s) and
    fixed cost per operator (µs; a GPU kernel launch is ≈ 5 µs)."""
    return Device(tflops * 1e12, bandwidth_gbs * 1e9, "given", overhead_us * 1e-6)
