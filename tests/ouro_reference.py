"""Independent reference for the official Ouro (``OuroForCausalLM``) checkpoint format and forward.

Written only from ``/work/shared/reference/ouro-checkpoint-format.md`` ("the spec"; § numbers
refer to it). It imports nothing from loopdyn: it is the ground truth our importer is tested
against for float32 parity, so it follows the spec literally.

* :func:`ouro_config` -- a ``config.json`` dict as ``OuroConfig.save_pretrained`` writes it (§1);
* :func:`state_dict_shapes` / :func:`parameter_count` -- the §2 key set, no allocation;
* :func:`random_state_dict` -- every tensor randomised (norm weights and gate bias too, §7);
* :func:`make_ouro_checkpoint` -- an official-layout folder (safetensors / sharded / bin);
* :func:`reference_forward` -- §3 from the equations: per loop t = 0..T−1 the carried state
  h_t (output of ``model.norm``), its pre-norm counterpart (input of ``model.norm``), the logits
  ``lm_head(h_t)`` (= the official ``exit_at_step=t`` logits), the gate logits g_t and
  λ_t = σ(g_t); the §3.5 exit distribution p_t for T = n_loops, the threshold exit step per
  token and its logits, and the weighted-exit (expected) logits.

Indexing: ``states[0]`` is the embedding h_emb (the input of loop 0) and ``states[t+1]`` the
state after loop t, so ``states[t+1] = F(states[t])`` with F(h) = N_final(Stack(h)) (§3.3).
``logits_per_loop[t]`` / ``gate_probs[t]`` belong to ``states[t+1]`` (loop count t+1).

Spec points resolved here:

1. ``head_dim`` is written only when given (absent → d/H, §1).
2. The exit distribution, the threshold rule and the gate run in the compute dtype, with the
   running product starting from ones (§3.5). Our cumulative sum is ``torch.cumsum`` over the
   stacked p_t; the spec warns that exit decisions at the last ulp of 1.0 may differ (§8.2).
3. Attention is the eager path (fp32 softmax, cast back); SDPA differs by ~1e-6 (§1).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from tests.hf_layout_reference import read_weights, rms_norm, write_json, write_weights

__all__ = ["ouro_config", "OURO_1_4B", "OURO_2_6B", "state_dict_shapes", "parameter_count",
           "random_state_dict", "make_ouro_checkpoint", "load_checkpoint", "reference_forward",
           "OuroOutput", "exit_distribution", "threshold_exit_step", "rope_cos_sin"]


def ouro_config(*, dtype_key: str = "torch_dtype", dtype: str = "float32",
                **overrides: Any) -> dict[str, Any]:
    """An OuroConfig ``config.json`` dict (§1), tiny by default.

    Defaults: vocab 128, d = 32, I = 48, L = 2 layers, 4 heads, 2 KV heads (GQA), head_dim
    absent (→ 8), rope_theta 1e6, max_pos 64, total_ut_steps 4, early_exit_threshold 1.0,
    untied. ``head_dim=k`` writes the key (heads of width k, §1).
    """
    cfg: dict[str, Any] = {
        "architectures": ["OuroForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                     "AutoModel": "modeling_ouro.OuroModel",
                     "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "layer_types": None,
        "max_position_embeddings": 64,
        "max_window_layers": 28,
        "model_type": "ouro",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "transformers_version": "4.56.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 128,
    }
    head_dim = overrides.pop("head_dim", None)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise KeyError(f"unknown OuroConfig keys {sorted(unknown)}")
    cfg.update(overrides)
    if cfg["layer_types"] is None:
        cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    cfg[dtype_key] = dtype
    return dict(sorted(cfg.items()))  # save_pretrained writes sorted keys


#: published sizes (§1, §2) for meta-device parameter counts
OURO_1_4B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                 max_position_embeddings=65536, rope_theta=1000000.0, total_ut_steps=4)
OURO_2_6B = dict(OURO_1_4B, num_hidden_layers=48)


@dataclass(frozen=True)
class _Dims:
    d: int
    H: int
    KV: int
    hd: int
    I: int
    V: int
    L: int
    eps: float
    theta: float
    tied: bool


def _dims(cfg: Mapping[str, Any]) -> _Dims:
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    return _Dims(d=d, H=H, KV=cfg.get("num_key_value_heads") or H, hd=cfg.get("head_dim") or d // H,
                 I=cfg["intermediate_size"], V=cfg["vocab_size"], L=cfg["num_hidden_layers"],
                 eps=cfg.get("rms_norm_eps", 1e-6), theta=cfg.get("rope_theta", 10000.0),
                 tied=bool(cfg.get("tie_word_embeddings", False)))


def state_dict_shapes(cfg: Mapping[str, Any], *, in_file: bool = True
                      ) -> "OrderedDict[str, tuple[int, ...]]":
    """§2 keys and shapes (``lm_head.weight`` absent from the file only when tied)."""
    D = _dims(cfg)
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    out["model.embed_tokens.weight"] = (D.V, D.d)
    for i in range(D.L):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (D.H * D.hd, D.d)
        out[p + "self_attn.k_proj.weight"] = (D.KV * D.hd, D.d)
        out[p + "self_attn.v_proj.weight"] = (D.KV * D.hd, D.d)
        out[p + "self_attn.o_proj.weight"] = (D.d, D.H * D.hd)
        out[p + "mlp.gate_proj.weight"] = (D.I, D.d)
        out[p + "mlp.up_proj.weight"] = (D.I, D.d)
        out[p + "mlp.down_proj.weight"] = (D.d, D.I)
        out[p + "input_layernorm.weight"] = (D.d,)
        out[p + "input_layernorm_2.weight"] = (D.d,)
        out[p + "post_attention_layernorm.weight"] = (D.d,)
        out[p + "post_attention_layernorm_2.weight"] = (D.d,)
    out["model.norm.weight"] = (D.d,)
    out["model.early_exit_gate.weight"] = (1, D.d)
    out["model.early_exit_gate.bias"] = (1,)
    if not (D.tied and in_file):
        out["lm_head.weight"] = (D.V, D.d)
    return out


def parameter_count(cfg: Mapping[str, Any]) -> int:
    return sum(math.prod(s) for s in state_dict_shapes(cfg, in_file=True).values())


def random_state_dict(cfg: Mapping[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      weight_scale: float = 1.0, gate_scale: float = 1.0,
                      gate_bias: float | None = None) -> dict[str, Tensor]:
    """Every §2 tensor randomised: linears N(0, scale²/fan_in), norm weights U(0.5, 1.5),
    embeddings N(0, 1), gate weight N(0, gate_scale²/d) (so g_t ~ gate_scale·O(1) on
    RMS-normalised states), gate bias N(0, 1) or the given constant."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in state_dict_shapes(cfg, in_file=True).items():
        if key.endswith("norm.weight") or "layernorm" in key:
            t = 0.5 + torch.rand(shape, generator=g)
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.randn(shape, generator=g)
        elif key == "model.early_exit_gate.weight":
            t = torch.randn(shape, generator=g) * (gate_scale / math.sqrt(shape[1]))
        elif key == "model.early_exit_gate.bias":
            t = torch.randn(shape, generator=g) if gate_bias is None else torch.full(shape, float(gate_bias))
        else:
            t = torch.randn(shape, generator=g) * (weight_scale / math.sqrt(shape[1]))
        out[key] = t.to(dtype)
    return out


