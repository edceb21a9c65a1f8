"""`loopdyn plan`: memory and time of a looped model before it runs (loopdyn.scaling.plan).

For a checkpoint folder (loopdyn, official Parcae, Huginn/Raven, Ouro: only its config.json is
read), a LoopConfig preset, or the published configurations `huginn-0125`, `ouro-1.4b` and
`ouro-2.6b`, at a batch B, sequence length S and precision (models/precision.py):

* parameters and weight bytes (the model is built on the `meta` device: nothing is allocated);
* FLOPs per token of the prelude, of one loop and of the coda + head, counted by
  torch.utils.flop_counter on the meta model (every matmul and attention product the real
  forward pass runs, at this S), for inference at T loops and for training with gradients
  through k of T loops (backward = 2 × forward), with per-sequence depth sampling (T ~
  max(Poisson(μ), 1), k = min(T, μ_bwd)) by its exact expectation when the model samples depths;
* activation bytes: what autograd saves for the backward pass, counted with saved-tensor hooks
  on the meta model (per loop with gradients, and for prelude + coda + head; parameters
  excluded), and the largest working tensor of a forward pass (inference);
* KV-cache bytes for generation: every layer run keeps its keys and values, and a looped model
  runs its core once per loop, so the cache grows like prelude + T·core + coda layers;
* the largest T that fits a memory budget, for inference (weights + KV cache at T loops: the
  forward pass itself needs no more memory at more loops) and for training with gradients
  through all T loops (weights, gradients, two AdamW moments, saved activations);
* time: FLOPs / the device's matmul rate, or weight bytes / its memory bandwidth when that is
  slower (small batches read every weight once per loop), from a rate measured here
  (`measure_device`: a short calibration run of matmuls of the model's own shapes and dtype, and
  a large copy) or given (`tflops`, `bandwidth`).

Memory units are bytes (GiB = 2³⁰); FLOPs count a multiply-add as 2.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from loopdyn.models.errors import InputError
from loopdyn.models.precision import Precision, precision

PUBLISHED = ("huginn-0125", "ouro-1.4b", "ouro-2.6b")
ADAM_STATES = 2  # exp_avg, exp_avg_sq, in the parameters' dtype


@dataclass(frozen=True)
class Device:
    """Rates of the device the time estimates use."""

    flops: float  # FLOP/s of large matmuls in the compute dtype
    bandwidth: float  # bytes/s of memory
    source: str  # "measured here (...)" | "given"

    def to_json(self) -> dict:
        return {"tflops": self.flops / 1e12, "bandwidth_gbs": self.bandwidth / 1e9, "source": self.source}


@dataclass
class Plan:
    """Memory and time of one model at (batch, seq_len, precision); see the module docstring."""

    name: str
    family: str  # "loopdyn" | "huginn" | "ouro"
    precision: str
    batch: int
    seq_len: int
    mean_loops: int
    backprop_loops: int
    depth_sampling: str  # "poisson" | "fixed"
    params: int
    weight_bytes: int
    flops_prelude: float  # per token, forward
    flops_loop: float  # per token, one loop, forward
    flops_coda: float  # per token, readout + coda + head, forward
    saved_prelude: int  # bytes autograd saves for prelude + coda + head (+ loss) at (B, S)
    saved_loop: int  # bytes autograd saves per loop run with gradients
    working: int  # largest single activation tensor of a forward pass (bytes)
    kv_per_layer: int  # KV-cache bytes per layer run at (B, S)
    layers: tuple  # (prelude, core, coda) layer counts
    device: Device | None = None
    notes: list = field(default_factory=list)

    # ---- FLOPs ---------------------------------------------------------------------------
    def inference_flops(self, T: int) -> float:
        """FLOPs per token of a forward pass at T loops."""
        return self.flops_prelude + T * self.flops_loop + self.flops_coda

    def expected_loops(self) -> tuple[float, float]:
        """(E[n], E[k]) loops without and with gradients per sequence under the model's sampling."""
        mu, kb = self.mean_loops, self.backprop_loops
        if self.depth_sampling != "poisson":
            k = min(mu, kb)
            return float(mu - k), float(k)
        # T ~ max(Poisson(μ), 1); E[k] = E[min(T, kb)], E[n] = E[T] − E[k]
        pmf = [math.exp(-mu)]
        for t in range(1, int(mu + 20 * math.sqrt(mu) + 20)):
            pmf.append(pmf[-1] * mu / t)
        ET = sum(max(t, 1) * p for t, p in enumerate(pmf))
        Ek = sum(min(max(t, 1), kb) * p for t, p in enumerate(pmf))
        return ET - Ek, Ek

    def training_flops(self, T: int | None = None, k: int | None = None) -> float:
        """FLOPs per token of a training step: T loops (k with gradients); default: the model's
        per-sequence depth sampling in expectation. Forward everything, backward (2×) the
        prelude, the k loops with gradients and the coda/head."""
        if T is None:
            n, k = self.expected_loops()
        else:
            k = min(T, self.backprop_loops) if k is None else k
            n = T - k
        return n * self.flops_loop + 3 * (self.flops_prelude + k * self.flops_loop + self.flops_coda)

    # ---- memory --------------------------------------------------------------------------
    def kv_cache_bytes(self, T: int) -> int:
        P, R, C = self.layers
        return int((P + T * R + C) * self.kv_per_layer)

    def inference_bytes(self, T: int, kv_cache: bool = False) -> int:
        """Peak bytes of a forward pass at T loops (with the generation KV cache if asked)."""
        return int(self.weight_bytes + 4 * self.working + (self.kv_cache_bytes(T) if kv_cache else 0))

    def training_bytes(self, k: int) -> int:
        """Peak bytes of a training step with gradients through k loops: weights, gradients,
        AdamW's two moments (all in the parameters' dtype), saved activations, working set."""
        state = (2 + ADAM_STATES) * self.weight_bytes
        return int(state + self.saved_prelude + k * self.saved_loop + 4 * self.working)

    def max_loops(self, memory: float, mode: str = "train", limit: int = 100_000) -> int | None:
        """Largest T whose peak fits `memory` bytes (mode "train": gradients through all T loops;
        "generate": inference with the KV cache); None when not even T = 1 fits; `limit` when
        the memory does not grow with T."""
        fits = (lambda T: self.training_bytes(T) <= memory) if mode == "train" else \
            (lambda T: self.inference_bytes(T, kv_cache=True) <= memory)
        if not fits(1):
            return None
        grows = self.saved_loop if mode == "train" else self.layers[1] * self.kv_per_layer
        if grows <= 0:
            return limit
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    # ---- time ----------------------------------------------------------------------------
    def forward_seconds(self, T: int) -> float | None:
        """A forward pass at T loops over the batch: each stage takes the longer of its FLOPs at
        the matmul rate and its weight bytes at the memory bandwidth."""
        if self.device is None:
            return None
        tokens = self.batch * self.seq_len
        per_loop_weights = self.weight_bytes * self._loop_share
        outer_weights = self.weight_bytes - per_loop_weights

        def stage(flops, wbytes):
            return max(flops * tokens / self.device.flops, wbytes / self.device.bandwidth)
        return (stage(self.flops_prelude + self.flops_coda, outer_weights)
                + T * stage(self.flops_loop, per_loop_weights))

    def training_seconds(self, T: int | None = None, k: int | None = None) -> float | None:
        if self.device is None:
            return None
        return self.training_flops(T, k) * self.batch * self.seq_len / self.device.flops

    _loop_share: float = 0.0  # share of the weight bytes read by one loop (set by `plan`)

    def to_json(self, T: int | None = None, memory: float | None = None) -> dict:
        T = self.mean_loops if T is None else T
        k = min(T, self.backprop_loops)
        out = {
            "name": self.name, "family": self.family, "precision": self.precision, "batch": self.batch,
            "seq_len": self.seq_len, "loops": T, "backprop_loops": self.backprop_loops,
            "params": self.params, "weight_bytes": self.weight_bytes,
            "flops_per_token": {"prelude": self.flops_prelude, "loop": self.flops_loop, "coda": self.flops_coda,
                                "inference": self.inference_flops(T), "training": self.training_flops(T, k),
                                "training_sampled": self.training_flops()},
            "activation_bytes": {"saved_per_loop": self.saved_loop, "saved_outside_loop": self.saved_prelude,
                                 "working": self.working},
            "kv_cache_bytes": self.kv_cache_bytes(T),
            "inference_bytes": self.inference_bytes(T), "generate_bytes": self.inference_bytes(T, True),
            "training_bytes": self.training_bytes(k), "training_bytes_all_loops": self.training_bytes(T),
            "device": None if self.device is None else self.device.to_json(),
            "forward_seconds": self.forward_seconds(T), "training_step_seconds": self.training_seconds(T, k),
            "notes": list(self.notes),
        }
        if memory is not None:
            out["memory"] = memory
            out["max_loops"] = {"train": self.max_loops(memory, "train"), "generate": self.max_loops(memory, "generate")}
        return out

    def to_text(self, T: int | None = None, memory: float | None = None) -> str:
        j = self.to_json(T, memory)
        T = j["loops"]
        g = _gib
        f = j["flops_per_token"]
        lines = [f"loopdyn plan: {self.name} ({self.family}), {self.precision}, batch {self.batch} × {self.seq_len} "
                 f"tokens, μ_rec {self.mean_loops}, μ_bwd {self.backprop_loops} ({self.depth_sampling} depths)",
                 f"  parameters {self.params:,}; weights {g(self.weight_bytes)}",
                 f"  FLOPs per token: prelude {f['prelude']:.4g}, per loop {f['loop']:.4g}, coda+head {f['coda']:.4g}; "
                 f"inference at T={T}: {f['inference']:.4g}; training (gradients through {min(T, self.backprop_loops)} "
                 f"of {T}): {f['training']:.4g}; with per-sequence depth sampling: {f['training_sampled']:.4g}",
                 f"  activations saved for backward: {g(self.saved_loop)} per loop with gradients + "
                 f"{g(self.saved_prelude)} outside the loop; working set {g(4 * self.working)}",
                 f"  KV cache for generation at T={T}: {g(j['kv_cache_bytes'])} "
                 f"({self.layers[0]} + {T}·{self.layers[1]} + {self.layers[2]} layers)",
                 f"  peak memory at T={T}: inference {g(j['inference_bytes'])}, generation {g(j['generate_bytes'])}, "
                 f"training {g(j['training_bytes'])} (gradients through all {T} loops: "
                 f"{g(j['training_bytes_all_loops'])})"]
        if memory is not None:
            m = j["max_loops"]
            show = lambda v: "none (even T = 1 does not fit)" if v is None else str(v)  # noqa: E731
            lines.append(f"  largest T in {g(memory)}: training with gradients through all loops {show(m['train'])}; "
                         f"generation with the KV cache {show(m['generate'])}")
        if self.device is not None:
            lines.append(f"  time ({self.device.source}: {self.device.flops / 1e12:.3g} TFLOP/s, "
                         f"{self.device.bandwidth / 1e9:.3g} GB/s): forward at T={T} {j['forward_seconds']:.3g} s, "
                         f"training step {j['training_step_seconds']:.3g} s")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.2f} MiB"


