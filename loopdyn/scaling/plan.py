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
  excluded), and the peak of live tensors of a forward pass and of a training step (forward,
  loss, backward; AdamW's update), traced on meta with the lifetimes of the real pass
  (loopdyn/scaling/costmodel.py);
* KV-cache bytes for generation: every layer run keeps its keys and values, and a looped model
  runs its core once per loop, so the cache grows like prelude + T·core + coda layers;
* the largest T that fits a memory budget, for inference (weights + KV cache at T loops: the
  forward pass itself needs no more memory at more loops) and for training with gradients
  through all T loops (weights, gradients, two AdamW moments, the traced peak);
* time: the traced operators on a `Device`. Measured here (`Plan.measure`), every distinct
  operator call of the passes is replayed on this CPU on tensors of its layout and timed, and a
  pass costs Σ count · t_call; given a device (`tflops`, `bandwidth`, `overhead`), per operator
  the longer of its FLOPs at the matmul rate of its shape and its bytes at the memory bandwidth,
  plus a fixed cost per operator (the roofline, also for calls a replay cannot make).

Memory units are bytes (GiB = 2³⁰); FLOPs count a multiply-add as 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loopdyn.models.errors import ConfigError, InputError
from loopdyn.models.kernels import meta_as_cpu
from loopdyn.models.precision import Precision, precision
from loopdyn.scaling.costmodel import (Device, OpTrace, PassCost, given_device,  # noqa: F401 - re-exported
                                       measure_device, measure_kernels)

PUBLISHED = ("huginn-0125", "ouro-1.4b", "ouro-2.6b")
ADAM_STATES = 2  # exp_avg, exp_avg_sq, in the parameters' dtype
# The process's own memory beyond tensors once a pass has run (code the first pass and the first
# optimiser step import, the thread pool, oneDNN's primitive caches), measured by
# bench/plan_check.py on this machine's CPU build of PyTorch: +0–22 MiB after forward passes,
# +15–470 MiB over a training step (the most for bf16 models); within 15 % with these two.
RUNTIME_BYTES = {"inference": 16 * 2 ** 20, "training": 100 * 2 ** 20}


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
    # the meta-device traces (loopdyn/scaling/costmodel.py): operators of each stage, and the live
    # activation peaks (bytes, weights excluded) of an inference pass and of a training step
    passes: dict = field(default_factory=dict)  # "prelude" | "loop" | "coda" | "train_base" | "train_loop" | "optimizer" → PassCost
    peak_inference: int = 0  # live bytes of a no-grad forward pass (any T: a loop frees its input)
    # live bytes of a training step with gradients through k loops (gradients included):
    # max(peak_train, peak_train_base + k · peak_train_loop) — a transient that does not grow with k
    # (e.g. the embedding's gradient at the end of the backward pass), or the saved activations of
    # every loop alive at once (`activation_peak`)
    peak_train: int = 0  # the peak at k = 1
    peak_train_loop: int = 0  # growth per loop with gradients, where the loops' activations dominate
    peak_train_base: int = 0  # (or the deferred trace that gives it)
    peak_optimizer: int = 0  # live bytes AdamW's update allocates (its two moments and temporaries)
    buffer_bytes: int = 0  # tensors the model holds beside its parameters (RoPE tables, masks)
    state_numel: int = 0  # elements of the loop state h at (B, S): the typical operator size
    config: object = field(default=None, repr=False)  # the model's config (for `measure`'s twin)

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
        """Peak bytes of a forward pass at T loops (with the generation KV cache if asked): the
        weights, the runtime's own memory and the traced activation peak."""
        return int(self.weight_bytes + self.buffer_bytes + RUNTIME_BYTES["inference"] + self.peak_inference
                   + (self.kv_cache_bytes(T) if kv_cache else 0))

    def activation_peak(self, k: int) -> int:
        """Live bytes of a training step's pass with gradients through k loops (weights and AdamW's
        moments excluded): piecewise linear in k, traced at k = 1, 2 and where the loops dominate
        (that trace is run the first time a k > 2 is asked)."""
        if callable(self.peak_train_base):
            self.peak_train_base = int(self.peak_train_base())
        return int(max(self.peak_train, self.peak_train_base + k * self.peak_train_loop))

    def training_bytes(self, k: int) -> int:
        """Peak bytes of a training step with gradients through k loops: the weights and buffers,
        the runtime, and the larger of the backward pass's peak (AdamW's two moments, in the
        parameters' dtype, plus the traced peak of the step: saved activations, gradients, working
        tensors: `activation_peak`) and the update's (the gradients plus what
        AdamW's update allocates: its moments and its per-parameter temporaries)."""
        backward = ADAM_STATES * self.weight_bytes + self.activation_peak(k)
        update = self.weight_bytes + self.peak_optimizer
        return int(self.weight_bytes + self.buffer_bytes + RUNTIME_BYTES["training"] + max(backward, update))

    def max_loops(self, memory: float, mode: str = "train", limit: int = 100_000) -> int | None:
        """Largest T whose peak fits `memory` bytes (mode "train": gradients through all T loops;
        "generate": inference with the KV cache); None when not even T = 1 fits; `limit` when
        the memory does not grow with T."""
        fits = (lambda T: self.training_bytes(T) <= memory) if mode == "train" else \
            (lambda T: self.inference_bytes(T, kv_cache=True) <= memory)
        if not fits(1):
            return None
        grows = self.peak_train_loop if mode == "train" else self.layers[1] * self.kv_per_layer
        if grows <= 0:
            return limit
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    # ---- time ----------------------------------------------------------------------------
    def measure(self, seconds: float = 2.0) -> "Plan":
        """Set `device` to this machine, measured (`plan --measure`): the rates of the model's own
        matmul shapes and the bandwidth (costmodel.measure_device, for calls a replay cannot
        make), the framework's cost per call on a width-64 twin (calibrate.py), and every
        distinct operator call of the passes replayed (costmodel.measure_kernels); returns self."""
        import dataclasses

        from loopdyn import allocator
        from loopdyn.models.weights import build_on_meta
        from loopdyn.scaling import calibrate

        device = measure_device(self.precision, self.matmul_shapes()[:8], seconds, self.state_numel)
        c_fwd = c_grad = 0.0
        twin = "on a width-64 twin"
        try:  # the framework's cost per call, on a narrow twin of the model (calibrate.py)
            cfg, cls = calibrate.twin_config(self.config, self.family), _model_class(self.family)
            prec = precision(self.precision)
            twin_plan = _plan_model(build_on_meta(lambda: cls(cfg)), self.family, cfg.name, self.batch,
                                    self.seq_len, prec)
            torch.manual_seed(0)
            model = cls(cfg)
            prec.apply(model)
            c_fwd, c_grad = calibrate.call_overheads(twin_plan, model, prec, seconds / 2)
        except (ConfigError, TypeError, ValueError, AttributeError) as err:  # no twin of this config
            twin = f"not measured (no width-64 twin: {err})"
        sigs = [sig for p in self.passes.values() for sig in p.kernels]
        kernels = measure_kernels(sigs, 2 * seconds, gap=c_fwd)
        note = (f"times assume freed memory kept, as loopdyn's commands run ({allocator.KEPT}); this process: "
                f"{allocator.state()} (a short pass can take up to 1.3× the time planned)")
        if not allocator.kept() and note not in self.notes:  # the times are a steady pass's (loopdyn/allocator.py)
            self.notes.append(note)
        self.device = dataclasses.replace(
            device, kernel_seconds=kernels, call_overhead=c_fwd, grad_call_overhead=c_grad,
            source=device.source + f", {len(kernels)} operator calls replayed, framework {c_fwd * 1e6:.1f} / "
                                   f"{c_grad * 1e6:.1f} µs per call (no-grad / training) {twin}")
        return self

    def matmul_shapes(self) -> list[tuple]:
        """The (m, k, n, dtype) of every matmul the passes run: the largest of each dtype first,
        then the rest by FLOPs (for `measure_device`, which measures the first few)."""
        total: dict = {}
        for p in self.passes.values():
            for (m, k, n, dt), (_, f) in p.matmuls.items():
                if m:
                    total[(m, k, n, dt)] = total.get((m, k, n, dt), 0.0) + f
        ranked = sorted(total, key=total.get, reverse=True)
        heads = list({s[3]: s for s in reversed(ranked)}.values())  # the top shape of each dtype
        return heads + [s for s in ranked if s not in heads]

    def forward_seconds(self, T: int) -> float | None:
        """A forward pass at T loops over the batch on `device` (costmodel: a roofline per
        operator plus the fixed cost per operator)."""
        if self.device is None:
            return None
        sec = {k: self.passes[k].seconds(self.device) for k in ("prelude", "loop", "coda")}
        return sec["prelude"] + T * sec["loop"] + sec["coda"]

    def training_seconds(self, T: int | None = None, k: int | None = None) -> float | None:
        """A training step over the batch: T − k loops without gradients, k loops with (forward and
        backward), the loss and AdamW's update; default T, k: the model's per-sequence depth
        sampling in expectation."""
        if self.device is None:
            return None
        if T is None:
            n, k = self.expected_loops()
        else:
            k = min(T, self.backprop_loops) if k is None else k
            n = T - k
        sec = {key: p.seconds(self.device, grad=key.startswith("train")) for key, p in self.passes.items()}
        return n * sec["loop"] + sec["train_base"] + max(k - 1, 0) * sec["train_loop"] + sec["optimizer"]

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
                                 "working": self.working, "inference_peak": self.peak_inference,
                                 "training_peak": self.peak_train, "training_peak_per_loop": self.peak_train_loop,
                                 "runtime": RUNTIME_BYTES},
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
                 f"{g(self.saved_prelude)} outside the loop; peak of a forward pass {g(self.peak_inference)}, of "
                 f"a training step {g(self.activation_peak(1))} through 1 loop, growing by {g(self.peak_train_loop)} "
                 f"per loop from {g(self.activation_peak(1))} on",
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
                         f"{self.device.bandwidth / 1e9:.3g} GB/s, {self.device.overhead * 1e6:.3g} µs per "
                         f"operator): forward at T={T} {j['forward_seconds']:.3g} s, "
                         f"training step {j['training_step_seconds']:.3g} s")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.2f} MiB"


