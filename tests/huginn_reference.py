"""Independent reference for the official Huginn-0125 ("Raven") checkpoint format and forward pass.

Written only from ``/work/shared/reference/huginn-checkpoint-format.md`` ("the spec"; § numbers
refer to it). It imports nothing from loopdyn: it is the ground truth our importer is tested
against for float32 parity, so it follows the spec literally.

* :func:`raven_config` -- a ``config.json`` dict as ``RavenConfig.save_pretrained`` writes it (§1);
* :func:`state_dict_shapes` / :func:`parameter_count` -- the §2 key set, no allocation;
* :func:`random_state_dict` -- every tensor randomised (norm weights and ``qk_bias`` too, §8);
* :func:`make_huginn_checkpoint` -- an official-layout folder (safetensors / sharded / bin);
* :func:`load_checkpoint` -- ``(config, state_dict)`` back from a folder;
* :func:`reference_forward` -- §3 from the equations: logits, per-loop states s_0..s_T, the
  pre-norm states r_1..r_T (input of the last core block's ``norm_4``), logits at every loop
  count 0..T (the coda reads only s_T, so decoding s_t is the forward at T = t);
* :func:`official_random_state` -- the §3.3 truncated-normal state draw.

Spec points resolved here:

1. ``num_key_value_heads`` is forced equal to ``n_heads`` by the config class (§1), so a
   config with a different value cannot load officially; :func:`raven_config` rejects it.
2. ``tie_word_embeddings`` is written only for an untied model, as ``false`` (§1).
3. When tied, ``lm_head.weight`` is absent from the file (§2); ``freqs_cis`` is present
   (float32) unless ``include_freqs=False``. A stored table is used as stored (§9.3).
4. ``h0=None`` means zeros (the converter's deterministic test, §3.3); the official default is
   a random draw -- use :func:`official_random_state` to reproduce it.
5. Computation follows §7's casts: RMSNorm and RoPE in float32 and cast back; logits
   ``.float()`` after the matmul in the compute dtype.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from tests.hf_layout_reference import read_weights, rms_norm, write_json, write_weights

__all__ = ["raven_config", "HUGINN_0125", "cfg_get", "state_dict_shapes", "parameter_count",
           "random_state_dict", "make_huginn_checkpoint", "load_checkpoint", "rope_table",
           "apply_rope", "reference_forward", "HuginnOutput", "official_random_state"]

#: the §1 aliases: class attribute ← HF name
ALIASES = {"n_embd": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers"}


def raven_config(*, spelling: str = "class", dtype_key: str = "torch_dtype",
                 dtype: str = "float32", **overrides: Any) -> dict[str, Any]:
    """A RavenConfig ``config.json`` dict (§1), tiny by default.

    Defaults: d = 32, 4 heads (hd 8), I = 48, vocab 128, block_size 32, prelude 1 / core 2 /
    coda 1, mean_recurrence 4, qk_bias true, bias false, tied. ``spelling="class"`` writes
    ``n_embd``/``n_heads``/``n_layers`` (the class attributes), ``"hf"`` the aliases
    ``hidden_size``/``num_attention_heads``/``num_hidden_layers``. ``dtype_key`` is
    ``"torch_dtype"`` or ``"dtype"`` (transformers ≥ 4.56). Derived fields (``head_dim``,
    ``num_key_value_heads``, ``padded_vocab_size``, ``n_layers``, ``effective_expected_depth``,
    ``init_values``) follow the overrides.
    """
    base = dict(n_embd=32, n_heads=4, n_layers_in_prelude=1, n_layers_in_recurrent_block=2,
                n_layers_in_coda=1, mean_recurrence=4, mean_backprop_depth=2,
                sampling_scheme="poisson-lognormal-filling", intermediate_size=48, vocab_size=128,
                padding_multiple=4096, block_size=32, rope_base=50000, norm_eps=1e-6,
                qk_bias=True, bias=False, tie_embeddings=True, injection_type="linear",
                state_init="like-init", block_class_name="SandwichBlock",
                norm_class_name="RMSNorm_llama", mlp_class_name="GatedMLP", nonlin_name="SiLU",
                init_strategy="takase", init_orthogonal=False,
                activation_checkpoint_impl="per-iteration", test_time_noise=0,
                test_time_noise_type="fixed")
    for key in list(overrides):  # accept the aliases as override names too
        for cls_name, hf_name in ALIASES.items():
            if key == hf_name:
                overrides[cls_name] = overrides.pop(key)
    kv = overrides.pop("num_key_value_heads", None)
    unknown = set(overrides) - set(base)
    if unknown:
        raise KeyError(f"unknown RavenConfig keys {sorted(unknown)}")
    base.update(overrides)
    d, H = base["n_embd"], base["n_heads"]
    if d % H:
        raise ValueError("n_embd must be divisible by n_heads")
    if kv is not None and kv != H:
        raise ValueError("RavenConfig forces num_key_value_heads = n_heads (§1); no GQA")
    P, R, C = (base[k] for k in ("n_layers_in_prelude", "n_layers_in_recurrent_block",
                                 "n_layers_in_coda"))
    cfg: dict[str, Any] = {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "model_type": "huginn_raven",
    }
    names = {k: (ALIASES[k] if spelling == "hf" and k in ALIASES else k) for k in ALIASES}
    cfg[names["n_embd"]] = d
    cfg[names["n_heads"]] = H
    cfg["num_key_value_heads"] = H
    cfg[names["n_layers"]] = P + R + C
    cfg.update({k: v for k, v in base.items() if k not in ("n_embd", "n_heads")})
    cfg["padded_vocab_size"] = base["vocab_size"]
    cfg["head_dim"] = d // H
    cfg["effective_expected_depth"] = P + C + R * base["mean_recurrence"]
    cfg["init_values"] = {"std": math.sqrt(2 / (5 * d))}
    cfg[dtype_key] = dtype
    cfg["transformers_version"] = "4.56.2"
    if not base["tie_embeddings"]:
        cfg["tie_word_embeddings"] = False
    return cfg


#: the published Huginn-0125 configuration (§1 defaults), for meta-device parameter counts
HUGINN_0125 = dict(n_embd=5280, n_heads=55, n_layers_in_prelude=2, n_layers_in_recurrent_block=4,
                   n_layers_in_coda=2, mean_recurrence=32, mean_backprop_depth=8,
                   intermediate_size=17920, vocab_size=65536, block_size=4096, rope_base=50000,
                   norm_eps=1e-6, qk_bias=True, bias=False, tie_embeddings=True)


def cfg_get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Read a config field under either spelling (§1 ``attribute_map``)."""
    if key in cfg:
        return cfg[key]
    if key in ALIASES and ALIASES[key] in cfg:
        return cfg[ALIASES[key]]
    return default