def parse_bytes(text: str) -> float:
    """'24GiB', '24 GB', '512MiB', '1e9' → bytes."""
    t = str(text).strip().replace(" ", "")
    units = {"tib": 2 ** 40, "gib": 2 ** 30, "mib": 2 ** 20, "kib": 2 ** 10, "tb": 1e12, "gb": 1e9, "mb": 1e6,
             "kb": 1e3, "g": 2 ** 30, "m": 2 ** 20, "b": 1}
    low = t.lower()
    for u, scale in units.items():
        if low.endswith(u):
            try:
                value = float(low[: -len(u)]) * scale
            except ValueError:
                break
            if value > 0 and math.isfinite(value):
                return value
            break
    else:
        try:
            value = float(low)
            if value > 0 and math.isfinite(value):
                return value
        except ValueError:
            pass
    raise InputError(f"cannot read the memory size {text!r} (e.g. 24GiB, 512MiB, 16GB)")


# ---- building the model on meta ------------------------------------------------------------------

def _build(spec: str, overrides: dict | None = None):
    """(model on meta, family, name) for a checkpoint folder / config.json, a LoopConfig preset, or
    a published configuration."""
    from pathlib import Path

    from loopdyn.models.weights import build_on_meta

    overrides = dict(overrides or {})
    path = Path(spec)
    if path.exists():
        import json

        cfg_path = path if path.is_file() else path / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{cfg_path}: cannot read the config ({err})") from None
        from loopdyn.models.importers import detect

        fmt = detect(raw)
        if fmt == "huginn":
            from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM

            cfg, _ = HuginnConfig.from_json(raw, str(cfg_path))
            return build_on_meta(lambda: HuginnLM(cfg)), "huginn", cfg.name
        if fmt == "ouro":
            from loopdyn.models.importers.ouro import OuroConfig, OuroLM

            cfg, _ = OuroConfig.from_json(raw, str(cfg_path))
            return build_on_meta(lambda: OuroLM(cfg)), "ouro", cfg.name
        from loopdyn.models.importers.parcae import official_config_to_loop_config
        from loopdyn.models.config import LoopConfig
        from loopdyn.models.looped import LoopedLM

        if raw.get("format") == "loopdyn":
            config = LoopConfig.from_dict(raw["config"], source=str(cfg_path))
        else:
            config = official_config_to_loop_config(raw, str(cfg_path))
        if overrides:
            config = config.replace(**overrides)
        return build_on_meta(lambda: LoopedLM(config)), "loopdyn", config.name
    if spec in PUBLISHED:
        if spec == "huginn-0125":
            from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM

            cfg = HuginnConfig(**overrides)
            return build_on_meta(lambda: HuginnLM(cfg)), "huginn", cfg.name
        from loopdyn.models.importers.ouro import OuroConfig, OuroLM

        cfg = (OuroConfig.ouro_1_4b if spec == "ouro-1.4b" else OuroConfig.ouro_2_6b)(**overrides)
        return build_on_meta(lambda: OuroLM(cfg)), "ouro", cfg.name
    from loopdyn.models.config import PRESETS, LoopConfig
    from loopdyn.models.looped import LoopedLM

    try:
        config = LoopConfig.preset(spec, **overrides)
    except Exception as err:  # noqa: BLE001 - one line naming what exists
        raise InputError(f"{spec}: not a checkpoint, a preset ({', '.join(sorted(PRESETS))}) or a published "
                         f"configuration ({', '.join(PUBLISHED)}): {err}") from None
    return build_on_meta(lambda: LoopedLM(config)), "loopdyn", config.name