def parse_bytes(text: str) -> float:
    """'24GiB', '24 GB', '512MiB', '1e9' → bytes."""
    low = str(text).strip().replace(" ", "").lower()
    units = {"tib": 2 ** 40, "gib": 2 ** 30, "mib": 2 ** 20, "kib": 2 ** 10, "tb": 1e12, "gb": 1e9, "mb": 1e6,
             "kb": 1e3, "g": 2 ** 30, "m": 2 ** 20, "b": 1}
    unit = next((u for u in units if low.endswith(u)), "")
    try:
        value = float(low[: len(low) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        value = math.nan
    if value > 0 and math.isfinite(value):
        return value
    raise InputError(f"cannot read the memory size {text!r} (e.g. 24GiB, 512MiB, 16GB)")


# ---- building the model on meta ------------------------------------------------------------------

def _build(spec: str, overrides: dict | None = None):
    """(model on meta, family, name) for a checkpoint folder / config.json, a LoopConfig preset, or
    a published configuration."""
    from pathlib import Path

    from loopdyn.models.config import PRESETS, LoopConfig
    from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM
    from loopdyn.models.importers.ouro import OuroConfig, OuroLM
    from loopdyn.models.looped import LoopedLM
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
            cfg, _ = HuginnConfig.from_json(raw, str(cfg_path))
            return build_on_meta(lambda: HuginnLM(cfg)), "huginn", cfg.name
        if fmt == "ouro":
            cfg, _ = OuroConfig.from_json(raw, str(cfg_path))
            return build_on_meta(lambda: OuroLM(cfg)), "ouro", cfg.name
        from loopdyn.models.importers.parcae import official_config_to_loop_config

        if raw.get("format") == "loopdyn":
            config = LoopConfig.from_dict(raw["config"], source=str(cfg_path))
        else:
            config = official_config_to_loop_config(raw, str(cfg_path))
        if overrides:
            config = config.replace(**overrides)
        return build_on_meta(lambda: LoopedLM(config)), "loopdyn", config.name
    if spec in PUBLISHED:
        if spec == "huginn-0125":
            cfg = HuginnConfig(**overrides)
            return build_on_meta(lambda: HuginnLM(cfg)), "huginn", cfg.name
        cfg = (OuroConfig.ouro_1_4b if spec == "ouro-1.4b" else OuroConfig.ouro_2_6b)(**overrides)
        return build_on_meta(lambda: OuroLM(cfg)), "ouro", cfg.name
    try:
        config = LoopConfig.preset(spec, **overrides)
    except Exception as err:  # noqa: BLE001 - one line naming what exists
        raise InputError(f"{spec}: not a checkpoint, a preset ({', '.join(sorted(PRESETS))}) or a published "
                         f"configuration ({', '.join(PUBLISHED)}): {err}") from None
    return build_on_meta(lambda: LoopedLM(config)), "loopdyn", config.name


def _model_class(family: str):
    if family == "huginn":
        from loopdyn.models.importers.huginn import HuginnLM as cls
    elif family == "ouro":
        from loopdyn.models.importers.ouro import OuroLM as cls
    else:
        from loopdyn.models.looped import LoopedLM as cls
    return cls


def _to_meta(model) -> int:
    """Buffers built on the CPU (RoPE tables) moved to meta: the whole forward then runs on meta.
    Returns their bytes (they are memory the model holds beside its weights)."""
    held, seen = 0, set()
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                held += buf.numel() * buf.element_size()
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to("meta")
        for name in ("rope", "cos", "sin"):
            val = mod.__dict__.get(name)
            if isinstance(val, torch.Tensor) and id(val) not in seen:
                seen.add(id(val))
                held += val.numel() * val.element_size()
            if isinstance(val, torch.Tensor) and not val.is_meta:
                mod.__dict__[name] = val.to("meta")
    return held


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
    prec: Precision = precision(dtype)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"--seq-len must be a positive integer, got {seq_len!r}")
    if loops is not None and loops < 1:
        raise InputError(f"--loops must be ≥ 1, got {loops}")
    model, family, name = _build(spec, overrides)
    return _plan_model(model, family, name, batch, seq_len, prec, device)


def _plan_model(model, family: str, name: str, batch: int, seq_len: int, prec: Precision,
                device: Device | None = None) -> Plan:
    """The Plan of a model built on meta (`_build`)."""
    from torch.utils.flop_counter import FlopCounterMode

    buffer_bytes = _to_meta(model)
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
    tokens = batch * seq_len
    counter = _Saved(model.parameters())
    with FlopCounterMode(display=False) as fc, prec.context("cpu"), \
            torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
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
        state_numel = h1.numel()
    saved_outside = counter.bytes - saved_loop + logits.numel() * 4  # + the loss's softmax
    del ctx, h, h1, logits
    flops_prelude, flops_loop, flops_coda = f0 / tokens, (f1 - f0) / tokens, (f2 - f1) / tokens
    passes, peaks = _trace_passes(model, idx, prec, saved_loop)
    layers, kv = _layers_and_kv(model, family, batch, seq_len, prec)
    cfg = getattr(model, "config", None)
    kb = int(getattr(cfg, "backprop_loops", None) or getattr(cfg, "mean_backprop_depth", None) or mu)
    sampling = str(getattr(cfg, "depth_sampling", "fixed") if family == "loopdyn" else
                   "poisson" if family == "huginn" else "fixed")
    out = Plan(name, family, prec.name, batch, seq_len, mu, kb, sampling, params, weight_bytes, flops_prelude,
               flops_loop, flops_coda, int(saved_outside), int(saved_loop), int(working), kv, layers, device,
               passes=passes, peak_inference=peaks[0], peak_train=peaks[1], peak_train_loop=peaks[2],
               peak_train_base=peaks[3], peak_optimizer=peaks[4], buffer_bytes=buffer_bytes, state_numel=state_numel,
               config=cfg)
    return out


def _init(model, ctx):
    """h_0 on the meta device, as a leaf that records the step's graph."""
    from loopdyn.models import protocol

    h = protocol.initial_state(model, ctx)
    h = h.to("meta") if not h.is_meta else h
    return h.detach().requires_grad_(True)


def _train_peak(model, idx, prec: Precision, k: int):
    """(live-byte peak, the trace) of a training step's forward, loss and backward through k loops."""
    from loopdyn.scaling.calibrate import training_loss

    for p in model.parameters():
        p.grad = None
    with prec.context("cpu"), meta_as_cpu(), OpTrace() as tr:
        loss = training_loss(model, idx, k)
        loss.backward()
        del loss
    return tr.peak, tr


def _trace_passes(model, idx, prec: Precision, saved_loop: int):
    """The operators of each stage and the live-activation peaks (costmodel.OpTrace) on meta, along
    the path the pass takes on this machine's CPU (models/kernels.meta_as_cpu): a no-grad forward
    pass (prelude, one loop, coda + head); training steps with gradients through 1 and 2 loops
    (forward, loss, backward), whose difference is the time of one more loop, and, when the k = 1
    peak is a transient the loops' saved activations have not reached, through kb loops, past
    where they outgrow it (the growth beyond is what one loop saves for the backward pass);
    AdamW's update twice (the first allocates its moments, the second is what every later step
    runs). Returns (passes, (inference peak, training peak at k = 1, growth per loop, its base,
    update peak))."""
    from loopdyn.models import protocol

    passes = {}
    model.eval()
    with torch.no_grad(), prec.context("cpu"), meta_as_cpu(), OpTrace() as tr:
        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)  # h_0: once per pass, with the prelude
        s0 = tr.snapshot()
        h = model.step(h, ctx)
        s1 = tr.snapshot()
        model.decode(h, ctx)
        s2 = tr.snapshot()
        del ctx, h
    passes["prelude"], passes["loop"], passes["coda"] = s0, s1.minus(s0), s2.minus(s1)
    peak_inference = tr.peak
    model.train()
    (p1, t1), (p2, t2) = _train_peak(model, idx, prec, 1), _train_peak(model, idx, prec, 2)
    passes["train_base"], passes["train_loop"] = t1.snapshot(), t2.snapshot().minus(t1.snapshot())
    # the growth per loop where the loops' saved activations dominate the peak (beyond a transient
    # such as the embedding's gradient, which k = 1 and 2 may both be below)
    if p2 - p1 >= saved_loop / 2:  # the loops' activations make the peak from k = 1 on
        grow, base = p2 - p1, p1 - (p2 - p1)
    else:  # a transient: trace once past it (when asked: kb loops of a big model take a while)
        kb = min(math.ceil(p1 / max(saved_loop, 1)) + 1, 256)
        grow, base = saved_loop, lambda: _train_peak(model, idx, prec, kb)[0] - kb * saved_loop
    opt = torch.optim.AdamW([p for p in model.parameters() if p.grad is not None], lr=1e-4)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    try:
        with OpTrace() as tr:  # the first update: the moments are allocated
            opt.step()
        peak_optimizer = tr.peak
        with OpTrace() as tr:  # every later one: the operators a training step runs
            opt.step()
        passes["optimizer"] = tr.snapshot()
    except Exception:  # noqa: BLE001 - an optimiser that cannot run on meta: its traffic by formula
        by_formula = (("AdamW's update by formula", (), ()), (1, 0.0, 7.0 * n, None))  # a call no replay makes
        passes["optimizer"], peak_optimizer = PassCost(dict([by_formula])), 2 * n
    for p in model.parameters():
        p.grad = None
    return passes, (peak_inference, p1, grow, base, peak_optimizer)


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