@dataclass(frozen=True)
class _Dims:
    d: int
    H: int
    hd: int
    I: int
    V: int
    S: int
    P: int
    R: int
    C: int
    eps: float
    rope_base: float
    qk_bias: bool
    bias: bool
    tied: bool


def _dims(cfg: Mapping[str, Any]) -> _Dims:
    d, H = cfg_get(cfg, "n_embd"), cfg_get(cfg, "n_heads")
    return _Dims(d=d, H=H, hd=d // H, I=cfg["intermediate_size"], V=cfg["vocab_size"],
                 S=cfg["block_size"], P=cfg["n_layers_in_prelude"],
                 R=cfg["n_layers_in_recurrent_block"], C=cfg["n_layers_in_coda"],
                 eps=cfg.get("norm_eps", 1e-6), rope_base=cfg.get("rope_base", 50000),
                 qk_bias=bool(cfg.get("qk_bias", True)), bias=bool(cfg.get("bias", False)),
                 tied=bool(cfg.get("tie_embeddings", True)))


def _block_prefixes(D: _Dims) -> dict[str, list[str]]:
    return {"prelude": [f"transformer.prelude.{i}." for i in range(D.P)],
            "core": [f"transformer.core_block.{i}." for i in range(D.R)],
            "coda": [f"transformer.coda.{i}." for i in range(D.C)]}


