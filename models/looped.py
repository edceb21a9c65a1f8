"""LoopedLM: a language model that runs a shared core of blocks T times over a state h.

    e   = norm(P(tokens))                 prelude, then prelude norm; fixed during the loop
    h_0 = init_state(e)                   zero, or small random ("like-init")
    h_{t+1} = R(inject(h_t, e))           one `step`; R = the core blocks (with residuals)
    logits  = head(norm(Coda(C·h_T)))     C = the readout, a linear map ds → d

`encode`, `init_state`, `step` and `decode` are the pieces; `unroll` runs them and keeps every
state; `forward` is what training calls. In training mode each sequence draws its own depth
T ~ max(Poisson(μ_rec), 1) and only its last k = min(T, μ_bwd) loops carry gradients
(truncated backprop); in eval mode the loop runs `n_loops` (default μ_rec) times,
deterministically. A fixed-depth model (`injection="fixed"`) is the same network without the
loop: a plain GPT of `n_prelude` blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopdyn.models.config import LoopConfig
from loopdyn.models.errors import ConfigError, InputError
from loopdyn.models.injection import make_injection
from loopdyn.models.hooks import watched
from loopdyn.models.kernels import fast_paths_enabled
from loopdyn.models.layers import Block, Linear, make_norm, rope_table
from loopdyn.models.operator import DenseOperator
from loopdyn.models.protocol import LinearPart, Sublayer, config_field
from loopdyn.models.sizes import count_params
from loopdyn.models.checks import check_tokens


@dataclass
class LoopContext:
    """Everything the loop needs besides h, fixed for one input: step(h, ctx) is a pure function of h."""

    idx: torch.Tensor  # (B, S) token ids
    e: torch.Tensor  # (B, S, d) prelude output after the prelude norm
    rope: torch.Tensor  # (S, s/2, 2) cos/sin for these positions
    core_ve: list  # per core block: value embedding (B, S, ·) or None


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, S, V) float32
    loss: torch.Tensor | None = None  # mean cross-entropy in nats per token
    state: torch.Tensor | None = None  # h_T
    prev_state: torch.Tensor | None = None  # h_{T−1} (state entering the last loop)
    n_loops: torch.Tensor | None = None  # loops each sequence ran, (B,)


class StateTap(nn.Identity):
    """Called with h_0 and with every new state h_{t+1}: register forward hooks here to watch
    the recurrence (per-loop state norms, residuals) without touching the model code."""


@dataclass(frozen=True)
class ValueEmbeddingLayout:
    live: dict  # block name ("prelude.0", "core.1", "coda.0") -> table key, for blocks that use one
    tables: frozenset  # table keys the official layout allocates (some may be unused)
    gated: frozenset  # block names whose attention has a gate (some may be unused)


def value_embedding_layout(config: LoopConfig) -> ValueEmbeddingLayout:
    """Which blocks get a value embedding, following the official rule (reference §2.4).

    alt(i, n) := i mod 2 == (n − 1) mod 2. Tables exist at alt(k, N) for the N = P + R + C
    blocks; gates sit in attention layers with alt(layer_id, L), L = R·μ_bwd for looped models
    (layer ids: prelude i, core P + j, coda P + R·μ_rec + i) and L = N for fixed-depth ones.
    Block tables: prelude i, core P + j, coda P + R + i. A block uses a value embedding only
    when both its table and its gate exist; loopdyn builds only those.
    """
    if not config.value_embeds:
        return ValueEmbeddingLayout({}, frozenset(), frozenset())

    def alt(i: int, n: int) -> bool:
        return i % 2 == (n - 1) % 2

    P, R, C = config.n_prelude, config.n_core, config.n_coda
    N = P + R + C
    tables = frozenset(k for k in range(N) if alt(k, N))
    L = R * config.backprop_loops if config.looped else N
    blocks = [(f"prelude.{i}", i, i) for i in range(P)]
    blocks += [(f"core.{j}", P + j, P + j) for j in range(R)]
    blocks += [(f"coda.{i}", P + R * config.mean_loops + i, P + R + i) for i in range(C)]
    gated = frozenset(name for name, layer_id, _ in blocks if alt(layer_id, L))
    live = {name: key for name, _, key in blocks if name in gated and key in tables}
    return ValueEmbeddingLayout(live, tables, gated)


def block_sublayers(name: str, blk: Block, rope: torch.Tensor, ve: torch.Tensor | None = None) -> list[Sublayer]:
    """A block's two sublayers: pre-norm branches ("residual": x ← x + f(x)), or for a sandwich
    block the whole normalised sublayer ("map": x ← N(x + f(N'(x))))."""
    def attn(a):
        return blk.attn(blk.norm_1(a), rope, ve)

    def mlp(a):
        return blk.mlp(blk.norm_2(a))
    if blk.sandwich:
        return [Sublayer(f"{name}.attn", lambda z: blk.norm_3(z + attn(z)), "map"),
                Sublayer(f"{name}.mlp", lambda z: blk.norm_4(z + mlp(z)), "map")]
    return [Sublayer(f"{name}.attn", attn, "residual"), Sublayer(f"{name}.mlp", mlp, "residual")]


class LoopedLM(nn.Module):
    def __init__(self, config: LoopConfig):
        super().__init__()
        self.config = cfg = config
        d, ds = cfg.d_model, cfg.d_state
        self.ve_layout = value_embedding_layout(cfg).live
        kv_width = cfg.n_kv_heads * cfg.head_dim
        if any(name.startswith("core.") for name in self.ve_layout) and kv_width != ds:
            raise ConfigError(f"config '{cfg.name}': a core value embedding needs n_kv_heads·head_dim "
                              f"({kv_width}) == d_state ({ds})")

        def block(width, heads, kv_heads, mlp_width, name):
            return Block(width, heads, kv_heads, mlp_width, mlp=cfg.mlp, norm=cfg.norm, norm_eps=cfg.norm_eps,
                         kind=cfg.block, bias=cfg.bias, qk_norm=cfg.qk_norm, qk_bias=cfg.qk_bias,
                         clip_qkv=cfg.clip_qkv, value_gate=name in self.ve_layout)

        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.prelude = nn.ModuleList(block(d, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, f"prelude.{i}")
                                     for i in range(cfg.n_prelude))
        self.ln_prelude = make_norm(cfg.norm, d, cfg.norm_eps) if cfg.prelude_norm else None
        if cfg.looped:
            self.injection = make_injection(cfg.injection, ds, d, input_gain=cfg.input_gain, bias=cfg.bias)
            self.core = nn.ModuleList(block(ds, cfg.n_state_heads, cfg.n_state_heads, cfg.d_state_mlp, f"core.{j}")
                                      for j in range(cfg.n_core))
            self.state_tap = StateTap()
            self.readout = Linear(ds, d, bias=cfg.bias)  # C
        else:
            self.injection, self.core, self.state_tap, self.readout = None, nn.ModuleList(), None, None
        # autonomous loop: the state is renormalised at the end of every step, h ← Norm(core(h))
        self.state_norm = make_norm(cfg.norm, ds, cfg.norm_eps) if cfg.injection == "autonomous" else None
        if self.state_norm is not None:
            self.state_norm_kind = "post"  # h_{t+1} = Norm(core(h_t)): ‖h‖ cannot explode
        self.coda = nn.ModuleList(block(d, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, f"coda.{i}")
                                  for i in range(cfg.n_coda))
        self.ln_f = make_norm(cfg.norm, d, cfg.norm_eps)
        self.value_embeds = nn.ModuleDict({str(k): nn.Embedding(cfg.vocab_size, kv_width)
                                           for k in sorted(set(self.ve_layout.values()))})
        self.lm_head = Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # built on the meta device (a checkpoint load): the table is computed, never stored, so make it on the CPU
        meta = torch.empty(0).is_meta
        self.register_buffer("rope", rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base,
                                                device="cpu" if meta else None), persistent=False)
        self.reset_parameters()

    # ---- initialisation (official "scaled-zero" with orthogonal matrices) --------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Input projections, embeddings, readout and head: orthogonal with entry std
        sqrt(2/(5·width)); every output projection zero (each block starts as the identity);
        norm gains 1; value embeddings N(0, 1); injection per reference/paper-facts.md."""
        if any(p.is_meta for p in self.parameters()):
            return  # shapes only (e.g. counting parameters of a 1.3B model): nothing to fill
        cfg = self.config

        def scaled_orthogonal(w: torch.Tensor, width: int) -> None:
            std = math.sqrt(2 / (5 * width))
            nn.init.orthogonal_(w, gain=std * math.sqrt(max(w.shape)))

        stages = [(self.prelude, cfg.d_model), (self.core, cfg.d_state), (self.coda, cfg.d_model)]
        for blocks, width in stages:
            for blk in blocks:
                for lin in (blk.attn.c_q, blk.attn.c_k, blk.attn.c_v, blk.mlp.fc):
                    scaled_orthogonal(lin.weight, width)
                for lin in (blk.attn.c_proj, blk.mlp.proj):
                    lin.weight.zero_()
                for m in blk.modules():
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        m.bias.zero_()
                    if isinstance(m, nn.LayerNorm):
                        m.reset_parameters()
                    if hasattr(m, "weight") and type(m).__name__ == "RMSNorm":
                        m.weight.fill_(1.0)
                if blk.attn.qk_bias is not None:
                    blk.attn.qk_bias.zero_()
                if blk.attn.ve_gate is not None:
                    blk.attn.ve_gate.reset_parameters()
        scaled_orthogonal(self.wte.weight, cfg.d_model)
        if not cfg.tie_embeddings:
            scaled_orthogonal(self.lm_head.weight, cfg.d_model)
        for norm in (self.ln_prelude, self.ln_f, self.state_norm):
            if norm is not None:
                norm.reset_parameters() if isinstance(norm, nn.LayerNorm) else norm.weight.fill_(1.0)
        for table in self.value_embeds.values():
            nn.init.normal_(table.weight)
        if cfg.looped:
            self.injection.reset_parameters()
            scaled_orthogonal(self.readout.weight, cfg.d_model)
            if self.readout.bias is not None:
                self.readout.bias.zero_()

    # ---- the pieces of the loop --------------------------------------------------------
    def _check_input(self, idx: torch.Tensor) -> None:
        # the range check reads values, which would sync an accelerator: it runs on the CPU only
        check_tokens(idx, "idx", self.config.vocab_size, self.config.block_size)

    def _ve(self, block_name: str, idx: torch.Tensor) -> torch.Tensor | None:
        key = self.ve_layout.get(block_name)
        return None if key is None else self.value_embeds[str(key)](idx)

    def encode(self, idx: torch.Tensor) -> LoopContext:
        """Prelude and prelude norm: the injected input e and the loop's fixed context."""
        self._check_input(idx)
        S = idx.shape[1]
        rope = self.rope[:S]
        x = self.wte(idx)
        if self.config.emb_scale != 1.0:
            x = x * self.config.emb_scale
        for i, blk in enumerate(self.prelude):
            x = blk(x, rope, self._ve(f"prelude.{i}", idx))
        if self.ln_prelude is not None:
            x = self.ln_prelude(x)
        core_ve = [self._ve(f"core.{j}", idx) for j in range(len(self.core))]
        return LoopContext(idx=idx, e=x, rope=rope, core_ve=core_ve)

    def _require_loop(self) -> None:
        if not self.config.looped:
            raise ConfigError(f"model '{self.config.name}' is fixed-depth (injection='fixed'): it has no loop")

    def init_state(self, ctx: LoopContext, generator: torch.Generator | None = None) -> torch.Tensor:
        """h_0 of shape (B, S, ds). Random kinds use the global RNG in training mode and a fixed
        seed in eval mode (so eval is deterministic), unless a generator is given. The autonomous
        loop has no other access to the input, so it starts from the prelude output, h_0 = e (as
        Ouro starts from the embeddings), whatever `state_init` says."""
        self._require_loop()
        cfg = self.config
        if cfg.injection == "autonomous":
            return self.state_tap(ctx.e)
        shape = (*ctx.e.shape[:-1], cfg.d_state)
        kind = cfg.state_init
        if kind == "zero":
            h = torch.zeros(shape, dtype=ctx.e.dtype, device=ctx.e.device)
            return self.state_tap(h)
        if generator is None and not self.training:
            generator = torch.Generator().manual_seed(0)
        h = torch.empty(shape, dtype=torch.float32)  # drawn on the CPU: same numbers on every device
        if kind == "like-init":
            std = math.sqrt(2 / (5 * cfg.d_model))
            nn.init.trunc_normal_(h, std=std, a=-3 * std, b=3 * std, generator=generator)
            h = h * cfg.emb_scale
        else:
            h.normal_(generator=generator)
            if kind == "embed":
                h = h / math.sqrt(cfg.d_model)
            elif kind == "unit":
                h = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8)
        return self.state_tap(h.to(device=ctx.e.device, dtype=ctx.e.dtype))

    def _step_fn(self, ctx: LoopContext, hoist: bool = False):
        """The loop step F(h) = Tap(Norm?(R(inject(h, e)))), written once: `step`,
        `pre_norm_state` and the training/eval loops all call it.

        F accepts the first m sequences h[:m] of the batch, (m, S, ds) -> (m, S, ds), m ≤ B (it
        then uses the first m rows of e and of the value embeddings), which the per-sequence depth
        loop uses to run only the sequences still active. hoist (the loop's fast path): the
        injection's h-independent part B̄e is computed once, here, instead of once per call
        (`injection.split`, where it exists and no hook watches the injection); bit for bit the
        same numbers as computing it in every call. Returns (F, pre), pre = F without the final
        state norm and tap.
        """
        self._require_loop()
        inj, e, rope, core = self.injection, ctx.e, ctx.rope, list(zip(self.core, ctx.core_ve))
        B = e.shape[0]

        def rows(t, m):  # the first m sequences of a per-sequence tensor
            return t if t is None or m == B else t[:m]

        if hoist and hasattr(inj, "split") and not watched(inj):
            state_map, drive = inj.split(e)  # inj(h, e) = state_map(h) + drive, bit for bit

            def inject(h, m):
                return state_map(h) + rows(drive, m)
        else:  # e.g. the linear injection: its one matmul over [h, e] cannot be split bit for bit
            def inject(h, m):
                return inj(h, rows(e, m))

        def pre(h: torch.Tensor) -> torch.Tensor:  # R(inject(h, e)), (m, S, ds) -> (m, S, ds)
            m = h.shape[0]
            u = inject(h, m)
            for blk, ve in core:
                u = blk(u, rope, rows(ve, m))
            return u

        def step(h: torch.Tensor) -> torch.Tensor:
            u = pre(h)
            if self.state_norm is not None:  # the autonomous loop renormalises its state
                u = self.state_norm(u)
            return self.state_tap(u)
        return step, pre

    def pre_norm_state(self, h: torch.Tensor, ctx: LoopContext) -> torch.Tensor:
        """R(inject(h, e)): the step before its final renormalisation (only the autonomous loop
        renormalises, h_{t+1} = Norm(R(h_t)); for the other kinds this is the step itself)."""
        return self._step_fn(ctx)[1](h)

    def renormalise(self, r: torch.Tensor, ctx: LoopContext) -> torch.Tensor:
        """The step's end, step = renormalise ∘ pre_norm_state: Tap(Norm(r)) (autonomous), Tap(r)."""
        return self.state_tap(self.state_norm(r) if self.state_norm is not None else r)

    def step(self, h: torch.Tensor, ctx: LoopContext) -> torch.Tensor:
        """One loop iteration h_{t+1} = R(inject(h_t, e)) (autonomous: Norm(R(h_t))), a pure
        function of h for fixed ctx."""
        return self._step_fn(ctx)[0](h)

    def decode(self, h: torch.Tensor, ctx: LoopContext) -> torch.Tensor:
        """Readout C, coda, final norm, head: float32 logits (B, S, V)."""
        idx, rope = ctx.idx, ctx.rope
        y = self.readout(h) if self.readout is not None else h
        for i, blk in enumerate(self.coda):
            y = blk(y, rope, self._ve(f"coda.{i}", idx))
        logits = self.lm_head(self.ln_f(y)).float()
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        if self.config.logit_softcap is not None:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    def unroll(self, idx: torch.Tensor, n_loops: int | None = None) -> tuple[list[torch.Tensor], LoopContext]:
        """All states h_0 … h_T (T = n_loops, default μ_rec) and the context."""
        n_loops = self._loop_count(n_loops)
        ctx = self.encode(idx)
        states = [self.init_state(ctx)]
        for _ in range(n_loops):
            states.append(self.step(states[-1], ctx))
        return states, ctx

    # ---- the rest of the LoopedModel protocol (models/protocol.py) ------------------------
    state_norm_kind = "none"  # pre-norm core: the state itself is never renormalised
    checkpoint_format = "loopdyn"  # the format `save` writes (reports say where a model came from)

    @property
    def mean_loops(self) -> int:
        """μ_rec, the trained depth; 0 for a fixed-depth model (it has no loop)."""
        return self.config.mean_loops if self.config.looped else 0

    name = config_field("name")
    injection_name = config_field("injection")
    vocab_size = config_field("vocab_size")
    max_seq_len = config_field("block_size")

    def linear_part(self) -> LinearPart | None:
        """(Ā, B̄, bias) of the injection as structured operators; None for the autonomous loop
        (no injection: the whole step is nonlinear, there is no LTI part)."""
        self._require_loop()
        return self.injection.linear_part()

    def readout_part(self) -> DenseOperator:
        """C, the linear readout from the state (ds) to the coda's width (d)."""
        self._require_loop()
        return DenseOperator(self.readout.weight.detach())

    def sublayers(self, ctx: LoopContext) -> list[Sublayer]:
        """The step as a composition: the injection h ↦ u, then per core block its attention and
        MLP branches ("residual": x ← x + f(x)), or for sandwich blocks the whole normalised
        sublayer ("map": x ← N(x + f(N'(x))))."""
        self._require_loop()
        out = [] if self.config.injection == "autonomous" else [
            Sublayer("injection", lambda h: self.injection(h, ctx.e), "injection")]
        for j, (blk, ve) in enumerate(zip(self.core, ctx.core_ve)):
            out += block_sublayers(f"core.{j}", blk, ctx.rope, ve)
        if self.state_norm is not None:
            out.append(Sublayer("state_norm", self.state_norm, "map"))
        return out

    # ---- depth sampling and forward ----------------------------------------------------
    def _loop_count(self, n_loops: int | None) -> int:
        self._require_loop()
        n = self.config.mean_loops if n_loops is None else n_loops
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n_loops must be a non-negative integer, got {n_loops!r}")
        return n

    def sample_depths(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence (n_no_grad, k_grad), each (batch,) int64 on the CPU.

        poisson: T = max(Poisson(μ_rec), 1), k = min(T, μ_bwd), n = T − k (the official
        per-sequence 'poisson-truncated-full' scheme). fixed: T = μ_rec for every sequence.
        """
        cfg = self.config
        if cfg.depth_sampling == "poisson":
            rate = torch.full((batch,), float(cfg.mean_loops))
            total = torch.poisson(rate, generator=generator).long().clamp_min(1)
        else:
            total = torch.full((batch,), cfg.mean_loops, dtype=torch.long)
        k = total.clamp_max(cfg.backprop_loops)
        return total - k, k

    def _loop_fn(self, ctx: LoopContext):
        """F(h) for the loops of one forward pass: `_step_fn` with B̄e hoisted out of the loop on
        the fast path (`fast_paths(False)`: as in `step`). Both give the same numbers as `step`
        bit for bit on the full batch."""
        return self._step_fn(ctx, hoist=fast_paths_enabled())[0]

    def _run_sampled(self, h: torch.Tensor, ctx: LoopContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training loop with per-sequence depths: max(n) loops without gradients, then max(k)
        with; sequence b is updated in its first n_b and first k_b of them and held otherwise
        (the same as running it alone for n_b + k_b loops)."""
        n, k = self.sample_depths(h.shape[0])
        if fast_paths_enabled():
            out = self._run_sorted(h, ctx, n, k)
            if out is not None:
                return out
        return self._run_masked(h, ctx, n, k)

    def _run_masked(self, h: torch.Tensor, ctx: LoopContext, n: torch.Tensor, k: torch.Tensor):
        """The plain per-sequence loop (the official scheme): every loop steps the whole batch
        and torch.where keeps the held sequences' states."""
        n_max, k_max = int(n.max()), int(k.max())
        n, k = n.to(h.device), k.to(h.device)
        prev = h
        with torch.no_grad():
            for i in range(n_max):
                active = (i < n).view(-1, 1, 1)
                # a held sequence keeps its own h_{T-1} as prev, not its h_T
                prev, h = torch.where(active, h, prev), torch.where(active, self.step(h, ctx), h)
        h = h.detach()
        for i in range(k_max):
            active = (i < k).view(-1, 1, 1)
            prev, h = torch.where(active, h, prev), torch.where(active, self.step(h, ctx), h)
        return h, prev, n + k

    def _run_sorted(self, h: torch.Tensor, ctx: LoopContext, n: torch.Tensor, k: torch.Tensor):
        """The same loop, stepping only the sequences that are active.

        Sequences are ordered by (n, k) descending, so that at every loop the active ones are a
        prefix h[:m] of the batch: a loop steps h[:m] and leaves h[m:] as it is (no masks, no
        work for held sequences; with equal depths, m = B and nothing is copied). Returns None
        when the two phases' active sets are not nested this way (the caller then masks).
        """
        B = h.shape[0]
        order = torch.argsort(n * (int(k.max()) + 1) + k, descending=True, stable=True)
        n_sorted, k_sorted = n[order], k[order]
        if B > 1 and not bool((k_sorted[1:] <= k_sorted[:-1]).all()):
            return None
        permuted = not bool((order == torch.arange(B)).all())
        if permuted:
            o = order.to(h.device)
            h = h.index_select(0, o)
            ctx = LoopContext(idx=ctx.idx.index_select(0, o), e=ctx.e.index_select(0, o), rope=ctx.rope,
                              core_ve=[None if ve is None else ve.index_select(0, o) for ve in ctx.core_ve])
        loop_fn = self._loop_fn(ctx)

        def advance(h, prev, m):  # active sequences h[:m]: prev ← h, h ← F(h); the rest held
            if m == B:
                return h, loop_fn(h)
            return torch.cat([h[:m], prev[m:]]), torch.cat([loop_fn(h[:m]), h[m:]])

        prev = h
        with torch.no_grad():
            for i in range(int(n.max())):
                prev, h = advance(h, prev, int((n_sorted > i).sum()))
        h = h.detach()
        for i in range(int(k.max())):
            prev, h = advance(h, prev, int((k_sorted > i).sum()))
        if permuted:
            inverse = torch.argsort(order).to(h.device)
            h, prev = h.index_select(0, inverse), prev.index_select(0, inverse)
        return h, prev, (n + k).to(h.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, n_loops: int | None = None) -> LMOutput:
        ctx = self.encode(idx)
        if not self.config.looped:
            logits = self.decode(ctx.e, ctx)
            state = prev = loops = None
        elif self.training and n_loops is None:
            state, prev, loops = self._run_sampled(self.init_state(ctx), ctx)
            logits = self.decode(state, ctx)
        else:
            T = self._loop_count(n_loops)
            state = prev = self.init_state(ctx)
            loop_fn = self._loop_fn(ctx)
            for _ in range(T):
                prev, state = state, loop_fn(state)
            logits = self.decode(state, ctx)
            loops = torch.full((idx.shape[0],), T, dtype=torch.long, device=idx.device)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, state=state, prev_state=prev, n_loops=loops)

    # ---- bookkeeping ---------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once; `models.sizes.count_params`)."""
        skip = [self.wte.weight, self.lm_head.weight, *(t.weight for t in self.value_embeds.values())]
        return count_params(self.parameters(), exclude=skip if exclude_embeddings else ())
