"""Ouro / LoopLM (`OuroForCausalLM`, ByteDance Ouro-1.4B / 2.6B) as a LoopedModel.

Forward pass (shared/reference/ouro-checkpoint-format.md §3; N = RMSNorm, ε = rms_norm_eps):

    h_0     = embed_tokens[x]                         (B, S, d); no scale, no prelude
    h_{t+1} = N_final( Layer_{L−1} ∘ … ∘ Layer_0 (h_t) )   the same L layers every loop
    logits_t = lm_head(h_t)                          no softcap, untied head (by default)

    layer:  h ← h + N_in2( Attn( N_in(h) ) );   h ← h + N_post2( MLP( N_post(h) ) )

Attention: separate bias-free q/k/v/o projections, H query and KV key/value heads of size hd
(hd may differ from d/H), half-split ("rotate_half") RoPE with θ = rope_theta computed in
float32 and cast to the activation dtype, causal softmax attention with scale hd^−½ (SDPA in
float32; in lower precision the official eager path, softmax in float32); MLP:
SwiGLU, down(SiLU(gate·x) ⊙ up·x).

There is no input injection: the loop is autonomous, F(h) = N_final(Stack(h)), with no
`linear_part` at all. Every state after the first is RMS-normalised (`state_norm_kind =
"post"`); `pre_norm_state(h, ctx)` is Stack(h), the input of N_final.

Exit gate: λ(h) = σ(w_gᵀh + b_g) per token (`exit_gate(h, ctx)`, in the model dtype). Over
T loops the exit distribution is p_t = λ_t ∏_{j<t}(1 − λ_j) for t < T−1 and p_{T−1} = ∏_{j<T−1}
(1 − λ_j) (`exit_distribution`). The official state index is 0-based: its hs_t is h_{t+1} here.

Loops and readout modes, `forward(idx, n_loops=T, exit=...)`:
  * exit="last" (default; what vLLM does and what loopdyn's analyses mean by "T loops"):
    logits = head(h_T) — the official `exit_at_step = T−1`;
  * exit="threshold": the official default when no labels are given: per token the first
    loop whose cumulative exit probability reaches `threshold` (default the config's
    `early_exit_threshold`, 1.0 in the released models), else the last one;
  * exit="weighted": Σ_t p_t · head(h_{t+1}), the official training-mode logits.
Gate and exit probabilities are computed in the model's dtype, as officially; load with
dtype=torch.bfloat16 to reproduce the bf16 early exits of spec §8.2.

Initial state: `init_state(ctx, generator=None, h0=None)` returns the embeddings (the official
h_0), or a copy of `h0` when given; `generator` is accepted and unused (nothing is random).
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
from loopdyn.models.kernels import causal_sdpa
from loopdyn.models.layers import Linear, RMSNorm
from loopdyn.models.looped import LMOutput, StateTap
from loopdyn.models.precision import low_precision_matmul
from loopdyn.models.protocol import Sublayer, config_field
from loopdyn.models.sizes import count_params
from loopdyn.models.weights import build_on_meta, fill, nonfinite_parameters

EXIT_MODES = ("last", "threshold", "weighted")


@dataclass(frozen=True)
class OuroConfig:
    """The fields of an OuroConfig that the forward pass uses (defaults = Ouro-1.4B)."""

    name: str = "ouro-1.4b"
    vocab_size: int = 49152
    hidden_size: int = 2048  # d
    intermediate_size: int = 5632  # I
    num_hidden_layers: int = 24  # L, layers in the looped stack
    num_attention_heads: int = 16  # H
    num_key_value_heads: int = 16  # KV (grouped when < H)
    head_dim: int = 128  # hd
    max_position_embeddings: int = 65536
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    total_ut_steps: int = 4  # T, loops
    early_exit_threshold: float | None = 1.0
    early_exit_step: int | None = None

    def __post_init__(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ConfigError(f"Ouro config '{self.name}': {msg}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"{f.name} must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
             f"{self.num_key_value_heads}")
        need(self.head_dim % 2 == 0, "head_dim must be even for RoPE")
        need(self.early_exit_step is None or 0 <= self.early_exit_step < self.total_ut_steps,
             f"early_exit_step must lie in [0, total_ut_steps = {self.total_ut_steps})")

    @classmethod
    def ouro_1_4b(cls, **overrides) -> "OuroConfig":
        """Ouro-1.4B (spec §1): 24 layers, 4 loops."""
        return cls(**overrides)

    @classmethod
    def ouro_2_6b(cls, **overrides) -> "OuroConfig":
        """Ouro-2.6B (spec §1): 48 layers (upcycled from 1.4B by layer duplication), 4 loops."""
        return cls(**{"name": "ouro-2.6b", "num_hidden_layers": 48, **overrides})

    @classmethod
    def from_json(cls, raw: dict, source: str = "config.json") -> tuple["OuroConfig", list[str]]:
        """Read an OuroConfig dict field by field; returns the config and notes."""
        r = ConfigReader(raw, source)
        d = r.int("hidden_size")
        H = r.int("num_attention_heads")
        act = r.str("hidden_act", default="silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act = {act!r}; Ouro uses 'silu'")
        if r.bool("use_sliding_window", default=False):
            raise CheckpointError(f"{source}: use_sliding_window = true is not supported (the released models "
                                  f"use full attention)")
        scaling = raw.get("rope_scaling")
        if scaling is not None and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                        == "default"):
            raise CheckpointError(f"{source}: rope_scaling = {scaling!r} is not supported (only null/default)")
        threshold = raw.get("early_exit_threshold", 1.0)
        if threshold is not None:
            threshold = r.float("early_exit_threshold", positive=False)
        step = raw.get("early_exit_step")
        if step is not None:
            step = r.int("early_exit_step", minimum=0)
        cfg = dict(
            name=str(raw.get("_name_or_path") or raw.get("name") or "ouro"), vocab_size=r.int("vocab_size"),
            hidden_size=d, intermediate_size=r.int("intermediate_size"), num_hidden_layers=r.int("num_hidden_layers"),
            num_attention_heads=H, num_key_value_heads=r.int("num_key_value_heads", default=H),
            head_dim=r.int("head_dim", default=d // H if d % H == 0 else 0),
            max_position_embeddings=r.int("max_position_embeddings", default=32768),
            rope_theta=r.float("rope_theta"), rms_norm_eps=r.float("rms_norm_eps", positive=False),
            tie_word_embeddings=r.bool("tie_word_embeddings", default=False),
            total_ut_steps=r.int("total_ut_steps"), early_exit_threshold=threshold, early_exit_step=step,
        )
        r.dtype()
        try:
            return cls(**cfg), []
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OuroContext:
    idx: torch.Tensor  # (B, S) token ids
    e: torch.Tensor  # (B, S, d) embeddings = the official h_0
    cos: torch.Tensor  # (S, hd) float32
    sin: torch.Tensor  # (S, hd) float32


def rope_cos_sin(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-split RoPE tables (S, hd) in float32: angle_{p,i} = p·θ^(−2i/hd), frequencies duplicated
    across the two halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angle = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class OuroAttention(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        d, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, hd
        self.q_proj = Linear(d, H * hd, bias=False)
        self.k_proj = Linear(d, KV * hd, bias=False)
        self.v_proj = Linear(d, KV * hd, bias=False)
        self.o_proj = Linear(H * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the rotation runs in the activation dtype
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:  # each KV head serves H/KV consecutive query heads
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scale = 1.0 / math.sqrt(self.head_dim)
        if x.dtype == torch.float32:
            y = causal_sdpa(q, k, v, scale)  # (B, H, S, hd); eager differs by ~1e-7 relative
        else:  # the official eager path: softmax in float32, cast back (SDPA differs by ~1e-2 in bf16)
            scores = low_precision_matmul(q, k.transpose(-1, -2)) * scale
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            y = low_precision_matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class OuroMLP(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        d, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, I, bias=False)
        self.up_proj = Linear(d, I, bias=False)
        self.down_proj = Linear(I, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OuroLayer(nn.Module):
    """h ← h + N_in2(Attn(N_in(h)));  h ← h + N_post2(MLP(N_post(h))) (norm names as in the checkpoint)."""

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = OuroAttention(cfg)
        self.mlp = OuroMLP(cfg)
        self.input_layernorm = RMSNorm(d, eps)
        self.input_layernorm_2 = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm_2 = RMSNorm(d, eps)

    def attn_branch(self, h, cos, sin):
        return self.input_layernorm_2(self.self_attn(self.input_layernorm(h), cos, sin))

    def mlp_branch(self, h):
        return self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn_branch(h, cos, sin)
        return h + self.mlp_branch(h)


class OuroModelBody(nn.Module):
    """The official `model.*` submodule: embeddings, layers, final norm, exit gate."""

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.embed_tokens = make_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(OuroLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.early_exit_gate = Linear(cfg.hidden_size, 1, bias=True)


class OuroLM(nn.Module):
    """Ouro with the LoopedModel protocol (module docstring). Parameter names equal the
    official state-dict keys."""

    state_norm_kind = "post"  # model.norm inside the loop: every h_t (t ≥ 1) is RMS-normalised
    injection_name = "none (autonomous)"

    def __init__(self, config: OuroConfig):
        super().__init__()
        self.config = cfg = config
        self.model = OuroModelBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.state_tap = StateTap()

    # ---- the LoopedModel protocol ------------------------------------------------------------
    mean_loops = config_field("total_ut_steps", "the trained depth (OuroConfig.total_ut_steps)")
    checkpoint_format = "ouro"  # report label (also in checkpoint_info.format once loaded)
    name = config_field("name")
    vocab_size = config_field("vocab_size")
    max_seq_len = config_field("max_position_embeddings")

    def encode(self, idx: torch.Tensor) -> OuroContext:
        check_tokens(idx, self.config.vocab_size, self.config.max_position_embeddings)
        cos, sin = rope_cos_sin(idx.shape[1], self.config.head_dim, self.config.rope_theta)
        return OuroContext(idx=idx, e=self.model.embed_tokens(idx), cos=cos.to(idx.device), sin=sin.to(idx.device))

    def init_state(self, ctx: OuroContext, generator: torch.Generator | None = None,
                   h0: torch.Tensor | None = None) -> torch.Tensor:
        """h_0 = the embeddings (official), or a copy of `h0`; nothing is random."""
        if h0 is not None:
            return self.state_tap(check_h0(h0, ctx.e.shape, ctx.e))
        return self.state_tap(ctx.e)

    def pre_norm_state(self, h: torch.Tensor, ctx: OuroContext) -> torch.Tensor:
        """Stack(h): the L layers, before the in-loop final norm."""
        for layer in self.model.layers:
            h = layer(h, ctx.cos, ctx.sin)
        return h

    def renormalise(self, r: torch.Tensor, ctx: OuroContext) -> torch.Tensor:
        """N_final(r), the in-loop final norm: step = renormalise ∘ pre_norm_state."""
        return self.state_tap(self.model.norm(r))

    def step(self, h: torch.Tensor, ctx: OuroContext) -> torch.Tensor:
        """h_{t+1} = N_final(Stack(h_t))."""
        return self.renormalise(self.pre_norm_state(h, ctx), ctx)

    def decode(self, h: torch.Tensor, ctx: OuroContext) -> torch.Tensor:
        """lm_head(h) in the model dtype, returned as float32 (B, S, V)."""
        return self.lm_head(h).float()

    def exit_gate(self, h: torch.Tensor, ctx: OuroContext | None = None) -> torch.Tensor:
        """λ(h) = σ(w_gᵀ h + b_g), the per-token probability of exiting at state h, (B, S) in the
        model dtype."""
        return torch.sigmoid(self.model.early_exit_gate(h)).squeeze(-1)

    def sublayers(self, ctx: OuroContext) -> list[Sublayer]:
        """Per layer its attention and MLP branches ("residual"), then the final norm ("map")."""
        out = []
        for i, layer in enumerate(self.model.layers):
            out.append(Sublayer(f"layers.{i}.attn", lambda h, lay=layer: lay.attn_branch(h, ctx.cos, ctx.sin),
                                "residual"))
            out.append(Sublayer(f"layers.{i}.mlp", layer.mlp_branch, "residual"))
        out.append(Sublayer("norm", self.model.norm, "map"))
        return out

    # ---- exits ---------------------------------------------------------------------------------
    def exit_distribution(self, states: list[torch.Tensor], ctx: OuroContext | None = None) -> torch.Tensor:
        """p (T, B, S) over the loops that produced `states` = [h_1 … h_T] (spec §3.5), in the
        model dtype: p_t = λ_t ∏_{j<t}(1 − λ_j), the remainder on the last loop."""
        lam = [self.exit_gate(h, ctx) for h in states]
        remaining = torch.ones_like(lam[0])
        probs = []
        for t, l in enumerate(lam):
            if t < len(lam) - 1:
                probs.append(l * remaining)
                remaining = remaining * (1 - l)
            else:
                probs.append(remaining)
        return torch.stack(probs)

    @staticmethod
    def threshold_exit(p: torch.Tensor, threshold: float) -> torch.Tensor:
        """Per token the first loop index t (0-based, h_{t+1}) whose cumulative exit probability
        reaches `threshold`, else the last: (B, S) int64."""
        reached = torch.cumsum(p, dim=0) >= threshold
        T = p.shape[0]
        first = torch.where(reached.any(0), reached.float().argmax(0), torch.full_like(reached[0], T - 1,
                                                                                        dtype=torch.long))
        return first.long()

    # ---- running the loop ------------------------------------------------------------------------
    def unroll(self, idx: torch.Tensor, n_loops: int | None = None, h0: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], OuroContext]:
        """All states h_0 … h_T (T = n_loops, default total_ut_steps) and the context."""
        T = self.mean_loops if n_loops is None else check_loops(n_loops)
        ctx = self.encode(idx)
        states = [self.init_state(ctx, h0=h0)]
        for _ in range(T):
            states.append(self.step(states[-1], ctx))
        return states, ctx

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None,
                h0: torch.Tensor | None = None, exit: str = "last", threshold: float | None = None,
                generator: torch.Generator | None = None) -> LMOutput:
        """Logits after n_loops loops (default total_ut_steps) under the `exit` rule (module
        docstring). `targets` are already shifted (loss = mean cross-entropy, ignore_index −100)."""
        if exit not in EXIT_MODES:
            raise InputError(f"exit must be one of {EXIT_MODES}, got {exit!r}")
        states, ctx = self.unroll(idx, n_loops, h0=h0)
        T = len(states) - 1
        loops = torch.full(idx.shape, T, dtype=torch.long, device=idx.device)
        if exit == "last" or T == 0:
            logits = self.decode(states[-1], ctx)
        else:
            p = self.exit_distribution(states[1:], ctx)  # (T, B, S)
            if exit == "weighted":
                logits = sum(p[t].unsqueeze(-1) * self.lm_head(states[t + 1]) for t in range(T)).float()
            else:
                thr = self.config.early_exit_threshold if threshold is None else threshold
                if thr is None:
                    raise InputError("exit='threshold' needs a threshold: the config's early_exit_threshold is null")
                chosen = self.threshold_exit(p, thr)  # (B, S)
                stacked = torch.stack(states[1:])  # (T, B, S, d)
                h = stacked.gather(0, chosen[None, :, :, None].expand(1, *stacked.shape[1:]))[0]
                logits = self.decode(h, ctx)
                loops = chosen + 1
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, state=states[-1], prev_state=states[max(T - 1, 0)],
                        n_loops=loops)

    def num_params(self) -> int:
        """Unique parameters (a tied head counted once)."""
        return count_params(self.parameters())


# ---- the official key layout ----------------------------------------------------------------------

def official_shapes(cfg: OuroConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({required key: shape}, {optional key: shape}) of an OuroForCausalLM state dict (§2)."""
    d, H, KV, hd, I, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    req = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        req.update({f"{p}.self_attn.q_proj.weight": (H * hd, d), f"{p}.self_attn.k_proj.weight": (KV * hd, d),
                    f"{p}.self_attn.v_proj.weight": (KV * hd, d), f"{p}.self_attn.o_proj.weight": (d, H * hd),
                    f"{p}.mlp.gate_proj.weight": (I, d), f"{p}.mlp.up_proj.weight": (I, d),
                    f"{p}.mlp.down_proj.weight": (d, I)})
        for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            req[f"{p}.{n}.weight"] = (d,)
    req.update({"model.norm.weight": (d,), "model.early_exit_gate.weight": (1, d), "model.early_exit_gate.bias": (1,)})
    opt = {"model.rotary_emb.inv_freq": (hd // 2,)}
    (opt if cfg.tie_word_embeddings else req)["lm_head.weight"] = (V, d)
    return req, opt


def from_official(directory: Path, raw: dict, dtype: torch.dtype | None = None) -> OuroLM:
    """An OuroLM from an OuroForCausalLM folder, computing in `dtype` (default float32)."""
    from loopdyn.models.checkpoint import CheckpointInfo

    config_path = directory / "config.json"
    cfg, notes = OuroConfig.from_json(raw, str(config_path))
    state, source = read_weights(directory)
    if any(k.startswith("transformer.") for k in state):
        raise CheckpointError(f"{source}: weights are in the Raven/Parcae layout (transformer.*) but "
                              f"{config_path.name} is an Ouro config: mixed formats")
    check_layer_count(state, "model.layers", cfg.num_hidden_layers, "num_hidden_layers", source)
    required, optional = official_shapes(cfg)
    check_weights(state, required, optional, source)
    if cfg.tie_word_embeddings and "lm_head.weight" in state and not torch.equal(
            state["lm_head.weight"].load(), state["model.embed_tokens.weight"].load()):
        raise CheckpointError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                              f"model.embed_tokens.weight")
    compute = dtype or torch.float32
    state.pop("model.rotary_emb.inv_freq", None)  # a non-persistent buffer, recomputed
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    notes += stored_dtype_note(state, compute)
    model = build_on_meta(lambda: OuroLM(cfg))
    fill(model, state, compute, source)  # one tensor at a time, cast as it is read
    model.checkpoint_info = CheckpointInfo(str(directory), "ouro", source, nonfinite_parameters(model), notes)
    return model