def _to_meta(model) -> None:
    """Buffers built on the CPU (RoPE tables) moved to meta: the whole forward then runs on meta."""
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to("meta")
        for name in ("rope", "cos", "sin"):
            val = mod.__dict__.get(name)
            if isinstance(val, torch.Tensor) and not val.is_meta:
                mod.__dict__[name] = val.to("meta")


class _Saved:
    """Bytes of the tensors autograd saves (parameters and their views excluded; a tensor saved
    twice is counted once)."""

    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.seen: set = set()
        self.bytes = 0
        self.largest = 0

    def pack(self, t):
        base = t._base if t._base is not None else t
        if id(t) in self.params or id(base) in self.params:
            return t
        key = id(base)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += base.numel() * base.element_size()
        return t


def plan(spec: str, *, batch: int = 1, seq_len: int = 256, dtype=None, loops: int | None = None,
         overrides: dict | None = None, device: Device | None = None) -> Plan:
    """The Plan of `spec` (module docstring); nothing is allocated or read but the config."""
    from torch.utils.flop_counter import FlopCounterMode

    prec: Precision = precision(dtype)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"--seq-len must be a positive integer, got {seq_len!r}")
    model, family, name = _build(spec, overrides)
    _to_meta(model)
    for p in model.parameters():
        p.data = p.data.to(prec.weights)
    model.train()
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    weight_bytes = params * torch.finfo(prec.weights).bits // 8
    mu = int(model.mean_loops)
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and seq_len > max_len:
        raise InputError(f"--seq-len {seq_len} is longer than {name} supports ({max_len} tokens)")
    idx = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    ctx_mgr = prec.context("cpu")
    tokens = batch * seq_len
    counter = _Saved(model.parameters())
    with FlopCounterMode(display=False) as fc, ctx_mgr, torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        ctx = model.encode(idx)
        f0 = fc.get_total_flops()
        h = _init(model, ctx)
        saved0 = counter.bytes
        h1 = model.step(h, ctx)
        f1 = fc.get_total_flops()
        saved_loop = counter.bytes - saved0
        logits = model.decode(h1, ctx)
        f2 = fc.get_total_flops()
        working = max(logits.numel() * logits.element_size(), h1.numel() * h1.element_size() * 4)
    saved_outside = counter.bytes - saved_loop + logits.numel() * 4  # + the loss's softmax
    flops_prelude, flops_loop, flops_coda = f0 / tokens, (f1 - f0) / tokens, (f2 - f1) / tokens
    layers, kv = _layers_and_kv(model, family, batch, seq_len, prec)
    cfg = getattr(model, "config", None)
    kb = int(getattr(cfg, "backprop_loops", None) or getattr(cfg, "mean_backprop_depth", None) or mu)
    sampling = str(getattr(cfg, "depth_sampling", "fixed") if family == "loopdyn" else
                   "poisson" if family == "huginn" else "fixed")
    out = Plan(name, family, prec.name, batch, seq_len, mu, kb, sampling, params, weight_bytes, flops_prelude,
               flops_loop, flops_coda, int(saved_outside), int(saved_loop), int(working), kv, layers, device)
    loop_params = sum(p.numel() for n, p in model.named_parameters() if _in_loop(n, family))
    out._loop_share = loop_params / max(params, 1)
    if loops is not None and loops < 1:
        raise InputError(f"--loops must be ≥ 1, got {loops}")
    return out


