"""LoopConfig: every architecture field of a looped (or fixed-depth) language model.

A looped LM is prelude → prelude norm → loop (inject, core blocks) × T → readout C → coda →
final norm → head. A fixed-depth model (`injection="fixed"`, the fixed-depth twin) is the same
stack without a loop: its blocks all sit in the prelude, as in a plain GPT.

Injection kinds (`INJECTIONS`, the one list; docs/design.md §3): diagonal, linear, additive,
autonomous, and "fixed" for the fixed-depth twin. "none", the fixed twin's name in loopdyn 0.1
model configs, is accepted on input as an alias (LoopConfig(...), config.json, the CLI's
--injection) and stored as "fixed".

Presets: `tiny` (a CPU demo model), `small`, the four Parcae paper models (matching the
official configs in shared/reference/parcae-checkpoint-format.md §7) and fixed-depth
`gpt-*` twins.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from loopdyn.models.errors import ConfigError

INJECTIONS = ("diagonal", "linear", "additive", "autonomous", "fixed")
INJECTION_ALIASES = {"none": "fixed"}  # accepted on input only
MLPS = ("relu2", "relu", "gelu", "swiglu", "geglu")
NORMS = ("rmsnorm", "layernorm")
BLOCKS = ("prenorm", "sandwich")
STATE_INITS = ("zero", "like-init", "normal", "embed", "unit")
DEPTH_SAMPLING = ("poisson", "fixed")
INPUT_GAINS = ("euler", "zoh")


@dataclass
class LoopConfig:
    name: str = "custom"
    # vocabulary and positions
    vocab_size: int = 256  # rows of the embedding and head (already padded)
    block_size: int = 256  # longest sequence the model accepts
    # outer width (prelude, coda)
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads
    d_mlp: int | None = None  # None: 4 * d_model
    # block design
    mlp: str = "relu2"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    block: str = "prenorm"
    qk_norm: bool = True
    qk_bias: bool = False
    clip_qkv: float | None = None
    bias: bool = False
    value_embeds: bool = True
    rope_base: float = 50000.0
    # stages
    n_prelude: int = 1
    n_core: int = 2
    n_coda: int = 1
    # recurrent state (core) width; None: same as the outer width
    d_state: int | None = None
    n_state_heads: int | None = None
    d_state_mlp: int | None = None
    # the loop
    injection: str = "diagonal"  # | linear | additive | autonomous (no input: h_0 = e, h ← Norm(core(h))) | fixed
    input_gain: str = "euler"  # diagonal only: Δ·B (euler) or (1 − e^{−Δa})/a ⊙ B (zoh)
    state_init: str = "like-init"
    prelude_norm: bool = True
    mean_loops: int = 4  # μ_rec
    backprop_loops: int | None = None  # μ_bwd; None: ceil(mean_loops / 2)
    depth_sampling: str = "poisson"  # per sequence T ~ max(Poisson(μ_rec), 1), or fixed
    # head
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    emb_scale: float = 1.0
    logit_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, never architectural

    def __post_init__(self) -> None:
        self.injection = canonical_injection(self.injection)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.d_state is None:
            self.d_state = self.d_model
        if self.n_state_heads is None:
            self.n_state_heads = self.n_heads
        if self.d_state_mlp is None:
            self.d_state_mlp = 4 * self.d_state
        if self.backprop_loops is None and _is_int(self.mean_loops):
            self.backprop_loops = math.ceil(self.mean_loops / 2)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def looped(self) -> bool:
        return self.injection != "fixed"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_blocks(self) -> int:
        """Distinct blocks (weights), N = P + R + C."""
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def effective_depth(self) -> int:
        """Blocks run per token at the mean loop count, P + R·μ_rec + C."""
        return self.n_prelude + self.n_core * (self.mean_loops if self.looped else 0) + self.n_coda

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config '{self.name}': {msg}")

        # types first, so that a bad value (e.g. from `--set`) is a ConfigError, not a TypeError
        for name in ("mean_loops", "backprop_loops"):
            need(_is_int(getattr(self, name)), f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_base", "emb_scale", "logit_scale"):
            value = getattr(self, name)
            need(_is_number(value) and math.isfinite(value) and value >= 0,
                 f"{name} must be a finite number ≥ 0, got {value!r}")
        for name in ("logit_softcap", "clip_qkv"):
            value = getattr(self, name)
            need(value is None or (_is_number(value) and math.isfinite(value) and value > 0),
                 f"{name} must be null or a finite number > 0, got {value!r}")
        for name in ("qk_norm", "qk_bias", "bias", "value_embeds", "prelude_norm", "tie_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(isinstance(self.name, str) and isinstance(self.extra, dict), "name must be a string and extra a dict")
        need(self.injection in INJECTIONS, f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.block in BLOCKS, f"block must be one of {BLOCKS}, got {self.block!r}")
        need(self.state_init in STATE_INITS, f"state_init must be one of {STATE_INITS}, got {self.state_init!r}")
        need(self.depth_sampling in DEPTH_SAMPLING, f"depth_sampling must be one of {DEPTH_SAMPLING}")
        need(self.input_gain in INPUT_GAINS, f"input_gain must be one of {INPUT_GAINS}")
        for name in ("vocab_size", "block_size", "d_model", "n_heads", "n_kv_heads", "d_mlp",
                     "d_state", "n_state_heads", "d_state_mlp"):
            need(_is_int(getattr(self, name)) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("n_prelude", "n_core", "n_coda"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 0,
                 f"{name} must be an integer ≥ 0, got {getattr(self, name)!r}")
        need(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        need(self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads")
        need(self.head_dim % 2 == 0, "the head size must be even for RoPE")
        need(self.d_state % self.n_state_heads == 0, "d_state must be divisible by n_state_heads")
        if self.looped:
            need(self.n_core >= 1, "a looped model needs n_core ≥ 1")
            need(self.mean_loops >= 1, "mean_loops must be ≥ 1")
            need(1 <= self.backprop_loops, "backprop_loops must be ≥ 1")
            need(self.d_state // self.n_state_heads == self.head_dim,
                 "the core head size d_state/n_state_heads must equal d_model/n_heads (shared RoPE table)")
            need(self.injection not in ("additive", "autonomous") or self.d_state == self.d_model,
                 f"{self.injection} injection needs d_state == d_model")
        else:
            need(self.n_core == 0, "a fixed-depth model (injection='fixed') has n_core = 0")
        if self.value_embeds:
            need(min(self.d_model, self.d_state) >= 32, "value-embedding gates read 32 channels: widths must be ≥ 32")

    # ---- size, before anything is allocated ------------------------------------------
    def param_count(self, exact: bool = True) -> int:
        """Unique parameters a LoopedLM of this config holds (tied head counted once), by
        arithmetic: nothing is allocated. `exact=False` leaves out the value-embedding tables
        and gates (a lower bound that costs O(1) even for absurd layer counts)."""
        d, ds, V = self.d_model, self.d_state, self.vocab_size
        b = 1 if self.bias else 0
        per_norm = (1 if self.norm == "rmsnorm" else 2)
        gated_mlp = self.mlp in ("swiglu", "geglu")

        def block(w: int, heads: int, kv_heads: int, m: int) -> int:
            kvw = kv_heads * (w // heads)
            attn = w * w + 2 * w * kvw + w * w + b * (w + 2 * kvw + w) + (2 * w if self.qk_bias else 0)
            mlp = w * (2 * m if gated_mlp else m) + b * (2 * m if gated_mlp else m) + m * w + b * w
            return attn + mlp + (4 if self.block == "sandwich" else 2) * per_norm * w

        n = V * d + per_norm * d  # embedding, final norm
        n += (self.n_prelude + self.n_coda) * block(d, self.n_heads, self.n_kv_heads, self.d_mlp)
        if not self.tie_embeddings:
            n += V * d
        if self.looped:
            n += self.n_core * block(ds, self.n_state_heads, self.n_state_heads, self.d_state_mlp)
            n += per_norm * d if self.prelude_norm else 0
            n += ds * d + b * d  # readout C
            n += {"diagonal": 2 * ds + ds * d, "linear": (ds + d) * ds + b * ds}.get(self.injection, 0)
        if exact and self.value_embeds:
            from loopdyn.models.looped import value_embedding_layout  # torch; config.py stays light

            live = value_embedding_layout(self).live
            n += len(set(live.values())) * V * self.n_kv_heads * self.head_dim
            for name in live:
                n += 32 * (self.n_state_heads if name.startswith("core.") else self.n_kv_heads)
        return n

    def model_bytes(self, exact: bool = True) -> int:
        """float32 bytes of a LoopedLM of this config: parameters and the RoPE table."""
        return 4 * (self.param_count(exact) + self.block_size * self.head_dim)

    def check_fits(self, factor: float = 1.0, what: str = "the model", source: str | None = None,
                   file_bytes: int | None = None, bytes_per_param: float = 1.0) -> int:
        """Refuse (ConfigError) a config whose model could not be allocated here, before any
        allocation: `factor` × its float32 bytes must fit in the machine's available memory
        (training needs about 4×: weights, gradients, two Adam moments), and a weights file of
        `file_bytes` must hold at least `bytes_per_param` per parameter. Returns the bytes."""
        where = f"{source}: " if source else ""
        low = self.model_bytes(exact=False)
        memory = available_memory()
        if memory is not None and factor * low > memory:
            raise ConfigError(f"{where}config '{self.name}' implies at least {self.param_count(False):,} parameters "
                              f"({_gib(low)}); {what} needs {_gib(factor * low)}, more than the "
                              f"{_gib(memory)} of memory available")
        if file_bytes is not None and file_bytes < bytes_per_param * self.param_count(exact=False):
            raise ConfigError(f"{where}config '{self.name}' implies at least {self.param_count(False):,} parameters, "
                              f"but the weights file holds only {file_bytes:,} bytes: the config does not match "
                              f"the weights")
        n = self.param_count(exact=True)
        need = 4 * (n + self.block_size * self.head_dim)
        if file_bytes is not None and file_bytes < bytes_per_param * n:
            raise ConfigError(f"{where}config '{self.name}' implies {n:,} parameters, but the weights file holds "
                              f"only {file_bytes:,} bytes: the config does not match the weights")
        if memory is not None and factor * need > memory:
            raise ConfigError(f"{where}config '{self.name}' implies {n:,} parameters ({_gib(need)}); {what} needs "
                              f"{_gib(factor * need)}, more than the {_gib(memory)} of memory available")
        return need

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "LoopConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ConfigError) as err:  # name the file for invalid values too
            raise ConfigError(f"{source}: {err}") from None

    def replace(self, **changes: Any) -> "LoopConfig":
        data = self.to_dict()
        unknown = sorted(set(changes) - set(data))
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
        data.update(changes)
        return LoopConfig(**data)

    # ---- presets ---------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LoopConfig":
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        data = dict(PRESETS[key], name=key)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
        data.update(overrides)
        if canonical_injection(data.get("injection")) == "fixed":
            data = _as_fixed_depth(data)
        return cls(**data)

    def fixed_depth_twin(self, match: str = "flops") -> "LoopConfig":
        """The same blocks stacked without a loop.

        match="params": P + R + C blocks (the official gpt-* baselines: equal unique parameters).
        match="flops":  P + R·μ_rec + C blocks (equal forward FLOPs per token at the mean depth).
        """
        if match not in ("flops", "params"):
            raise ConfigError("match must be 'flops' or 'params'")
        n_layer = self.effective_depth if match == "flops" else self.n_blocks
        data = dict(self.to_dict(), n_prelude=n_layer, n_core=0, n_coda=0, name=f"gpt-twin-{self.name}")
        return LoopConfig(**_as_fixed_depth(data))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: MemAvailable (Linux), else the physical
    memory, else None (unknown: no check). LOOPDYN_MEMORY_LIMIT (bytes) lowers it."""
    import os

    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            found = None
    limit = os.environ.get("LOOPDYN_MEMORY_LIMIT")
    if limit:
        try:
            found = min(found, int(float(limit))) if found is not None else int(float(limit))
        except ValueError:
            pass
    return found


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def canonical_injection(kind: Any) -> Any:
    """The canonical name of an injection kind: an alias (INJECTION_ALIASES) mapped, anything
    else returned unchanged (validation reports unknown kinds)."""
    return INJECTION_ALIASES.get(kind, kind) if isinstance(kind, str) else kind


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_fixed_depth(data: dict[str, Any]) -> dict[str, Any]:
    """Move every block into the prelude and drop the loop (a plain GPT)."""
    n_layer = data.get("n_prelude", 0) + data.get("n_core", 0) + data.get("n_coda", 0)
    data = dict(data, injection="fixed", n_prelude=n_layer, n_core=0, n_coda=0, prelude_norm=False)
    data.update(d_state=None, n_state_heads=None, d_state_mlp=None)
    return data