def make_ouro_checkpoint(directory: str | os.PathLike, *, seed: int = 0,
                         dtype: torch.dtype = torch.float32, layout: str = "safetensors",
                         weight_scale: float = 1.0, gate_scale: float = 1.0,
                         gate_bias: float | None = None, dtype_key: str = "torch_dtype",
                         n_shards: int = 2, **config_overrides: Any) -> Path:
    """Write an official-layout Ouro folder: ``config.json``, ``generation_config.json`` and the
    weights in ``layout`` (see ``tests.hf_layout_reference.LAYOUTS``). Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = ouro_config(dtype_key=dtype_key, dtype=str(dtype).replace("torch.", ""), **config_overrides)
    sd = random_state_dict(cfg, seed=seed, dtype=dtype, weight_scale=weight_scale,
                           gate_scale=gate_scale, gate_bias=gate_bias)
    write_json(directory / "config.json", cfg)
    write_json(directory / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0,
                                                      "transformers_version": "4.56.2"})
    write_weights(directory, sd, layout, n_shards=n_shards)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    import json

    directory = Path(directory)
    return json.loads((directory / "config.json").read_text()), read_weights(directory)


# ---------------------------------------------------------------------------------------------
# §3 forward pass
# ---------------------------------------------------------------------------------------------

def rope_cos_sin(cfg: Mapping[str, Any], L: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """§4: inv_freq_i = θ^(−2i/hd); angles duplicated across the two halves; computed in
    float32 and cast to the activation dtype. Shapes (L, hd)."""
    D = _dims(cfg)
    inv = 1.0 / (D.theta ** (torch.arange(0, D.hd, 2, dtype=torch.float32) / D.hd))
    ang = torch.arange(L, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _attention(x: Tensor, W, p: str, D: _Dims, cos: Tensor, sin: Tensor) -> Tensor:
    B, L, _ = x.shape
    q = F.linear(x, W[p + "q_proj.weight"]).view(B, L, D.H, D.hd).transpose(1, 2)
    k = F.linear(x, W[p + "k_proj.weight"]).view(B, L, D.KV, D.hd).transpose(1, 2)
    v = F.linear(x, W[p + "v_proj.weight"]).view(B, L, D.KV, D.hd).transpose(1, 2)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # half-split
    rep = D.H // D.KV
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # GQA
    scores = (q @ k.transpose(-1, -2)) * D.hd ** -0.5
    mask = torch.full((L, L), float("-inf"), dtype=scores.dtype).triu(1)
    att = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)
    y = (att @ v).transpose(1, 2).reshape(B, L, D.H * D.hd)
    return F.linear(y, W[p + "o_proj.weight"])


def _layer(h: Tensor, W, i: int, D: _Dims, cos, sin) -> Tensor:
    """§3.2: h ← h + N_in2(Attn(N_in h)); h ← h + N_post2(MLP(N_post h))."""
    p = f"model.layers.{i}."
    a = _attention(rms_norm(h, W[p + "input_layernorm.weight"], D.eps), W, p + "self_attn.", D, cos, sin)
    h = h + rms_norm(a, W[p + "input_layernorm_2.weight"], D.eps)
    x = rms_norm(h, W[p + "post_attention_layernorm.weight"], D.eps)
    m = F.linear(F.silu(F.linear(x, W[p + "mlp.gate_proj.weight"])) * F.linear(x, W[p + "mlp.up_proj.weight"]),
                 W[p + "mlp.down_proj.weight"])
    return h + rms_norm(m, W[p + "post_attention_layernorm_2.weight"], D.eps)


def exit_distribution(gate_probs: Tensor) -> Tensor:
    """§3.5: p_t = λ_t ∏_{j<t}(1 − λ_j) for t < T−1 and p_{T−1} = ∏_{j<T−1}(1 − λ_j), over
    the leading axis (T, …), in the dtype of ``gate_probs``; the product starts from ones."""
    T = gate_probs.shape[0]
    remaining = torch.ones_like(gate_probs[0])
    out = []
    for t in range(T):
        if t < T - 1:
            out.append(gate_probs[t] * remaining)
            remaining = remaining * (1 - gate_probs[t])
        else:
            out.append(remaining)
    return torch.stack(out)


def threshold_exit_step(p: Tensor, threshold: float) -> Tensor:
    """§3.5 rule 2: per token the first t with cumsum_t(p) ≥ threshold, else T−1."""
    T = p.shape[0]
    hit = torch.cumsum(p, dim=0) >= threshold
    first = torch.where(hit.any(0), hit.float().argmax(0), torch.full_like(hit[0], T - 1, dtype=torch.long))
    return first.long()


@dataclass
class OuroOutput:
    states: list[Tensor]  # h_emb, h_1 … h_T (each (B, L, d)); h_t = model.norm output of loop t−1
    pre_norm_states: list[Tensor]  # input of model.norm at loops 0 … T−1
    logits_per_loop: list[Tensor]  # lm_head(h_{t+1}) for t = 0 … T−1 (exit_at_step = t)
    gate_logits: Tensor  # (T, B, L)
    gate_probs: Tensor  # λ_t = σ(g_t), (T, B, L)
    exit_probs: Tensor  # p_t for this T, (T, B, L)
    exit_step: Tensor  # threshold rule per token (B, L), 0-based loop index
    threshold_logits: Tensor  # default inference logits (rule 2)
    weighted_logits: Tensor  # Σ_t p_t · head(h_t) (rule 3 / training)

    @property
    def logits(self) -> Tensor:
        """Logits after all T loops (= exit_at_step T−1, what vLLM returns)."""
        return self.logits_per_loop[-1]


def reference_forward(source, idx: Tensor, n_loops: int | None = None, *,
                      threshold: float | None = None, dtype: torch.dtype = torch.float32
                      ) -> OuroOutput:
    """§3 at T = ``n_loops`` (default ``total_ut_steps``), eval mode, no cache.

    ``source``: a checkpoint folder or a ``(config, state_dict)`` pair. Weights are cast to
    ``dtype``; the exit gate and distribution run in ``dtype`` too (§3.5, §6). ``threshold``
    defaults to the config's ``early_exit_threshold`` (1.0 if absent).
    """
    if isinstance(source, (str, os.PathLike)):
        cfg, sd = load_checkpoint(source)
    else:
        cfg, sd = source
    D = _dims(cfg)
    expected = state_dict_shapes(cfg, in_file=True)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not (k == "lm_head.weight" and D.tied)]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{k}: shape {tuple(sd[k].shape)} != {shape}")
    T = cfg.get("total_ut_steps", 4) if n_loops is None else n_loops
    if T < 1:
        raise ValueError("n_loops must be ≥ 1")
    if threshold is None:
        threshold = cfg.get("early_exit_threshold", 1.0)
    W = {k: v.to(dtype) for k, v in sd.items()}
    head = W["model.embed_tokens.weight"] if D.tied else W["lm_head.weight"]
    B, L = idx.shape
    cos, sin = rope_cos_sin(cfg, L, dtype)
    h = F.embedding(idx, W["model.embed_tokens.weight"])  # §3.1: no scale
    states, pre, logits, gl = [h], [], [], []
    for _ in range(T):  # §3.3
        for i in range(D.L):
            h = _layer(h, W, i, D, cos, sin)
        pre.append(h)
        h = rms_norm(h, W["model.norm.weight"], D.eps)
        states.append(h)
        gl.append(F.linear(h, W["model.early_exit_gate.weight"], W["model.early_exit_gate.bias"])[..., 0])
        logits.append(F.linear(h, head))
    gate_logits = torch.stack(gl)
    lam = torch.sigmoid(gate_logits)
    p = exit_distribution(lam)
    step = threshold_exit_step(p, threshold)
    stacked = torch.stack(logits)  # (T, B, L, V)
    chosen = stacked.gather(0, step[None, ..., None].expand(1, B, L, stacked.shape[-1]))[0]
    weighted = (p[..., None] * stacked).sum(0)
    return OuroOutput(states=states, pre_norm_states=pre, logits_per_loop=logits,
                      gate_logits=gate_logits, gate_probs=lam, exit_probs=p, exit_step=step,
                      threshold_logits=chosen, weighted_logits=weighted)