def _init(model, ctx):
    """h_0 on the meta device, as a leaf that records the step's graph."""
    from loopdyn.models import protocol

    h = protocol.initial_state(model, ctx)
    h = h.to("meta") if not h.is_meta else h
    return h.detach().requires_grad_(True)


def _in_loop(name: str, family: str) -> bool:
    if family == "loopdyn":
        return name.startswith(("core.", "injection.", "state_norm."))
    if family == "huginn":
        return name.startswith(("core.", "adapter."))
    return name.startswith(("model.layers.", "layers.", "body.layers", "model.norm"))


def _layers_and_kv(model, family: str, batch: int, seq_len: int, prec: Precision) -> tuple[tuple, int]:
    """(prelude, core, coda) layer counts and KV-cache bytes per layer (keys + values, all heads)."""
    kv_dtype_bytes = torch.finfo(prec.compute).bits // 8
    if family == "loopdyn":
        c = model.config
        per = 2 * batch * seq_len * c.n_kv_heads * c.head_dim * kv_dtype_bytes
        return (c.n_prelude, c.n_core, c.n_coda), per
    if family == "huginn":
        c = model.config
        per = 2 * batch * seq_len * c.n_embd * kv_dtype_bytes
        return (c.n_layers_in_prelude, c.n_layers_in_recurrent_block, c.n_layers_in_coda), per
    c = model.config
    per = 2 * batch * seq_len * c.num_key_value_heads * c.head_dim * kv_dtype_bytes
    return (0, c.num_hidden_layers, 0), per