_PAPER = dict(vocab_size=32768, block_size=2048, mlp="relu2", norm="rmsnorm", qk_norm=True,
              value_embeds=True, rope_base=50000.0, injection="diagonal", state_init="like-init",
              prelude_norm=True, mean_loops=8, backprop_loops=4, depth_sampling="poisson",
              tie_embeddings=True)
_PAPER_SIZES = {  # d_model, heads, layers per stage (reference §7.2)
    "140m": (768, 6, 2), "370m": (1024, 8, 4), "770m": (1280, 10, 6), "1.3b": (1536, 12, 8),
}

PRESETS: dict[str, dict[str, Any]] = {
    # A CPU demo model: byte vocabulary, several training steps per second at 8 × 64 tokens.
    "tiny": dict(vocab_size=256, block_size=256, d_model=64, n_heads=4, d_mlp=256,
                 n_prelude=1, n_core=2, n_coda=1, mean_loops=4, backprop_loops=2),
    # A larger CPU model (probe overhead, longer experiments).
    "small": dict(vocab_size=256, block_size=512, d_model=256, n_heads=4, d_mlp=1024,
                  n_prelude=2, n_core=2, n_coda=2, mean_loops=8, backprop_loops=4),
}
for _size, (_d, _h, _l) in _PAPER_SIZES.items():
    PRESETS[f"parcae-{_size}"] = dict(_PAPER, d_model=_d, n_heads=_h, d_mlp=4 * _d,
                                      n_prelude=_l, n_core=_l, n_coda=_l)
    # The official gpt-* baselines have as many blocks as the Parcae model has distinct
    # blocks (equal unique parameters): 6, 12, 18, 24 layers.
    PRESETS[f"gpt-{_size}"] = _as_fixed_depth(dict(PRESETS[f"parcae-{_size}"]))
PRESETS["gpt-tiny"] = _as_fixed_depth(dict(PRESETS["tiny"]))
PRESETS["gpt-small"] = _as_fixed_depth(dict(PRESETS["small"]))

PRESET_ALIASES = {
    "parcae-small-140m": "parcae-140m", "parcae-medium-370m": "parcae-370m",
    "parcae-large-770m": "parcae-770m", "parcae-xlarge-1_3b": "parcae-1.3b",
    "parcae-1_3b": "parcae-1.3b", "gpt-small-140m": "gpt-140m", "gpt-medium-370m": "gpt-370m",
    "gpt-medium-380m": "gpt-370m", "gpt-large-770m": "gpt-770m", "gpt-xlarge-1_3b": "gpt-1.3b",
}
