"""FLOPs and unrolled parameter counts of looped language models, from a `LoopConfig`.

Parcae's compute rule (shared/reference/paper-facts.md, "FLOPs"):

    C = (2·N̂₁ + 6·N̂₂)·D

with D the training tokens, N̂₁ the effective (unrolled) parameters run *without* backprop
(forward only: 2 FLOPs per weight per token, one multiply and one add) and N̂₂ those run *with*
backprop (forward 2 + backward 4: the gradient with respect to the input and to the weight
are each a matmul as large as the forward one). For a looped model trained with truncated
backprop — T loops, the first n = T − k without gradients, the last k with —

    N̂₁ = n·N_loop,      N̂₂ = N_prelude + k·N_loop + N_readout + N_coda + N_head.

Which parameters count (the *matmul parameters*: weights that multiply an activation, once
per token, in the stage's pass; this is exactly what a matmul FLOP counter sees):

- counted: every block's c_q, c_k, c_v, c_proj, mlp.fc, mlp.proj and value-embedding gate
  (a 32 → kv-heads Linear); the injection matrix (diagonal injection: B, d_state·d_model,
  recomputed every loop; linear injection: W, (d_state + d_model)·d_state; additive: none);
  the readout C; the output head (d_model·vocab — a real matmul even when tied to the
  embedding).
- not counted: the token-embedding and value-embedding tables (lookups, no arithmetic),
  norm gains, biases and the diagonal injection's A_log/dt_bias (elementwise, O(d) per token,
  as in Kaplan et al. 2020 and Hoffmann et al. 2022), RoPE, softmax, the loss.

Attention's QK^T and AV products multiply two activations, not a weight, so the Parcae rule
leaves them out. They can be added (``attention=``) per token and per attention layer run,
for a layer of width w (= heads·head size) and sequence length S:

- ``"causal"``: only the allowed query-key pairs: token i (1-based) meets i keys, so on
  average (S + 1)/2; QK^T and AV cost 2·w FLOPs per pair each: 2·(S + 1)·w (≈ 2·S·w, the
  term Kaplan et al. 2020 use);
- ``"dense"``: the full S × S products a kernel without causal skipping computes (PyTorch's
  math SDPA, which torch.utils.flop_counter counts): 4·S·w.

Layers run with backprop cost 3× their forward attention (backward = 2 × forward), as the
parameter matmuls do (6 vs 2). A layer is one block (prelude, each core block in each loop,
coda); core blocks have width d_state, the others d_model.

Depth: training samples T per sequence (T ~ max(Poisson(μ_rec), 1), k = min(T, μ_bwd)). The
rule is evaluated at the mean: n = μ_rec − min(μ_rec, μ_bwd), k = min(μ_rec, μ_bwd)
(``depth="mean"``, what the paper's formula states), or at the exact expectations under the
config's sampling (``depth="expected"``: E[T] = μ + e^(−μ) for Poisson). Both count the
loops each sequence runs; loopdyn's batched loop runs max_b n_b and max_b k_b loops over the
whole batch (a held sequence is computed and discarded), so a machine does somewhat more work
than the rule with Poisson sampling (exactly the rule with ``depth_sampling="fixed"``).

Unrolled parameter count N(μ_rec) (the ``params`` column of the scaling laws, docs/design.md §7): all
parameters of the model with the loop unrolled — prelude, prelude norm, μ_rec copies of (the
injection + the R core blocks), readout, coda, final norm — *including* the token embedding
(the tied head counted once, an untied head counted too) and the value-embedding tables, as
the preset names count them (parcae-140m has 144 M parameters, 100 M of them embedding
tables). ``embeddings=False`` gives the non-embedding count (Kaplan convention), the same set
as ``LoopedLM.num_params(exclude_embeddings=True)``. At one loop N(1) = ``num_params()``.

Every count here is computed from the config by arithmetic (no model is built); the tests
check them against ``LoopedLM.num_params`` and against ``torch.utils.flop_counter``.
Units: parameters are counts; FLOPs are floating-point operations (one multiply-add = 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from loopdyn.models.config import LoopConfig
from loopdyn.models.errors import InputError
from loopdyn.models.looped import value_embedding_layout

__all__ = [
    "ATTENTION_MODES", "DEPTH_RULES", "StageParams", "FlopCount",
    "stage_params", "unrolled_params", "training_loops", "attention_flops_per_layer",
    "forward_flops", "training_flops",
]

ATTENTION_MODES = ("causal", "dense")
DEPTH_RULES = ("mean", "expected")
VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels (models.layers)


@dataclass(frozen=True)
class StageParams:
    """Parameters of one pass through each stage, per token.

    With ``kind="all"``: every parameter (``head`` is 0 when tied: it is the embedding,
    counted in ``embeddings``). With ``kind="matmul"``: only weights that multiply an
    activation (``embeddings`` is 0: tables are looked up; ``head`` is d_model·vocab always).
    ``loop`` is one loop iteration (injection + the R core blocks); the others run once.
    """

    kind: str
    prelude: int  # prelude blocks (+ prelude norm)
    loop: int  # one loop iteration: injection + core blocks
    readout: int  # C (d_state → d_model)
    coda: int  # coda blocks (+ final norm)
    head: int  # output head
    embeddings: int  # token-embedding and value-embedding tables

    @property
    def once(self) -> int:
        """Parameters run once per token outside the loop (embedding tables excluded)."""
        return self.prelude + self.readout + self.coda + self.head

    def unrolled(self, loops: float, embeddings: bool = True) -> float:
        """once + loops·loop (+ embeddings)."""
        return self.once + loops * self.loop + (self.embeddings if embeddings else 0)


@dataclass(frozen=True)
class FlopCount:
    """C = (2·N̂₁ + 6·N̂₂)·D, plus an optional attention term (all in FLOPs).

    ``n_hat_no_grad`` = N̂₁ and ``n_hat_grad`` = N̂₂ are matmul parameters per token;
    ``loops_no_grad``/``loops_grad`` the loop counts behind them (a forward-only count puts
    everything in N̂₁). ``attention_flops`` is 0 when ``attention`` is None.
    """

    tokens: float
    loops_no_grad: float
    loops_grad: float
    n_hat_no_grad: float
    n_hat_grad: float
    parameter_flops: float
    attention_flops: float
    attention: str | None
    seq_len: int | None

    @property
    def total(self) -> float:
        return self.parameter_flops + self.attention_flops

    @property
    def per_token(self) -> float:
        return self.total / self.tokens if self.tokens else math.nan

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "loops_no_grad": self.loops_no_grad,
                "loops_grad": self.loops_grad, "n_hat_no_grad": self.n_hat_no_grad,
                "n_hat_grad": self.n_hat_grad, "parameter_flops": self.parameter_flops,
                "attention_flops": self.attention_flops, "attention": self.attention,
                "seq_len": self.seq_len, "total": self.total}


# ---------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------

def _norm_params(config: LoopConfig, width: int) -> int:
    return width if config.norm == "rmsnorm" else 2 * width  # LayerNorm: gain and bias


def _block_params(config: LoopConfig, width: int, heads: int, kv_heads: int, mlp_width: int,
                  gated_value: bool, kind: str) -> int:
    """One transformer block (models.layers.Block); kind "all" or "matmul"."""
    s = width // heads
    kv = kv_heads * s
    mlp_in = 2 * mlp_width if config.mlp in ("swiglu", "geglu") else mlp_width
    weights = (width * width + 2 * width * kv + width * width  # c_q, c_k, c_v, c_proj
               + width * mlp_in + mlp_width * width  # mlp.fc, mlp.proj
               + (VE_GATE_CHANNELS * kv_heads if gated_value else 0))
    if kind == "matmul":
        return weights
    biases = (2 * width + 2 * kv + mlp_in + width) if config.bias else 0
    norms = (4 if config.block == "sandwich" else 2) * _norm_params(config, width)
    qk_bias = 2 * heads * s if config.qk_bias else 0
    return weights + biases + norms + qk_bias


def _injection_params(config: LoopConfig, kind: str) -> int:
    d, ds = config.d_model, config.d_state
    if config.injection == "diagonal":
        return ds * d + (0 if kind == "matmul" else 2 * ds)  # B; A_log, dt_bias
    if config.injection == "linear":
        return (ds + d) * ds + (ds if config.bias and kind == "all" else 0)
    return 0  # additive, none


def stage_params(config: LoopConfig, kind: str = "all") -> StageParams:
    """Per-stage parameter counts of `config` (see StageParams); kind "all" or "matmul"."""
    if kind not in ("all", "matmul"):
        raise InputError(f"kind must be 'all' or 'matmul', got {kind!r}")
    cfg = config
    d, ds, V = cfg.d_model, cfg.d_state, cfg.vocab_size
    live = value_embedding_layout(cfg).live  # block name -> table key (blocks with a VE gate)
    outer = lambda name: _block_params(cfg, d, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp,  # noqa: E731
                                       name in live, kind)
    inner = lambda name: _block_params(cfg, ds, cfg.n_state_heads, cfg.n_state_heads,  # noqa: E731
                                       cfg.d_state_mlp, name in live, kind)
    norm = (lambda w: 0) if kind == "matmul" else (lambda w: _norm_params(cfg, w))  # noqa: E731

    prelude = sum(outer(f"prelude.{i}") for i in range(cfg.n_prelude))
    prelude += norm(d) if cfg.prelude_norm else 0
    coda = sum(outer(f"coda.{i}") for i in range(cfg.n_coda)) + norm(d)  # + final norm
    if cfg.looped:
        loop = _injection_params(cfg, kind) + sum(inner(f"core.{j}") for j in range(cfg.n_core))
        readout = ds * d + (d if cfg.bias and kind == "all" else 0)
    else:
        loop = readout = 0
    if kind == "matmul":
        head, embeddings = d * V, 0
    else:
        head = 0 if cfg.tie_embeddings else d * V
        tables = len(set(live.values())) * V * cfg.n_kv_heads * cfg.head_dim
        embeddings = V * d + tables
    return StageParams(kind, prelude, loop, readout, coda, head, embeddings)


def unrolled_params(config: LoopConfig, loops: int | None = None, *, embeddings: bool = True) -> int:
    """N(loops): parameters of the model with its loop unrolled `loops` times (default μ_rec).

    prelude (+ norm) + loops·(injection + R core blocks) + readout + coda + final norm
    + embedding tables (token embedding, tied head counted once, value embeddings; leave them
    out with ``embeddings=False``). A fixed-depth model has no loop: N = its parameter count.
    """
    loops = _check_loops(config, config.mean_loops if loops is None and config.looped else loops)
    sp = stage_params(config, "all")
    head = sp.head if embeddings else 0  # an untied head is an embedding-sized table too
    return int(sp.prelude + loops * sp.loop + sp.readout + sp.coda + head
               + (sp.embeddings if embeddings else 0))


def _check_loops(config: LoopConfig, loops) -> int:
    if loops is None:
        return 0  # fixed-depth, no loops given
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 0:
        raise InputError(f"loops must be a non-negative integer, got {loops!r}")
    if loops and not config.looped:
        raise InputError(f"model '{config.name}' is fixed-depth (injection='fixed'): it has no loop")
    return loops


# ---------------------------------------------------------------------------------------
# Loop counts
# ---------------------------------------------------------------------------------------

def _poisson_tail(mu: float, t: int) -> float:
    """P(X ≥ t) for X ~ Poisson(mu)."""
    from scipy import stats

    return float(stats.poisson.sf(t - 1, mu))


def training_loops(config: LoopConfig, depth: str = "mean") -> tuple[float, float]:
    """(n, k): loops per sequence run without and with gradients in training.

    ``"mean"``: k = min(μ_rec, μ_bwd), n = μ_rec − k (the rule at the mean depth).
    ``"expected"``: E[n], E[k] under the config's depth sampling. For Poisson,
    T = max(X, 1), X ~ Poisson(μ): E[T] = μ + e^(−μ), E[k] = E[min(T, μ_bwd)]
    = Σ_{t=1..μ_bwd} P(T ≥ t) = 1 + Σ_{t=2..μ_bwd} P(X ≥ t), E[n] = E[T] − E[k].
    """
    if depth not in DEPTH_RULES:
        raise InputError(f"depth must be one of {', '.join(DEPTH_RULES)}, got {depth!r}")
    if not config.looped:
        return 0.0, 0.0
    mu, b = config.mean_loops, config.backprop_loops
    if depth == "mean" or config.depth_sampling == "fixed":
        k = min(mu, b)
        return float(mu - k), float(k)
    e_total = mu + math.exp(-mu)
    e_grad = 1.0 + sum(_poisson_tail(mu, t) for t in range(2, b + 1))
    return e_total - e_grad, e_grad


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------

def attention_flops_per_layer(width: int, seq_len: int, mode: str) -> float:
    """Forward QK^T + AV FLOPs per token of one attention layer of width w (see module doc):
    causal 2·(S + 1)·w, dense 4·S·w."""
    if mode not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_MODES)} or None, got {mode!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise InputError(f"seq_len must be a positive integer, got {seq_len!r}")
    return 2.0 * (seq_len + 1) * width if mode == "causal" else 4.0 * seq_len * width


def _check_tokens(tokens) -> float:
    try:
        t = float(tokens)
    except (TypeError, ValueError):
        raise InputError(f"tokens must be a number, got {tokens!r}") from None
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"tokens must be finite and ≥ 0, got {tokens!r}")
    return t


def _count(config, tokens, n_free, n_grad, outside_grad, attention, seq_len) -> FlopCount:
    """n_free/n_grad loops without/with backprop; the stages outside the loop run with backprop
    when `outside_grad` (training) and without otherwise (inference)."""
    D = _check_tokens(tokens)
    mm = stage_params(config, "matmul")
    n1 = n_free * mm.loop + (0 if outside_grad else mm.once)
    n2 = n_grad * mm.loop + (mm.once if outside_grad else 0)
    attn = 0.0
    if attention is not None:
        if seq_len is None:
            raise InputError("an attention term needs seq_len (tokens per sequence)")
        outer = attention_flops_per_layer(config.d_model, seq_len, attention)
        inner = attention_flops_per_layer(config.d_state, seq_len, attention) if config.looped else 0.0
        outside = (config.n_prelude + config.n_coda) * outer
        per_loop = config.n_core * inner
        fwd_free = n_free * per_loop + (0 if outside_grad else outside)
        fwd_grad = n_grad * per_loop + (outside if outside_grad else 0)
        attn = (fwd_free + 3.0 * fwd_grad) * D
    return FlopCount(tokens=D, loops_no_grad=float(n_free), loops_grad=float(n_grad),
                     n_hat_no_grad=float(n1), n_hat_grad=float(n2),
                     parameter_flops=(2.0 * n1 + 6.0 * n2) * D, attention_flops=attn,
                     attention=attention, seq_len=seq_len)


def forward_flops(config: LoopConfig, tokens: float = 1, loops: int | None = None, *,
                  attention: str | None = None, seq_len: int | None = None) -> FlopCount:
    """Inference (no backprop) at `loops` loops (default μ_rec) over `tokens` tokens:
    2·N̂·D with N̂ = the matmul parameters of the model unrolled `loops` times (+ attention)."""
    if loops is None and config.looped:
        loops = config.mean_loops
    loops = _check_loops(config, loops)
    return _count(config, tokens, loops, 0, False, attention, seq_len)


def training_flops(config: LoopConfig, tokens: float = 1, *, n_no_grad: float | None = None,
                   n_grad: float | None = None, depth: str = "mean",
                   attention: str | None = None, seq_len: int | None = None) -> FlopCount:
    """Training compute C = (2·N̂₁ + 6·N̂₂)·D for `tokens` = D training tokens.

    Loop counts per sequence: explicit ``n_no_grad`` and ``n_grad`` (both or neither; they may
    be fractional averages), else :func:`training_loops` with ``depth`` ("mean" or
    "expected"). Prelude, readout, coda and head always run with backprop.
    """
    if (n_no_grad is None) != (n_grad is None):
        raise InputError("give both n_no_grad and n_grad, or neither")
    if n_no_grad is None:
        n_no_grad, n_grad = training_loops(config, depth)
    for name, v in (("n_no_grad", n_no_grad), ("n_grad", n_grad)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise InputError(f"{name} must be a finite number ≥ 0, got {v!r}")
    if (n_no_grad or n_grad) and not config.looped:
        raise InputError(f"model '{config.name}' is fixed-depth (injection='fixed'): it has no loop")
    return _count(config, tokens, n_no_grad, n_grad, True, attention, seq_len)