# ---- the device ---------------------------------------------------------------------------------

def measure_device(dtype=None, shape: tuple[int, int, int] = (256, 2048, 2048), seconds: float = 2.0) -> Device:
    """Matmul rate and memory bandwidth measured here: (m × k)·(k × n) products through
    loopdyn's own linear kernel in the compute dtype, and a large copy, best of repeats within
    about `seconds`."""
    from loopdyn.models.kernels import fast_linear

    prec = precision(dtype)
    m, k, n = shape
    x = torch.randn(m, k).to(prec.compute)
    w = torch.randn(n, k).to(prec.compute)
    best = math.inf
    end = time.perf_counter() + seconds / 2
    with torch.no_grad():
        fast_linear(x, w)
        while True:
            t = time.perf_counter()
            fast_linear(x, w)
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() > end:
                break
    flops = 2 * m * k * n / best
    a = torch.empty(64 * 2 ** 20 // 4)  # 64 MiB
    b = torch.empty_like(a)
    best_copy = math.inf
    end = time.perf_counter() + seconds / 2
    while True:
        t = time.perf_counter()
        b.copy_(a)
        best_copy = min(best_copy, time.perf_counter() - t)
        if time.perf_counter() > end:
            break
    bandwidth = 2 * a.numel() * 4 / best_copy  # read + write
    return Device(flops, bandwidth, f"measured here ({m}×{k}·{k}×{n} {prec.compute} matmul, 64 MiB copy)")
