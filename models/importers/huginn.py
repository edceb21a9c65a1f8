"""Huginn-0125 ("Raven", `RavenForCausalLM`) as a LoopedModel.

Forward pass (shared/reference/huginn-checkpoint-format.md §3; N = RMSNorm, ε = norm_eps):

    e_0     = √d · wte[x]                                   (B, S, d)
    e       = Prelude(e_0)                                  P sandwich blocks
    s_0     = zeros | caller's tensor | √d·TruncNormal(0, σ = √(2/(5d))·init_scale, ±3σ)
    u_t     = W_a [s_t ; e] (+ b) = Ā s_t + B̄ e (+ b)      Ā = W_a[:, :d], B̄ = W_a[:, d:]
    s_{t+1} = Core(u_t)                                     R sandwich blocks
    logits  = head( ln_f( Coda( ln_f(s_T) ) ) )             the same ln_f twice; float32

    sandwich block:  x ← N₂(x + Attn(N₁(x)));  x ← N₄(x + MLP(N₃(x)))

Attention: fused Wqkv (rows q | k | v, head-major), learned q/k bias added before RoPE,
interleaved-pair RoPE in float32 (base rope_base), causal SDPA, no QK-norm; MLP: SwiGLU with
fc = [gate; up]. loopdyn's sandwich `Block` computes exactly this, with the official norm_2
(after attention) stored as its norm_3 and the official norm_3 (before the MLP) as its norm_2.

The carried state s_t is the output of the last core block's N₄, so it is RMS-normalised
every step (`state_norm_kind = "post"`); `pre_norm_state(h, ctx)` is N₄'s input r_{t+1}.

Initial state (`init_state(ctx, generator=None, h0=None)`):
  * `h0=tensor` — that tensor (copied), whatever the mode; this is how parity is checked;
  * `model.init_mode = "zero"` — zeros (what the official converter's deterministic test uses);
  * `model.init_mode = "random"` (default, as the official model) — s_0 = √d·ξ with ξ a
    truncated normal (σ = √(2/(5d))·`model.init_scale`, cut at ±3σ), drawn on the CPU in the
    model's dtype from `generator`: a `randn` draw is made and discarded first, as in the
    official code, so `generator=torch.Generator().manual_seed(s)` gives the same numbers as
    the official model after `torch.manual_seed(s)` on the CPU. Without a generator the draw
    uses seed 0, so the forward pass is deterministic (the official one is not).
Analyses call `init_state(ctx, generator=g)`; set `init_mode` before running them.

Loops: `forward(idx, n_loops=T)` runs exactly T steps (default `mean_recurrence`), in eval and
training mode alike: the official training-mode depth sampler is not reproduced.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loopdyn.models.errors import CheckpointError, ConfigError, InputError
from loopdyn.models.formats import (ConfigReader, check_h0, check_layer_count, check_loops,
                                    check_tokens, check_weights, make_embedding, read_weights,
                                    stored_dtype_note)
from loopdyn.models.layers import Block, Linear, RMSNorm, rope_table
from loopdyn.models.looped import LMOutput, StateTap, block_sublayers
from loopdyn.models.operator import DenseOperator
from loopdyn.models.protocol import LinearPart, Sublayer, config_field
from loopdyn.models.sizes import count_params
from loopdyn.models.weights import StoredTensor, build_on_meta, fill, nonfinite_parameters

INIT_MODES = ("random", "zero")
TRAINING_PREFIX = "_orig_mod._original_module."


@dataclass(frozen=True)
class HuginnConfig:
    """The fields of a RavenConfig that the forward pass uses (defaults = Huginn-0125)."""

    name: str = "huginn-0125"
    vocab_size: int = 65536
    block_size: int = 4096  # RoPE table length, the longest sequence
    n_embd: int = 5280  # d
    n_heads: int = 55  # H, head size d/H = 96; no grouped KV heads in this format
    intermediate_size: int = 17920  # I
    n_layers_in_prelude: int = 2  # P
    n_layers_in_recurrent_block: int = 4  # R
    n_layers_in_coda: int = 2  # C
    mean_recurrence: int = 32  # default loop count
    mean_backprop_depth: int = 8  # training only
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    bias: bool = False  # adapter bias only
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ConfigError(f"Huginn config '{self.name}': {msg}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(value, int) and not isinstance(value, bool) and value >= (
                    0 if f.name in ("n_layers_in_prelude", "n_layers_in_coda") else 1),
                    f"{f.name} must be a positive integer, got {value!r}")
            elif f.type == "bool":
                need(isinstance(value, bool), f"{f.name} must be true or false, got {value!r}")
        need(self.n_embd % self.n_heads == 0, f"n_embd {self.n_embd} is not divisible by n_heads {self.n_heads}")
        need(self.head_dim % 2 == 0, "the head size must be even for RoPE")
        need(self.rope_base > 0 and self.norm_eps >= 0, "rope_base must be > 0 and norm_eps ≥ 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @classmethod
    def huginn_0125(cls, **overrides) -> "HuginnConfig":
        """The published 3.5B configuration (shared/reference/huginn-checkpoint-format.md §1)."""
        return cls(**overrides)

    @classmethod
    def from_json(cls, raw: dict, source: str = "config.json") -> tuple["HuginnConfig", list[str]]:
        """Read a RavenConfig dict field by field (both spellings of the aliased fields);
        returns the config and notes about fields that were checked but do not change the model."""
        r = ConfigReader(raw, source)
        d = r.int("n_embd", "hidden_size")
        H = r.int("n_heads", "num_attention_heads")
        P = r.int("n_layers_in_prelude", minimum=0)
        R = r.int("n_layers_in_recurrent_block")
        C = r.int("n_layers_in_coda", minimum=0)
        vocab = r.int("vocab_size")
        tied = r.bool("tie_embeddings")
        cfg = dict(
            name=str(raw.get("name") or raw.get("_name_or_path") or "huginn"), vocab_size=vocab,
            block_size=r.int("block_size"), n_embd=d, n_heads=H, intermediate_size=r.int("intermediate_size"),
            n_layers_in_prelude=P, n_layers_in_recurrent_block=R, n_layers_in_coda=C,
            mean_recurrence=r.int("mean_recurrence"), mean_backprop_depth=r.int("mean_backprop_depth", default=8),
            rope_base=r.float("rope_base", default=50000.0), norm_eps=r.float("norm_eps", default=1e-6,
                                                                             positive=False),
            qk_bias=r.bool("qk_bias"), bias=r.bool("bias"), tie_embeddings=tied,
        )
        notes = []
        if d % H:
            raise CheckpointError(f"{source}: n_embd {d} is not divisible by n_heads {H}")
        if r.int("num_key_value_heads", default=H) != H:
            raise CheckpointError(f"{source}: num_key_value_heads = {raw['num_key_value_heads']} ≠ n_heads = {H} "
                                  f"(RavenConfig always sets them equal)")
        if r.int("head_dim", default=d // H) != d // H:
            raise CheckpointError(f"{source}: head_dim = {raw['head_dim']} ≠ n_embd/n_heads = {d // H}")
        if r.int("padded_vocab_size", default=vocab) != vocab:
            raise CheckpointError(f"{source}: padded_vocab_size = {raw['padded_vocab_size']} ≠ vocab_size = {vocab}")
        if r.float("test_time_noise", default=0.0, positive=False) != 0:
            raise CheckpointError(f"{source}: test_time_noise = {raw['test_time_noise']} adds random noise every "
                                  f"loop, so the loop is not a function of the state; set it to 0")
        if r.bool("tie_word_embeddings", default=tied) != tied:
            raise CheckpointError(f"{source}: tie_word_embeddings = {raw['tie_word_embeddings']} contradicts "
                                  f"tie_embeddings = {tied}")
        total = r.int("n_layers", "num_hidden_layers", default=P + R + C)
        if total != P + R + C:
            notes.append(f"n_layers = {total} ≠ prelude + core + coda = {P + R + C} (unused by the forward pass)")
        r.dtype()
        try:
            return cls(**cfg), notes
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HuginnContext:
    idx: torch.Tensor  # (B, S) token ids
    e: torch.Tensor  # (B, S, d) prelude output, fixed during the loop
    rope: torch.Tensor  # (S, hd/2, 2) cos/sin, float32


class HuginnLM(nn.Module):
    """Huginn-0125 / Raven with the LoopedModel protocol (module docstring)."""

    state_norm_kind = "post"  # every core block ends with N₄: s_t is RMS-normalised each step
    injection_name = "linear (concat adapter)"

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.config = cfg = config
        d, H, I = cfg.n_embd, cfg.n_heads, cfg.intermediate_size

        def block():
            return Block(d, H, H, I, mlp="swiglu", norm="rmsnorm", norm_eps=cfg.norm_eps, kind="sandwich",
                         bias=False, qk_norm=False, qk_bias=cfg.qk_bias)

        self.wte = make_embedding(cfg.vocab_size, d)
        self.prelude = nn.ModuleList(block() for _ in range(cfg.n_layers_in_prelude))
        self.adapter = Linear(2 * d, d, bias=cfg.bias)  # columns [state | e]
        self.core = nn.ModuleList(block() for _ in range(cfg.n_layers_in_recurrent_block))
        self.coda = nn.ModuleList(block() for _ in range(cfg.n_layers_in_coda))
        self.ln_f = RMSNorm(d, cfg.norm_eps)
        self.lm_head = Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.state_tap = StateTap()
        # on the CPU even under torch.device("meta"): a first meta-device arange imports torch._dynamo (~10 s)
        self.register_buffer("rope", rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base, device="cpu"),
                             persistent=False)
        self.init_mode = "random"
        self.init_scale = 1.0

    # ---- the LoopedModel protocol ------------------------------------------------------------
    mean_loops = config_field("mean_recurrence", "the trained depth (RavenConfig.mean_recurrence)")
    checkpoint_format = "huginn"  # report label (also in checkpoint_info.format once loaded)
    name = config_field("name")
    vocab_size = config_field("vocab_size")
    max_seq_len = config_field("block_size")

    def encode(self, idx: torch.Tensor) -> HuginnContext:
        """Embedding (scaled by √d) and prelude: the injected input e."""
        check_tokens(idx, self.config.vocab_size, self.config.block_size)
        S = idx.shape[1]
        rope = self.rope[:S].float()
        x = self.wte(idx) * math.sqrt(self.config.n_embd)  # (B, S, d)
        for blk in self.prelude:
            x = blk(x, rope)
        return HuginnContext(idx=idx, e=x, rope=rope)

    def init_state(self, ctx: HuginnContext, generator: torch.Generator | None = None,
                   h0: torch.Tensor | None = None) -> torch.Tensor:
        """s_0 (B, S, d): `h0` if given, else per `self.init_mode` (module docstring)."""
        e = ctx.e
        if h0 is not None:
            return self.state_tap(check_h0(h0, e.shape, e))
        if self.init_mode not in INIT_MODES:
            raise InputError(f"init_mode must be one of {INIT_MODES}, got {self.init_mode!r}")
        if self.init_mode == "zero" or self.init_scale == 0:
            return self.state_tap(torch.zeros_like(e))
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        d = self.config.n_embd
        std = math.sqrt(2 / (5 * d)) * self.init_scale
        x = torch.randn(e.shape, dtype=e.dtype, generator=generator)  # drawn and discarded, as officially
        nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return self.state_tap((x * math.sqrt(d)).to(e.device))

    def inject(self, h: torch.Tensor, ctx: HuginnContext) -> torch.Tensor:
        """u = W_a [h ; e] (+ b)."""
        return self.adapter(torch.cat([h, ctx.e], dim=-1))

    def pre_norm_state(self, h: torch.Tensor, ctx: HuginnContext) -> torch.Tensor:
        """r_{t+1}: the step before the last core block's final norm N₄ (step = N₄(r))."""
        u = self.inject(h, ctx)
        *first, last = self.core
        for blk in first:
            u = blk(u, ctx.rope)
        x = last.norm_3(u + last.attn(last.norm_1(u), ctx.rope))
        return x + last.mlp(last.norm_2(x))

    def renormalise(self, r: torch.Tensor, ctx: HuginnContext) -> torch.Tensor:
        """N₄(r), the last core block's final norm: step = renormalise ∘ pre_norm_state."""
        return self.state_tap(self.core[-1].norm_4(r))

    def step(self, h: torch.Tensor, ctx: HuginnContext) -> torch.Tensor:
        """s_{t+1} = Core(W_a [s_t ; e]), a pure function of s_t."""
        u = self.inject(h, ctx)
        for blk in self.core:
            u = blk(u, ctx.rope)
        return self.state_tap(u)

    def decode(self, h: torch.Tensor, ctx: HuginnContext) -> torch.Tensor:
        """ln_f, coda, ln_f again, head: float32 logits (B, S, V)."""
        y = self.ln_f(h)
        for blk in self.coda:
            y = blk(y, ctx.rope)
        return self.lm_head(self.ln_f(y)).float()

    @torch.no_grad()
    def linear_part(self) -> LinearPart:
        """Ā = W_a[:, :d] and B̄ = W_a[:, d:] (dense), and the adapter bias."""
        W, d = self.adapter.weight.detach().float(), self.config.n_embd
        bias = None if self.adapter.bias is None else self.adapter.bias.detach().float().clone()
        return LinearPart(DenseOperator(W[:, :d].clone()), DenseOperator(W[:, d:].clone()), bias)

    def sublayers(self, ctx: HuginnContext) -> list[Sublayer]:
        """The adapter, then per core block its two normalised sublayers ("map")."""
        out = [Sublayer("adapter", lambda h: self.inject(h, ctx), "injection")]
        for j, blk in enumerate(self.core):
            out += block_sublayers(f"core.{j}", blk, ctx.rope)
        return out

    # ---- running the loop ------------------------------------------------------------------------
    def unroll(self, idx: torch.Tensor, n_loops: int | None = None, h0: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], HuginnContext]:
        """All states s_0 … s_T (T = n_loops, default mean_recurrence) and the context."""
        T = self.mean_loops if n_loops is None else check_loops(n_loops)
        ctx = self.encode(idx)
        states = [self.init_state(ctx, generator=generator, h0=h0)]
        for _ in range(T):
            states.append(self.step(states[-1], ctx))
        return states, ctx

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None,
                h0: torch.Tensor | None = None, generator: torch.Generator | None = None) -> LMOutput:
        """Logits after exactly n_loops steps (default mean_recurrence); `targets` are already
        shifted (loss = cross-entropy over every position, ignore_index −100, as officially)."""
        T = self.mean_loops if n_loops is None else check_loops(n_loops)
        ctx = self.encode(idx)
        state = prev = self.init_state(ctx, generator=generator, h0=h0)
        for _ in range(T):
            prev, state = state, self.step(state, ctx)
        logits = self.decode(state, ctx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loops = torch.full((idx.shape[0],), T, dtype=torch.long, device=idx.device)
        return LMOutput(logits=logits, loss=loss, state=state, prev_state=prev, n_loops=loops)

    def num_params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return count_params(self.parameters())


# ---- the official key layout ----------------------------------------------------------------------

_NORMS = {"norm_1": "norm_1", "norm_2": "norm_3", "norm_3": "norm_2", "norm_4": "norm_4"}  # official → ours
_STAGES = (("prelude", "prelude", "n_layers_in_prelude"), ("core_block", "core", "n_layers_in_recurrent_block"),
           ("coda", "coda", "n_layers_in_coda"))


def official_shapes(cfg: HuginnConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({required key: shape}, {optional key: shape}) of a RavenForCausalLM state dict (§2)."""
    d, H, hd, I, V = cfg.n_embd, cfg.n_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    req = {"transformer.wte.weight": (V, d)}
    for stage, _, count in _STAGES:
        for i in range(getattr(cfg, count)):
            p = f"transformer.{stage}.{i}"
            for n in ("norm_1", "norm_2", "norm_3", "norm_4"):
                req[f"{p}.{n}.weight"] = (d,)
            req[f"{p}.attn.Wqkv.weight"] = (3 * d, d)
            if cfg.qk_bias:
                req[f"{p}.attn.qk_bias"] = (2, 1, H, hd)
            req[f"{p}.attn.proj.weight"] = (d, d)
            req[f"{p}.mlp.fc.weight"] = (2 * I, d)
            req[f"{p}.mlp.proj.weight"] = (d, I)
    req["transformer.adapter.weight"] = (d, 2 * d)
    if cfg.bias:
        req["transformer.adapter.bias"] = (d,)
    req["transformer.ln_f.weight"] = (d,)
    opt = {"freqs_cis": (1, cfg.block_size, 1, hd // 2, 2)}
    (opt if cfg.tie_embeddings else req)["lm_head.weight"] = (V, d)
    return req, opt


def to_loopdyn_state(state: dict[str, StoredTensor], cfg: HuginnConfig) -> dict[str, StoredTensor]:
    """Official keys → HuginnLM parameter names (Wqkv split into q, k, v rows; norm_2/norm_3
    swapped); a tied head is left out (it is the embedding). Nothing is read yet."""
    d = cfg.n_embd
    out = {"wte.weight": state["transformer.wte.weight"], "adapter.weight": state["transformer.adapter.weight"],
           "ln_f.weight": state["transformer.ln_f.weight"]}
    if cfg.bias:
        out["adapter.bias"] = state["transformer.adapter.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for stage, ours, count in _STAGES:
        for i in range(getattr(cfg, count)):
            p, q = f"transformer.{stage}.{i}", f"{ours}.{i}"
            for theirs, mine in _NORMS.items():
                out[f"{q}.{mine}.weight"] = state[f"{p}.{theirs}.weight"]
            Wqkv = state[f"{p}.attn.Wqkv.weight"]
            for j, part in enumerate(("c_q", "c_k", "c_v")):
                out[f"{q}.attn.{part}.weight"] = Wqkv.rows(j * d, (j + 1) * d)
            if cfg.qk_bias:
                out[f"{q}.attn.qk_bias"] = state[f"{p}.attn.qk_bias"]
            out[f"{q}.attn.c_proj.weight"] = state[f"{p}.attn.proj.weight"]
            out[f"{q}.mlp.fc.weight"] = state[f"{p}.mlp.fc.weight"]
            out[f"{q}.mlp.proj.weight"] = state[f"{p}.mlp.proj.weight"]
    return out


def from_official(directory: Path, raw: dict, dtype: torch.dtype | None = None) -> HuginnLM:
    """A HuginnLM from a RavenForCausalLM folder, computing in `dtype` (default float32)."""
    from loopdyn.models.checkpoint import CheckpointInfo

    config_path = directory / "config.json"
    cfg, notes = HuginnConfig.from_json(raw, str(config_path))
    state, source = read_weights(directory)
    if any(k.startswith(TRAINING_PREFIX) for k in state):  # a training checkpoint (§2)
        state = {k[len(TRAINING_PREFIX):] if k.startswith(TRAINING_PREFIX) else k: v
                 for k, v in state.items() if "forward_module" not in k}
    if any(k.startswith("model.layers.") for k in state):
        raise CheckpointError(f"{source}: weights are in the Ouro/Llama layout (model.layers.*) but "
                              f"{config_path.name} is a Raven config: mixed formats")
    for stage, _, count in _STAGES:
        check_layer_count(state, f"transformer.{stage}", getattr(cfg, count), count, source)
    required, optional = official_shapes(cfg)
    check_weights(state, required, optional, source)
    if cfg.tie_embeddings and "lm_head.weight" in state and not torch.equal(state["lm_head.weight"].load(),
                                                                             state["transformer.wte.weight"].load()):
        raise CheckpointError(f"{source}: tie_embeddings is true but lm_head.weight differs from "
                              f"transformer.wte.weight")
    compute = dtype or torch.float32
    notes += stored_dtype_note(state, compute)
    freqs = state.pop("freqs_cis", None)
    rope = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base)
    if freqs is not None:
        stored = freqs.load().float()[0, :, 0].contiguous()  # (S, hd/2, 2); bf16-rounded if stored in bf16
        if not torch.allclose(stored, rope, atol=1e-6, rtol=0):
            notes.append("stored RoPE table (freqs_cis) differs from the recomputed one by "
                         f"{float((stored - rope).abs().max()):.1e}; using the stored one, as the official "
                         f"model does")
        rope = stored
    model = build_on_meta(lambda: HuginnLM(cfg))
    fill(model, {**to_loopdyn_state(state, cfg), "rope": rope}, compute, source)
    model.checkpoint_info = CheckpointInfo(str(directory), "huginn", source, nonfinite_parameters(model), notes)
    return model