def state_dict_shapes(cfg: Mapping[str, Any], *, in_file: bool = True,
                      include_freqs: bool = True) -> "OrderedDict[str, tuple[int, ...]]":
    """§2 keys and shapes. ``in_file=True``: as in ``model.safetensors`` (tied head absent);
    ``False``: the module's full state dict (``lm_head.weight`` always listed)."""
    D = _dims(cfg)
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    out["transformer.wte.weight"] = (D.V, D.d)
    blocks = _block_prefixes(D)
    for p in blocks["prelude"] + blocks["core"] + blocks["coda"]:
        out[p + "norm_1.weight"] = (D.d,)
        out[p + "attn.Wqkv.weight"] = (3 * D.d, D.d)
        if D.qk_bias:
            out[p + "attn.qk_bias"] = (2, 1, D.H, D.hd)
        out[p + "attn.proj.weight"] = (D.d, D.d)
        out[p + "norm_2.weight"] = (D.d,)
        out[p + "mlp.fc.weight"] = (2 * D.I, D.d)
        out[p + "mlp.proj.weight"] = (D.d, D.I)
        out[p + "norm_3.weight"] = (D.d,)
        out[p + "norm_4.weight"] = (D.d,)
    out["transformer.adapter.weight"] = (D.d, 2 * D.d)
    if D.bias:
        out["transformer.adapter.bias"] = (D.d,)
    out["transformer.ln_f.weight"] = (D.d,)
    if not (D.tied and in_file):
        out["lm_head.weight"] = (D.V, D.d)
    if include_freqs:
        out["freqs_cis"] = (1, D.S, 1, D.hd // 2, 2)
    return out


def parameter_count(cfg: Mapping[str, Any]) -> int:
    """Unique parameters (tied head once, ``freqs_cis`` is a buffer)."""
    shapes = state_dict_shapes(cfg, in_file=True, include_freqs=False)
    return sum(math.prod(s) for s in shapes.values())


def rope_table(cfg: Mapping[str, Any]) -> Tensor:
    """§5: float32 ``(cos, sin)`` of φ = pos·base^(−2i/hd), shape ``[1, S, 1, hd/2, 2]``."""
    D = _dims(cfg)
    i = torch.arange(D.hd // 2, dtype=torch.float64)
    theta = D.rope_base ** (-2.0 * i / D.hd)
    phi = torch.arange(D.S, dtype=torch.float64)[:, None] * theta[None, :]
    table = torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1).float()
    return table[None, :, None, :, :]


def random_state_dict(cfg: Mapping[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      weight_scale: float = 1.0, include_freqs: bool = True) -> dict[str, Tensor]:
    """Every §2 tensor of the file randomised, non-trivially: linears N(0, scale²/fan_in),
    norm weights U(0.5, 1.5), ``qk_bias`` N(0, 0.5²), adapter bias N(0, 0.1²), embeddings
    N(0, 1). ``freqs_cis`` is the exact float32 table (never randomised)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for key, shape in state_dict_shapes(cfg, in_file=True, include_freqs=include_freqs).items():
        if key == "freqs_cis":
            out[key] = rope_table(cfg)
            continue
        if key.endswith("norm_1.weight") or ".norm_" in key or key.endswith("ln_f.weight"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("qk_bias"):
            t = 0.5 * torch.randn(shape, generator=g)
        elif key == "transformer.adapter.bias":
            t = 0.1 * torch.randn(shape, generator=g)
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (weight_scale / math.sqrt(shape[1]))
        out[key] = t.to(dtype)
    return out


def make_huginn_checkpoint(directory: str | os.PathLike, *, seed: int = 0,
                           dtype: torch.dtype = torch.float32, layout: str = "safetensors",
                           include_freqs: bool = True, weight_scale: float = 1.0,
                           spelling: str = "class", dtype_key: str = "torch_dtype",
                           n_shards: int = 2, **config_overrides: Any) -> Path:
    """Write an official-layout Raven folder: ``config.json``, ``generation_config.json`` and
    the weights in ``layout`` (see ``tests.hf_layout_reference.LAYOUTS``). Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dname = str(dtype).replace("torch.", "")
    cfg = raven_config(spelling=spelling, dtype_key=dtype_key, dtype=dname, **config_overrides)
    sd = random_state_dict(cfg, seed=seed, dtype=dtype, weight_scale=weight_scale,
                           include_freqs=include_freqs)
    if "freqs_cis" in sd:
        sd["freqs_cis"] = sd["freqs_cis"].float()  # a float32 model writes it in float32 (§2)
    write_json(directory / "config.json", cfg)
    write_json(directory / "generation_config.json", {"_from_model_config": True,
                                                      "transformers_version": "4.56.2"})
    write_weights(directory, sd, layout, n_shards=n_shards)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    import json

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    return cfg, read_weights(directory)


# ---------------------------------------------------------------------------------------------
# §3 forward pass
# ---------------------------------------------------------------------------------------------

def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """§5 interleaved RoPE on ``x`` (B, L, heads, hd) with ``table`` (1, L, 1, hd/2, 2):
    pairs (2i, 2i+1) = (a, b) ↦ (a cos − b sin, b cos + a sin), in float32, cast back."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = table[..., 0].float(), table[..., 1].float()
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _attention(x: Tensor, sd, p: str, D: _Dims, table: Tensor) -> Tensor:
    B, L, _ = x.shape
    qkv = F.linear(x, sd[p + "attn.Wqkv.weight"])  # (B, L, 3d): [q | k | v], head-major
    q, k, v = (t.reshape(B, L, D.H, D.hd) for t in qkv.split(D.d, dim=-1))
    if D.qk_bias:
        qkb = sd[p + "attn.qk_bias"]  # (2, 1, H, hd)
        q, k = q + qkb[0], k + qkb[1]
    q, k = apply_rope(q, table), apply_rope(k, table)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(D.hd))
    return F.linear(y.transpose(1, 2).reshape(B, L, D.d), sd[p + "attn.proj.weight"])


def _mlp(x: Tensor, sd, p: str) -> Tensor:
    g, u = F.linear(x, sd[p + "mlp.fc.weight"]).chunk(2, dim=-1)  # first I rows = gate
    return F.linear(F.silu(g) * u, sd[p + "mlp.proj.weight"])


def _sandwich(x: Tensor, sd, p: str, D: _Dims, table: Tensor, tap: list | None = None) -> Tensor:
    """§3.2: x ← N₂(x + Attn(N₁x)); x ← N₄(x + MLP(N₃x)). ``tap`` gets the input of N₄."""
    x = rms_norm(x + _attention(rms_norm(x, sd[p + "norm_1.weight"], D.eps), sd, p, D, table),
                 sd[p + "norm_2.weight"], D.eps)
    r = x + _mlp(rms_norm(x, sd[p + "norm_3.weight"], D.eps), sd, p)
    if tap is not None:
        tap.append(r)
    return rms_norm(r, sd[p + "norm_4.weight"], D.eps)


@dataclass
class HuginnOutput:
    logits: Tensor  # (B, L, V) float32 at T = n_loops
    states: list[Tensor]  # s_0 … s_T, each (B, L, d)
    pre_norm_states: list[Tensor]  # r_1 … r_T: the input of the last core block's norm_4
    logits_per_loop: list[Tensor]  # logits at loop counts 0 … T
    e: Tensor  # prelude output
    latent: Tensor  # ln_f(s_T), the official `latent_states`
    adapter_outputs: list[Tensor] = field(default_factory=list)  # u_0 … u_{T−1}


def official_random_state(shape, d: int, seed: int, init_scale: float = 1.0,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """§3.3: s₀ = √d·ξ, ξ ~ N(0, σ²) truncated at ±3σ, σ = √(2/(5d))·init_scale, drawn after
    ``torch.manual_seed(seed)`` as randn_like then an in-place truncated normal."""
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype)
    std = math.sqrt(2 / (5 * d)) * init_scale
    torch.nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std)
    return x * math.sqrt(d)


def reference_forward(source, idx: Tensor, n_loops: int, h0: Tensor | None = None, *,
                      dtype: torch.dtype = torch.float32, all_logits: bool = True) -> HuginnOutput:
    """The §3 forward pass at an explicit loop count (eval mode, no cache).

    ``source``: a checkpoint folder, or a ``(config, state_dict)`` pair. Weights are cast to
    ``dtype`` (float32 by default) and the compute follows §7's casts. ``h0``: the initial
    state (B, L, d); ``None`` = zeros. ``n_loops`` ≥ 0 (0 decodes ln_f(s₀)).
    """
    if isinstance(source, (str, os.PathLike)):
        cfg, sd = load_checkpoint(source)
    else:
        cfg, sd = source
    D = _dims(cfg)
    expected = state_dict_shapes(cfg, in_file=True, include_freqs=False)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k != "freqs_cis"
                  and not (k == "lm_head.weight" and D.tied)]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{k}: shape {tuple(sd[k].shape)} != {shape}")
    table = sd["freqs_cis"].float() if "freqs_cis" in sd else rope_table(cfg)  # §9.3
    W = {k: v.to(dtype) for k, v in sd.items() if k != "freqs_cis"}
    B, L = idx.shape
    if L > D.S:
        raise ValueError(f"sequence length {L} > block_size {D.S}")
    table = table[:, :L]
    blocks = _block_prefixes(D)

    x = F.embedding(idx, W["transformer.wte.weight"]) * math.sqrt(D.d)  # §3.1
    for p in blocks["prelude"]:
        x = _sandwich(x, W, p, D, table)
    e = x
    s = torch.zeros(B, L, D.d, dtype=dtype) if h0 is None else h0.to(dtype).clone()
    states, pre, us = [s], [], []
    Wa, ba = W["transformer.adapter.weight"], W.get("transformer.adapter.bias") if D.bias else None
    for _ in range(n_loops):  # §3.4
        u = F.linear(torch.cat([s, e], dim=-1), Wa, ba)  # state columns first
        us.append(u)
        tap: list[Tensor] = []
        for j, p in enumerate(blocks["core"]):
            u = _sandwich(u, W, p, D, table, tap if j == D.R - 1 else None)
        pre.append(tap[0])
        s = u
        states.append(s)
    head = W["transformer.wte.weight"] if D.tied else W["lm_head.weight"]

    def decode(s: Tensor) -> tuple[Tensor, Tensor]:  # §3.6
        z = rms_norm(s, W["transformer.ln_f.weight"], D.eps)
        y = z
        for p in blocks["coda"]:
            y = _sandwich(y, W, p, D, table)
        y = rms_norm(y, W["transformer.ln_f.weight"], D.eps)
        return F.linear(y, head).float(), z

    logits, latent = decode(s)
    per_loop = [decode(st)[0] for st in states[:-1]] + [logits] if all_logits else [logits]
    return HuginnOutput(logits=logits, states=states, pre_norm_states=pre,
                        logits_per_loop=per_loop, e=e, latent=latent, adapter_outputs=us)
