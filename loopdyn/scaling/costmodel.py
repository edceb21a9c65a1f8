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
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
_FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
         "select", "slice", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk",
         "unflatten", "flatten", "view_as_complex", "view_as_real", "_reshape_alias", "lift_fresh", "narrow",
         "empty_like", "empty", "new_empty", "empty_strided", "new_empty_strided", "_to_copy"}


@dataclass
class PassCost:
    """What one traced pass costs (bytes and FLOPs for the whole batch)."""

    flops: float = 0.0
    bytes: float = 0.0  # moved by non-free operators
    ops: int = 0  # operators that launch work (views and allocations excluded)
    matmuls: dict = field(default_factory=dict)  # (m, k, n, dtype) → (count, FLOPs)
    other_bytes: float = 0.0  # bytes moved by operators without a FLOPs formula

    def seconds(self, device: "Device") -> float:
        """The roofline time of the pass on `device` (module docstring)."""
        t = self.other_bytes / device.bandwidth + self.ops * device.overhead
        for (m, k, n, dtype), (count, flops) in self.matmuls.items():
            rate = device.rate((m, k, n), dtype)
            mm_bytes = count * (m * k + k * n + m * n) * _itemsize(dtype)
            t += max(flops / rate, mm_bytes / device.bandwidth)
        return t

    def minus(self, other: "PassCost") -> "PassCost":
        mm = dict(self.matmuls)
        for key, (c, f) in other.matmuls.items():
            c0, f0 = mm.get(key, (0, 0.0))
            if c0 - c <= 0:
                mm.pop(key, None)
            else:
                mm[key] = (c0 - c, f0 - f)
        return PassCost(self.flops - other.flops, self.bytes - other.bytes, self.ops - other.ops, mm,
                        self.other_bytes - other.other_bytes)


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
        c = self.cost
        return PassCost(c.flops, c.bytes, c.ops, dict(c.matmuls), c.other_bytes)

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
        if name in _FREE or func.is_view:
            return out
        moved = sum(t.numel() * t.element_size() for t in ins + outs)
        c = self.cost
        c.ops += 1
        c.bytes += moved
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        if flops and name in _MATMULS and outs:
            a = ins[-2] if name in ("addmm", "baddbmm") else ins[0]
            m = a.numel() // a.shape[-1]
            k = a.shape[-1]
            n = outs[0].shape[-1]
            key = (m, k, n, outs[0].dtype)
            count, f = c.matmuls.get(key, (0, 0.0))
            c.matmuls[key] = (count + 1, f + flops)
        elif flops:  # attention and other formulas: at the device's base rate for the dtype
            key = (0, 0, 0, outs[0].dtype if outs else torch.float32)
            count, f = c.matmuls.get(key, (0, 0.0))
            c.matmuls[key] = (count + 1, f + flops)
        else:
            c.other_bytes += moved
        c.flops += flops
        return out


@dataclass(frozen=True)
class Device:
    """Rates of the device the time estimates use.

    flops: FLOP/s of large matmuls in the compute dtype; bandwidth: bytes/s of memory for
    elementwise work; overhead: seconds of fixed cost per operator (dispatch, kernel launch);
    shape_rates: measured FLOP/s per matmul shape and dtype ((m, k, n, dtype name), FLOP/s),
    when measured here."""

    flops: float
    bandwidth: float
    source: str  # "measured here (...)" | "given"
    overhead: float = 5e-6
    shape_rates: tuple = ()  # ((m, k, n, dtype name), FLOP/s) pairs

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
        return {"tflops": self.flops / 1e12, "bandwidth_gbs": self.bandwidth / 1e9,
                "op_overhead_us": self.overhead * 1e6, "source": self.source}


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


def given_device(tflops: float, bandwidth_gbs: float, overhead_us: float = 5.0) -> Device:
    """A device that is not here, from its matmul rate (TFLOP/s), memory bandwidth (GB/s) and
    fixed cost per operator (µs; a GPU kernel launch is ≈ 5 µs)."""
    return Device(tflops * 1e12, bandwidth_gbs * 1e9, "given", overhead_us * 1e-6)
