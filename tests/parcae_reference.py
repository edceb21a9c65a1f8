"""Independent reference for the *official* Parcae checkpoint format and forward pass.

Written only from ``/work/shared/reference/parcae-checkpoint-format.md`` (called "the spec"
below; section numbers such as §2.4 refer to it). It deliberately imports nothing from
``loopdyn`` / ``models``: it is the ground truth that our own loader is tested against for
float32 parity, so it follows the spec literally rather than our library.

Everything is plain functional PyTorch over a ``dict[str, Tensor]`` state dict:

* :func:`official_parcae_config`, :func:`official_gpt_config` -- ``config.json`` dicts (§1.1, §7);
* :func:`derived` -- derived quantities (§2);
* :func:`state_dict_shapes`, :func:`unique_parameter_count` -- the §3 key set, no allocation;
* :func:`random_official_state_dict` -- a fully randomised state dict with that key set;
* :func:`official_forward` -- float32 logits per §4 and §10;
* :func:`write_official_checkpoint` -- what ``parcae_lm.save_pretrained`` writes (§1.1).

Spec ambiguities and how they are resolved here (each is repeated where it matters):

1. ``ln_f`` and ``ln_prelude`` are always weight-only RMSNorms (§3 lists only their ``.weight``;
   §4.4/§4.7 call them RMSNorms). Only the block norms ``norm_1``/``norm_2`` follow
   ``norm_class_name`` (§3: "``norm_*.bias`` ... when norm_class_name is a torch norm with a bias").
2. Inside an attention module the §3 table order is used (``c_q, c_k, c_v, c_proj, qk_bias,
   ve_gate``), although a real ``nn.Module`` would list a directly-registered ``qk_bias``
   Parameter before its sub-modules. The spec says order does not matter for loading.
3. GPT head (§7.3): a non-empty ``use_fused_head`` builds the Triton head, whose *untied*
   weight is stored transposed, ``(d, V)``, with ``logits = y @ W``. Tied heads (the default
   and every official config) are ``y @ wte.T`` either way. Parcae with ``"pytorch"``/``"cce"``/
   ``""`` is a plain ``(V, d)`` linear; ``"full-triton"`` untied is ``(d, V)`` (§3 head variants).
4. GPT ``config.json`` keys: the common keys up to ``strategy``, then ``n_layer``,
   ``tie_embeddings``, ``model_class_name``, ``_class_name`` (§1.1 only says "the same without the
   Parcae-only keys, plus n_layer and its own tie_embeddings").
5. ``emb_scale`` (§2.5/§4.2) is applied to GPT models too; §7.3 only removes ``logit_scale``.
6. ``h0`` defaults to zeros for every ``state_init`` (§10.5 "start from h0 = 0 for parity");
   the official random inits (§4.5) are not reproduced.
7. ``mup_model_scaling_factor != 1`` is rejected: §2.2 says a saved config would have its widths
   multiplied again on reload, which cannot match the stored tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PARCAE_CONFIG_KEYS",
    "GPT_CONFIG_KEYS",
    "OFFICIAL_PARCAE_SIZES",
    "OFFICIAL_GPT_SIZES",
    "BlockSpec",
    "Derived",
    "official_parcae_config",
    "official_gpt_config",
    "derived",
    "alt",
    "state_dict_shapes",
    "unique_parameter_count",
    "rope_table",
    "random_official_state_dict",
    "official_forward",
    "inject",
    "write_official_checkpoint",
    "rms_norm",
    "apply_rope",
]

# ---------------------------------------------------------------------------------------------
# §1.1 config.json
# ---------------------------------------------------------------------------------------------

#: ParcaeConfig ``config.json`` keys, in the order §1.1 lists them.
PARCAE_CONFIG_KEYS: tuple[str, ...] = (
    "name", "hf_config", "block_size", "n_embd", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "padding_multiple", "padded_vocab_size",
    "rope_settings", "use_abacus", "randomize_positions_from", "block_class_name",
    "norm_class_name", "attn_impl", "norm_eps", "mlp_class_name", "nonlin_name", "bias",
    "qk_bias", "init_strategy", "init_orthogonal", "skip_initialization",
    "mup_model_scaling_factor", "use_fused_head", "debias_attention", "center_attention",
    "clip_qkv", "qk_norm", "logit_softcap", "activation_checkpoint_impl", "simple_ops",
    "strategy", "injection_type", "n_layers_in_recurrent_block", "n_layers_in_prelude",
    "n_layers_in_coda", "state_init", "recurrent_embedding_dimension",
    "recurrent_intermediation_embedding_dimension", "recurrent_num_attention_heads",
    "prelude_norm", "sampling_scheme", "mean_recurrence", "mean_backprop_depth", "lockstep_n",
    "lockstep_k", "curriculum_target", "recurrent_iteration_method", "tie_embeddings",
    "model_class_name", "_is_recurrent_block_config", "_class_name",
)

_COMMON_KEYS = PARCAE_CONFIG_KEYS[: PARCAE_CONFIG_KEYS.index("strategy") + 1]

#: GPTConfig keys (§1.1: Parcae keys without the Parcae-only ones, plus ``n_layer`` and its own
#: ``tie_embeddings``). Placement of the GPT-only fields is our resolution (module docstring, 4).
GPT_CONFIG_KEYS: tuple[str, ...] = _COMMON_KEYS + (
    "n_layer", "tie_embeddings", "model_class_name", "_class_name",
)

#: §7.2 sizes of the four official Parcae configs (use as ``official_parcae_config(**sizes)``).
OFFICIAL_PARCAE_SIZES: dict[str, dict[str, int]] = {
    name: dict(
        n_embd=d, num_attention_heads=h, num_key_value_heads=h, intermediate_size=4 * d,
        n_layers_in_prelude=n, n_layers_in_recurrent_block=n, n_layers_in_coda=n,
        block_size=2048, vocab_size=32768, padding_multiple=64, mean_recurrence=8,
        mean_backprop_depth=4,
    )
    for name, d, h, n in (
        ("parcae-small-140m", 768, 6, 2),
        ("parcae-medium-370m", 1024, 8, 4),
        ("parcae-large-770m", 1280, 10, 6),
        ("parcae-xlarge-1_3b", 1536, 12, 8),
    )
}

#: §7.2 sizes of the GPT baselines.
OFFICIAL_GPT_SIZES: dict[str, dict[str, int]] = {
    name: dict(
        n_embd=d, num_attention_heads=h, num_key_value_heads=h, intermediate_size=4 * d,
        n_layer=n, block_size=2048, vocab_size=32768, padding_multiple=64,
    )
    for name, d, h, n in (
        ("gpt-small-140m", 768, 6, 6),
        ("gpt-medium-380m", 1024, 8, 12),
        ("gpt-large-770m", 1280, 10, 18),
        ("gpt-xlarge-1_3b", 1536, 12, 24),
    )
}

_NESTED_KEYS = ("rope_settings", "hf_config")


def _padded_vocab(vocab_size: int, padding_multiple: int) -> int:
    """§2.1: smallest multiple of ``padding_multiple`` that is at least ``vocab_size``."""
    return -(-vocab_size // padding_multiple) * padding_multiple


def _common_defaults(name: str) -> dict[str, Any]:
    """Values shared by Parcae and GPT configs (§7.1 official values, small sizes)."""
    return {
        "name": name,
        "hf_config": {"org": "SandyResearch", "name": name},
        "block_size": 64,
        "n_embd": 64,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 96,
        "padding_multiple": 64,
        "padded_vocab_size": None,  # filled in from vocab_size / padding_multiple (§2.1)
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
        "use_abacus": False,
        "randomize_positions_from": None,
        "block_class_name": "TransformerPreNormBlock",
        "norm_class_name": "RMSNorm",
        "attn_impl": "sdpa",
        "norm_eps": 1e-5,
        "mlp_class_name": "BaseMLP",
        "nonlin_name": "ReLU2",
        "bias": False,
        "qk_bias": False,
        "init_strategy": "scaled-zero",
        "init_orthogonal": True,
        "skip_initialization": False,
        "mup_model_scaling_factor": 1,
        "use_fused_head": "pytorch",
        "debias_attention": False,
        "center_attention": False,
        "clip_qkv": None,
        "qk_norm": True,
        "logit_softcap": None,
        "activation_checkpoint_impl": "per-block",
        "simple_ops": False,
        "strategy": "auto",
    }


def _apply_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any], keys: tuple[str, ...]):
    unknown = set(overrides) - set(keys)
    if unknown:
        raise KeyError(f"unknown config keys {sorted(unknown)}; add them to the dict afterwards")
    for key, value in overrides.items():
        if key in _NESTED_KEYS and isinstance(value, Mapping):
            cfg[key] = {**cfg[key], **value}  # nested override merges (e.g. rope_base only)
        else:
            cfg[key] = value
    if "padded_vocab_size" not in overrides:
        cfg["padded_vocab_size"] = _padded_vocab(cfg["vocab_size"], cfg["padding_multiple"])
    if not (isinstance(overrides.get("hf_config"), Mapping) and "name" in overrides["hf_config"]):
        cfg["hf_config"] = {**cfg["hf_config"], "name": cfg["name"]}


def official_parcae_config(**overrides: Any) -> dict[str, Any]:
    """A complete ParcaeConfig ``config.json`` dict (§1.1 key order, §7.1 values, small sizes).

    Defaults: d=64, H=Hkv=4, I=256, vocab 96 padded to 128, block 64, layers 2/2/2, mr=4,
    mbd=2, ``ds = d``, ``Is = 4d``, diagonal injection, ``state_init "zero"`` (deterministic,
    §4.5), tied head. ``overrides`` replace keys; ``rope_settings``/``hf_config`` given as dicts
    are merged into the defaults. ``padded_vocab_size`` and the recurrent widths follow
    ``vocab_size``/``n_embd`` unless overridden explicitly.
    """
    cfg = _common_defaults("parcae-test")
    cfg.update({
        "injection_type": "diagonal",
        "n_layers_in_recurrent_block": 2,
        "n_layers_in_prelude": 2,
        "n_layers_in_coda": 2,
        "state_init": "zero",
        "recurrent_embedding_dimension": None,
        "recurrent_intermediation_embedding_dimension": None,
        "recurrent_num_attention_heads": None,
        "prelude_norm": True,
        "sampling_scheme": "poisson-truncated-full",
        "mean_recurrence": 4,
        "mean_backprop_depth": 2,
        "lockstep_n": False,
        "lockstep_k": False,
        "curriculum_target": "forward",
        "recurrent_iteration_method": "per-sequence",
        "tie_embeddings": True,
        "model_class_name": "Parcae",
        "_is_recurrent_block_config": False,
        "_class_name": "ParcaeConfig",
    })
    _apply_overrides(cfg, overrides, PARCAE_CONFIG_KEYS)
    if "recurrent_embedding_dimension" not in overrides:
        cfg["recurrent_embedding_dimension"] = cfg["n_embd"]
    if "recurrent_intermediation_embedding_dimension" not in overrides:
        cfg["recurrent_intermediation_embedding_dimension"] = 4 * cfg["n_embd"]
    assert tuple(cfg) == PARCAE_CONFIG_KEYS
    return cfg


def official_gpt_config(**overrides: Any) -> dict[str, Any]:
    """A complete GPTConfig ``config.json`` dict (§1.1, §7.2, §7.3), small sizes, ``n_layer=4``.

    ``use_fused_head`` defaults to ``"pytorch"`` (the dataclass default). With the default tied
    head the logits are ``y @ wte.T`` (a plain linear head); see module docstring item 3 for
    the untied case.
    """
    cfg = _common_defaults("gpt-test")
    cfg.update({
        "n_layer": 4,
        "tie_embeddings": True,
        "model_class_name": "GPT",
        "_class_name": "GPTConfig",
    })
    _apply_overrides(cfg, overrides, GPT_CONFIG_KEYS)
    assert tuple(cfg) == GPT_CONFIG_KEYS
    return cfg


# ---------------------------------------------------------------------------------------------
# §2 Derived quantities
# ---------------------------------------------------------------------------------------------


def alt(i: int, n: int) -> bool:
    """§2.4: ``alt(i, n) := (i mod 2) == ((n - 1) mod 2)`` -- every other index, incl. n-1."""
    return (i % 2) == ((n - 1) % 2)


@dataclass(frozen=True)
class BlockSpec:
    """One attention block (§3 per-block group, §2.4 ids)."""

    prefix: str  # e.g. "transformer.core_block.1."
    stage: str  # "prelude" | "core_block" | "coda" | "h"
    index: int
    width: int  # w
    heads: int  # h
    kv_heads: int  # hk
    head_size: int  # w / h
    mlp_width: int  # m
    layer_id: int
    table_key: int  # value-embedding table this block would use
    has_table: bool
    has_gate: bool

    @property
    def live(self) -> bool:
        """§2.4: a value embedding is applied only when both the table and the gate exist."""
        return self.has_table and self.has_gate


@dataclass(frozen=True)
class Derived:
    """Derived quantities of §2 (symbols as in the spec's notation table)."""

    is_parcae: bool
    V: int
    d: int
    H: int
    Hkv: int
    hd: int
    I: int
    ds: int
    Is: int
    Hs: int
    hds: int
    P: int
    R: int
    Cn: int
    N: int  # number of distinct blocks (Parcae) / n_layer (GPT)
    L: int  # R * mbd (Parcae) / n_layer (GPT): the gate parity length
    mr: int
    mbd: int
    Tmax: int
    value_embed_keys: tuple[int, ...]
    gate_layer_ids: tuple[int, ...]
    blocks: tuple[BlockSpec, ...]
    emb_scale: float
    logit_scale: float
    norm_class_name: str
    bias: bool
    tie_embeddings: bool
    head_transposed: bool  # untied Triton head stored as (d, V) (§3, §7.3)


_LOGIT_SCALE_INV_SQRT_D = {
    "llama-by-dim-ls", "noci-anagnostidis", "shaped", "deep-scale-simple", "deep-scale-full",
    "scaled-and-logit-scale",
}


def _scales(init_strategy: str, d: int, mup: float) -> tuple[float, float]:
    """§2.5: ``(emb_scale, logit_scale)`` from ``init_strategy``; logit_scale / mup."""
    if init_strategy == "takase":
        emb, logit = math.sqrt(d), 1.0
    elif init_strategy == "takase-scaled":
        emb, logit = math.sqrt(d), math.sqrt(2 / 5) / math.sqrt(d)
    elif init_strategy in _LOGIT_SCALE_INV_SQRT_D:
        emb, logit = 1.0, 1 / math.sqrt(d)
    else:  # includes the official "scaled-zero" and the default "scaled"
        emb, logit = 1.0, 1.0
    return emb, logit / mup


def _is_parcae(config: Mapping[str, Any]) -> bool:
    """§1.2 picks the class from ``_class_name``; when it is absent we follow the spec's
    importer advice and infer Parcae from the presence of ``injection_type``."""
    if "_class_name" in config:
        return config["_class_name"] == "ParcaeConfig"
    return "injection_type" in config


def derived(config: Mapping[str, Any]) -> Derived:
    """Compute the §2 derived quantities, block layer ids and value-embedding wiring (§2.4)."""
    parcae = _is_parcae(config)
    mup = config.get("mup_model_scaling_factor", 1)
    if mup != 1:
        raise ValueError("mup_model_scaling_factor != 1 is not supported (§2.2 round-trip)")
    if "gemma" in str(config.get("name", "")).lower():
        raise ValueError("official code fails on a 'Gemma' name with RMSNorm (§9)")

    V = config.get("padded_vocab_size")
    if V is None:
        V = _padded_vocab(config["vocab_size"], config["padding_multiple"])  # §2.1
    d = config["n_embd"]
    H = config["num_attention_heads"]
    Hkv = config.get("num_key_value_heads") or H  # §2.2 null -> H
    if d % H:
        raise ValueError("n_embd must be divisible by num_attention_heads")
    hd = d // H
    I = config.get("intermediate_size") or 4 * d
    Tmax = config.get("randomize_positions_from") or config["block_size"]
    emb_scale, logit_scale = _scales(config["init_strategy"], d, mup)
    norm = "RMSNorm" if config.get("simple_ops") else config["norm_class_name"]  # §1.3
    bias = bool(config["bias"])
    tie = bool(config["tie_embeddings"])
    fused = config.get("use_fused_head") or ""

    def block(stage, idx, w, h, hk, m, layer_id, table_key, tables, L):
        return BlockSpec(
            prefix=f"transformer.{stage}.{idx}.", stage=stage, index=idx, width=w, heads=h,
            kv_heads=hk, head_size=w // h, mlp_width=m, layer_id=layer_id,
            table_key=table_key, has_table=table_key in tables, has_gate=alt(layer_id, L),
        )

    if parcae:
        ds = config.get("recurrent_embedding_dimension") or d
        Is = config.get("recurrent_intermediation_embedding_dimension") or 4 * d
        Hs = config.get("recurrent_num_attention_heads") or H
        if ds % Hs:
            raise ValueError("recurrent_embedding_dimension must be divisible by its heads")
        hds = ds // Hs
        P = config["n_layers_in_prelude"]
        R = config["n_layers_in_recurrent_block"]
        Cn = config["n_layers_in_coda"]
        mr = config["mean_recurrence"]
        mbd = config["mean_backprop_depth"]
        N = P + R + Cn
        L = R * mbd  # §2.3 the config's derived n_layer
        tables = tuple(k for k in range(N) if alt(k, N))
        blocks = (
            [block("prelude", i, d, H, Hkv, I, i, i, tables, L) for i in range(P)]
            + [block("core_block", j, ds, Hs, Hs, Is, P + j, P + j, tables, L) for j in range(R)]
            + [block("coda", i, d, H, Hkv, I, P + R * mr + i, P + R + i, tables, L)
               for i in range(Cn)]
        )
        head_transposed = (not tie) and fused in ("full-triton", "hhe")
    else:
        n_layer = config["n_layer"]
        ds, Is, Hs, hds, P, R, Cn, mr, mbd = d, I, H, hd, 0, 0, 0, 0, 0
        N = L = n_layer
        tables = tuple(k for k in range(N) if alt(k, N))
        blocks = [block("h", i, d, H, Hkv, I, i, i, tables, L) for i in range(n_layer)]
        # §7.3: any non-empty use_fused_head builds the Triton head in GPT.
        head_transposed = (not tie) and bool(fused)

    return Derived(
        is_parcae=parcae, V=V, d=d, H=H, Hkv=Hkv, hd=hd, I=I, ds=ds, Is=Is, Hs=Hs, hds=hds,
        P=P, R=R, Cn=Cn, N=N, L=L, mr=mr, mbd=mbd, Tmax=Tmax, value_embed_keys=tables,
        gate_layer_ids=tuple(b.layer_id for b in blocks if b.has_gate), blocks=tuple(blocks),
        emb_scale=emb_scale, logit_scale=logit_scale, norm_class_name=norm, bias=bias,
        tie_embeddings=tie, head_transposed=head_transposed,
    )


# ---------------------------------------------------------------------------------------------
# §3 State-dict keys and shapes
# ---------------------------------------------------------------------------------------------


def _norm_param_shapes(norm_class_name: str, width: int, eps: float) -> list[tuple[str, tuple]]:
    """Parameters of a block norm: RMSNorm has only ``weight``; any other name is a torch.nn
    class built as ``(width, eps=norm_eps)`` (§4.3), inspected on the meta device."""
    if norm_class_name == "RMSNorm":
        return [("weight", (width,))]
    module = getattr(nn, norm_class_name)(width, eps=eps, device="meta")
    return [(n, tuple(p.shape)) for n, p in module.state_dict().items()]


def _block_shapes(spec: BlockSpec, dv: Derived, config: Mapping[str, Any]) -> list[tuple]:
    """§3 per-block group, in the table's order; biases follow their weights."""
    w, h, hk, s, m = spec.width, spec.heads, spec.kv_heads, spec.head_size, spec.mlp_width
    gated = config["mlp_class_name"] == "GatedMLP"
    out: list[tuple[str, tuple]] = []

    def linear(name, rows, cols):
        out.append((f"{name}.weight", (rows, cols)))
        if dv.bias:
            out.append((f"{name}.bias", (rows,)))

    for pname, shape in _norm_param_shapes(dv.norm_class_name, w, config["norm_eps"]):
        out.append((f"norm_1.{pname}", shape))
    linear("attn.c_q", h * s, w)
    linear("attn.c_k", hk * s, w)
    linear("attn.c_v", hk * s, w)
    linear("attn.c_proj", w, w)
    if config["qk_bias"]:
        out.append(("attn.qk_bias", (2, 1, h, s)))
    if spec.has_gate:
        out.append(("attn.ve_gate.weight", (hk, 32)))  # never a bias
    for pname, shape in _norm_param_shapes(dv.norm_class_name, w, config["norm_eps"]):
        out.append((f"norm_2.{pname}", shape))
    linear("mlp.fc", 2 * m if gated else m, w)
    linear("mlp.proj", w, m)
    return [(spec.prefix + k, shape) for k, shape in out]


def state_dict_shapes(config: Mapping[str, Any]) -> "OrderedDict[str, tuple[int, ...]]":
    """The exact §3 (Parcae) / §7.3 (GPT) key set with shapes, in the saved order.

    Allocates nothing. ``freqs_cis`` is a buffer; tied heads list both ``transformer.wte.weight``
    and ``lm_head.weight`` (§3 "Tied embeddings").
    """
    dv = derived(config)
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    shapes["freqs_cis"] = (1, dv.Tmax, 1, dv.hd // 2, 2)
    shapes["transformer.wte.weight"] = (dv.V, dv.d)
    for spec in dv.blocks:
        if spec.stage in ("prelude", "h"):
            shapes.update(_block_shapes(spec, dv, config))
    if dv.is_parcae:
        inj = config["injection_type"]
        if inj == "diagonal":
            shapes["transformer.adapter.A_log"] = (dv.ds,)
            shapes["transformer.adapter.dt_bias"] = (dv.ds,)
            shapes["transformer.adapter.B"] = (dv.ds, dv.d)
        elif inj == "linear":
            shapes["transformer.adapter.adapter.weight"] = (dv.ds, dv.ds + dv.d)
            if dv.bias:
                shapes["transformer.adapter.adapter.bias"] = (dv.ds,)
        elif inj == "add":
            if dv.ds != dv.d:
                raise ValueError("injection_type 'add' requires ds == d (§9)")
        else:
            raise ValueError(f"unknown injection_type {inj!r}")
        for spec in dv.blocks:
            if spec.stage == "core_block":
                shapes.update(_block_shapes(spec, dv, config))
        shapes["transformer.C.weight"] = (dv.d, dv.ds)
        if dv.bias:
            shapes["transformer.C.bias"] = (dv.d,)
        for spec in dv.blocks:
            if spec.stage == "coda":
                shapes.update(_block_shapes(spec, dv, config))
    shapes["transformer.ln_f.weight"] = (dv.d,)
    if dv.is_parcae and config["prelude_norm"]:
        shapes["transformer.ln_prelude.weight"] = (dv.d,)  # registered after ln_f
    for k in dv.value_embed_keys:
        shapes[f"value_embeds.{k}.weight"] = (dv.V, dv.Hkv * dv.hd)  # outer kv width
    shapes["lm_head.weight"] = (dv.d, dv.V) if dv.head_transposed else (dv.V, dv.d)
    return shapes


def unique_parameter_count(config: Mapping[str, Any]) -> int:
    """Number of unique parameters (§3/§7.2): excludes the ``freqs_cis`` buffer and counts a
    tied ``lm_head.weight``/``transformer.wte.weight`` once."""
    dv = derived(config)
    total = 0
    for key, shape in state_dict_shapes(config).items():
        if key == "freqs_cis" or (key == "lm_head.weight" and dv.tie_embeddings):
            continue
        total += math.prod(shape)
    return total


# ---------------------------------------------------------------------------------------------
# §4.1 RoPE table and a random state dict
# ---------------------------------------------------------------------------------------------


def rope_table(hd: int, Tmax: int, base: float = 50000, condense_ratio: float = 1) -> Tensor:
    """§4.1 ``freqs_cis`` of shape ``(1, Tmax, 1, hd/2, 2)``; ``[..., 0]`` cos, ``[..., 1]`` sin.

    ``inv_freq[j] = 1 / base^(arange(0, hd, 2)/hd)``, ``angle[t, j] = (t / condense) * inv_freq[j]``,
    all float32.
    """
    exponent = torch.arange(0, hd, 2, dtype=torch.float32) / hd
    inv_freq = 1.0 / (base ** exponent)
    t = torch.arange(Tmax, dtype=torch.float32) / condense_ratio
    angle = torch.outer(t, inv_freq)  # (Tmax, hd/2)
    table = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)  # (Tmax, hd/2, 2)
    return table[None, :, None, :, :].contiguous()


def _rope_table_for(config: Mapping[str, Any]) -> Tensor:
    dv = derived(config)
    rs = config.get("rope_settings") or {}
    return rope_table(dv.hd, dv.Tmax, rs.get("rope_base", 50000), rs.get("rope_condense_ratio", 1))


def random_official_state_dict(
    config: Mapping[str, Any], seed: int = 0, scale: float = 0.5
) -> "OrderedDict[str, Tensor]":
    """A float32 state dict with exactly the :func:`state_dict_shapes` keys, every weight random.

    Unlike the official init (§6.2 zeroes every output projection) all tensors are perturbed:
    matrices ``N(0,1) * scale / sqrt(fan_in)``; norm weights ``1 + 0.1 N``; norm and linear
    biases and ``qk_bias`` ``0.1 N``; value embeddings ``0.5 N``; ``A_log``/``dt_bias``
    ``0.5 N``. ``freqs_cis`` follows §4.1. A tied ``lm_head.weight`` is the very same tensor as
    ``transformer.wte.weight`` (shared storage, as in the official save, §1.1).
    """
    dv = derived(config)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    sd: OrderedDict[str, Tensor] = OrderedDict()
    for key, shape in state_dict_shapes(config).items():
        if key == "freqs_cis":
            sd[key] = _rope_table_for(config)
        elif key == "lm_head.weight" and dv.tie_embeddings:
            sd[key] = sd["transformer.wte.weight"]
        elif key.startswith("value_embeds."):
            sd[key] = 0.5 * randn(*shape)
        elif key.endswith(("A_log", "dt_bias")):
            sd[key] = 0.5 * randn(*shape)
        elif key.split(".")[-2].startswith(("norm_", "ln_")):
            # norm_1 / norm_2 / ln_f / ln_prelude gains (and biases of torch norms)
            is_gain = key.endswith(".weight")
            sd[key] = (1.0 + 0.1 * randn(*shape)) if is_gain else 0.1 * randn(*shape)
        elif key.endswith("qk_bias") or len(shape) == 1:
            sd[key] = 0.1 * randn(*shape)
        else:
            fan_in = shape[0] if (key == "lm_head.weight" and dv.head_transposed) else shape[1]
            sd[key] = randn(*shape) * (scale / math.sqrt(fan_in))
    return sd


# ---------------------------------------------------------------------------------------------
# §4 Forward pass
# ---------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """§4.3 RMSNorm: float32, ``x * rsqrt(mean(x^2) + eps)``, back to input dtype, then x gain."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf.to(dtype) * weight


def _block_norm(x: Tensor, sd: Mapping[str, Tensor], prefix: str, dv: Derived, eps: float):
    """Block norm (§4.3): RMSNorm, or the ``torch.nn`` class named by ``norm_class_name``."""
    if dv.norm_class_name == "RMSNorm":
        return rms_norm(x, sd[prefix + "weight"], eps)
    module = getattr(nn, dv.norm_class_name)(x.shape[-1], eps=eps)
    params = {n: sd[prefix + n] for n in module.state_dict()}
    return torch.func.functional_call(module, params, (x,))


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """§4.3 step 5: interleaved RoPE in float32. ``x`` is ``(B, T, h, s)``, ``freqs`` is
    ``(1, T, 1, s/2, 2)``; channels ``(2j, 2j+1)`` rotate by ``angle[t, j]``."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = freqs[..., 0].float(), freqs[..., 1].float()
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _linear(x: Tensor, sd: Mapping[str, Tensor], name: str, bias: bool) -> Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)


def _nonlin(name: str, z: Tensor) -> Tensor:
    """§4.3 MLP nonlinearity: ReLU2 is ``0.5 * relu(z)^2``; else a no-arg ``torch.nn`` class."""
    if name == "ReLU2":
        return 0.5 * torch.relu(z) ** 2
    return getattr(nn, name)()(z)


def _attention(a, sd, spec: BlockSpec, dv: Derived, config, input_ids, freqs):
    """§4.3 attention on the normed input ``a`` (B, T, w)."""
    B, T, _ = a.shape
    h, hk, s = spec.heads, spec.kv_heads, spec.head_size
    p = spec.prefix + "attn."
    q = _linear(a, sd, p + "c_q", dv.bias).view(B, T, h, s)
    k = _linear(a, sd, p + "c_k", dv.bias).view(B, T, hk, s)
    v = _linear(a, sd, p + "c_v", dv.bias).view(B, T, hk, s)
    if spec.live:  # step 2: value embedding, only when table and gate both exist (§2.4)
        table = sd[f"value_embeds.{spec.table_key}.weight"]
        if table.shape[1] != hk * s:
            raise ValueError(f"{spec.prefix}: live value embedding of width {table.shape[1]} "
                             f"cannot reshape to ({hk}, {s}) (official reshape error, §2.4/§9)")
        ve = F.embedding(input_ids, table).view(B, T, hk, s)
        g = 2.0 * torch.sigmoid(F.linear(a[..., :32], sd[p + "ve_gate.weight"]))  # (B, T, hk)
        v = v + g[..., None] * ve
    clip = config.get("clip_qkv")
    if clip is not None:  # step 3
        q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
    if config["qk_bias"]:  # step 4
        if hk != h:
            raise ValueError("qk_bias with Hkv != H is a broadcast error officially (§9)")
        qkb = sd[p + "qk_bias"]
        q = q + qkb[0]
        k = k + qkb[1]
    if (config.get("rope_settings") or {}).get("use_rope", True):  # step 5
        if freqs.shape[-2] * 2 != s:
            raise ValueError("head size differs from the RoPE table's (ds/Hs != d/H, §4.1/§9)")
        q = apply_rope(q, freqs)
        k = apply_rope(k, freqs)
    if config["qk_norm"]:  # step 6: after RoPE, no weight, default eps
        q = F.rms_norm(q, (s,))
        k = F.rms_norm(k, (s,))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, s)
    if hk != h:  # step 7 GQA: query head i uses kv head floor(i / (h/hk))
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(s))
    y = y.transpose(1, 2).reshape(B, T, h * s)  # step 8: heads concatenated, head 0 first
    return _linear(y, sd, p + "c_proj", dv.bias)


def _mlp(y, sd, spec: BlockSpec, dv: Derived, config):
    """§4.3 MLP: BaseMLP ``proj(phi(fc(y)))``; GatedMLP ``proj(phi(p) * q)`` with fc = [p | q]."""
    p = spec.prefix + "mlp."
    z = _linear(y, sd, p + "fc", dv.bias)
    if config["mlp_class_name"] == "GatedMLP":
        first, second = z.chunk(2, dim=-1)
        z = _nonlin(config["nonlin_name"], first) * second
    else:
        z = _nonlin(config["nonlin_name"], z)
    return _linear(z, sd, p + "proj", dv.bias)


def _block(x, sd, spec: BlockSpec, dv: Derived, config, input_ids, freqs):
    """§4.3 pre-norm block: ``x + Attn(Norm1(x))`` then ``x + MLP(Norm2(x))``."""
    eps = config["norm_eps"]
    x = x + _attention(_block_norm(x, sd, spec.prefix + "norm_1.", dv, eps), sd, spec, dv,
                       config, input_ids, freqs)
    x = x + _mlp(_block_norm(x, sd, spec.prefix + "norm_2.", dv, eps), sd, spec, dv, config)
    return x


def inject(config: Mapping[str, Any], sd: Mapping[str, Tensor], h: Tensor, e: Tensor) -> Tensor:
    """§4.6 injection ``Inject(h, e)``.

    * diagonal: ``Delta = softplus(dt_bias)``, ``Abar = exp(-Delta * exp(A_log))``,
      ``Abar * h + Delta * (e @ B.T)``;
    * linear: ``W @ concat[h, e] (+ b)``, the **state first**;
    * add: ``h + e``.
    """
    kind = config["injection_type"]
    if kind == "diagonal":
        delta = F.softplus(sd["transformer.adapter.dt_bias"])
        a_bar = torch.exp(-delta * torch.exp(sd["transformer.adapter.A_log"]))
        return a_bar * h + delta * F.linear(e, sd["transformer.adapter.B"])
    if kind == "linear":
        b = sd["transformer.adapter.adapter.bias"] if config["bias"] else None
        return F.linear(torch.cat([h, e], dim=-1), sd["transformer.adapter.adapter.weight"], b)
    if kind == "add":
        return h + e
    raise ValueError(f"unknown injection_type {kind!r}")


def _check_state_dict(config, sd: Mapping[str, Tensor], dv: Derived) -> dict[str, Tensor]:
    """§10.1: load strictly against the predicted key set; tied heads may carry one key."""
    sd = dict(sd)
    expected = state_dict_shapes(config)
    if dv.tie_embeddings:
        wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
        if wte is None and head is not None:
            sd["transformer.wte.weight"] = head
        elif head is None and wte is not None:
            sd["lm_head.weight"] = wte
        elif wte is not None and head is not None and not torch.equal(wte, head):
            raise ValueError("tied checkpoint with different wte and lm_head tensors")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{k}: shape {tuple(sd[k].shape)} != expected {shape}")
    return sd


def official_forward(
    config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    input_ids: Tensor,
    n_loops: int | None = None,
    h0: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Official float32 logits ``(B, T, V)`` per §4 and §10 (all ``V`` padded columns kept).

    Parcae: embedding (x emb_scale if != 1) -> prelude -> ``ln_prelude`` (if ``prelude_norm``)
    = ``e`` -> ``h = h0`` (zeros by default, shape ``(B, T, ds)``) -> ``n_loops`` times
    ``u = Inject(h, e)``, core blocks, ``h = u`` -> ``C h (+b)`` -> coda -> ``ln_f`` -> head
    -> ``.float()`` -> x logit_scale -> optional softcap. ``n_loops`` is the explicit total
    iteration count (i.e. ``num_steps_pair=[n_loops, 0]``, §5.1; 0 fails officially, §9).

    GPT (§7.3): embedding -> ``transformer.h`` blocks -> ``ln_f`` -> head -> optional softcap,
    with no ``logit_scale``; ``n_loops`` and ``h0`` are ignored.

    ``position_ids`` is an optional 1-D tensor of length T selecting RoPE rows (§4.1).
    """
    dv = derived(config)
    sd = _check_state_dict(config, state_dict, dv)
    B, T = input_ids.shape
    if T > dv.Tmax:
        raise ValueError(f"sequence length {T} > Tmax {dv.Tmax}")
    freqs = sd["freqs_cis"]
    freqs = freqs[:, :T] if position_ids is None else freqs[:, position_ids]
    eps = config["norm_eps"]

    x = F.embedding(input_ids, sd["transformer.wte.weight"])  # §4.2
    if dv.emb_scale != 1:
        x = x * dv.emb_scale

    def run(stage, x):
        for spec in dv.blocks:
            if spec.stage == stage:
                x = _block(x, sd, spec, dv, config, input_ids, freqs)
        return x

    if dv.is_parcae:
        if n_loops is None or n_loops < 1:
            raise ValueError("n_loops must be >= 1 (0 iterations crash officially, §9)")
        x = run("prelude", x)  # §4.4
        e = rms_norm(x, sd["transformer.ln_prelude.weight"], eps) if config["prelude_norm"] else x
        if config["injection_type"] == "add" and dv.ds != dv.d:
            raise ValueError("injection_type 'add' requires ds == d (§9)")
        h = torch.zeros(B, T, dv.ds, dtype=e.dtype) if h0 is None else h0  # §4.5 / §10.5
        for _ in range(n_loops):  # §4.6
            u = inject(config, sd, h, e)
            u = run("core_block", u)
            h = u
        b = sd["transformer.C.bias"] if dv.bias else None
        y = F.linear(h, sd["transformer.C.weight"], b)  # §4.7
        y = run("coda", y)
    else:
        y = run("h", x)

    y = rms_norm(y, sd["transformer.ln_f.weight"], eps)
    fused = config.get("use_fused_head") or ""
    if fused == "hhe":
        raise ValueError("use_fused_head 'hhe' cannot produce logits without labels (§3)")
    if dv.tie_embeddings:
        logits = F.linear(y, sd["transformer.wte.weight"])
    elif dv.head_transposed:
        logits = y @ sd["lm_head.weight"]  # Triton head, (d, V), no transpose (§3, §7.3)
    else:
        logits = F.linear(y, sd["lm_head.weight"])
    logits = logits.float()
    if dv.is_parcae:
        logits = logits * dv.logit_scale
    cap = config.get("logit_softcap")
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


# ---------------------------------------------------------------------------------------------
# §1.1 Writing a checkpoint directory
# ---------------------------------------------------------------------------------------------


def write_official_checkpoint(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    weights_name: str = "model.pt",
    key_prefix: str = "",
    include_class_name: bool = True,
    wrap_in: str | None = None,
) -> Path:
    """Write ``config.json`` + weights like ``parcae_lm.save_pretrained`` (§1.1).

    * ``config.json``: ``json.dump(config, indent=2)`` with the keys in the given order.
      ``include_class_name=False`` drops ``_class_name`` (as the receval save does, §1.2).
    * weights: ``torch.save(OrderedDict)`` in zip format for ``model.pt`` /
      ``pytorch_model.bin`` / ``model.bin``; shared tied storage is preserved. A name ending in
      ``.safetensors`` writes safetensors instead (not an official format; the tied head is
      cloned because safetensors refuses shared tensors).
    * ``key_prefix`` (e.g. ``"module."`` or ``"_orig_mod."``) is prepended to every key.
    * ``wrap_in="model"`` nests the state dict under that key (Lightning-Fabric layout, §1.2).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if not include_class_name:
        cfg.pop("_class_name", None)
    with open(directory / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    sd = OrderedDict((key_prefix + k, v) for k, v in state_dict.items())
    path = directory / weights_name
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        seen: set[int] = set()
        out = OrderedDict()
        for k, v in sd.items():
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
            seen.add(ptr)
        save_file(out, str(path), metadata={"format": "pt"})
    else:
        torch.save(sd if wrap_in is None else {wrap_in: sd}, path)
    return directory
