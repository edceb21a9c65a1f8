"""The framework's cost per operator call, measured on a narrow twin of the model (`plan --measure`).

A replayed operator call (costmodel.measure_kernels) times the kernel and a bare dispatch, not
what the model's own code adds around it: module calls, Python autograd Functions (loopdyn's
oneDNN linear and fused RMSNorm), autograd's graph and engine, the copies a custom backward makes.
That cost is per call and does not grow with the width, so it is measured on a twin of the
model that keeps its code, layers, loops, precision, batch and sequence length but has width 64
(and a 256-token vocabulary), where almost all of a pass is that cost:

    c_fwd  = (t_real(forward) − Σ_calls t_replay) / n_calls      (no-grad passes)
    c_grad = (t_real(training step) − Σ_calls t_replay) / n_calls  (passes with gradients)

in seconds per call, each ≥ 0, t_real the best of several timed passes on the CPU.
"""
from __future__ import annotations

import dataclasses
import time

import torch

WIDTH = 64
VOCAB = 256


def twin_config(config, family: str):
    """The model's config at width WIDTH: heads of 32 channels (grouped KV heads stay grouped),
    a 4·WIDTH MLP, vocabulary VOCAB; layers, loops and everything else as they are."""
    if family == "huginn":
        return dataclasses.replace(config, n_embd=WIDTH, n_heads=2, intermediate_size=2 * WIDTH,
                                   vocab_size=VOCAB)
    if family == "ouro":
        grouped = config.num_key_value_heads < config.num_attention_heads
        return dataclasses.replace(config, hidden_size=WIDTH, num_attention_heads=2, head_dim=WIDTH // 2,
                                   num_key_value_heads=1 if grouped else 2, intermediate_size=2 * WIDTH,
                                   vocab_size=VOCAB)
    grouped = config.n_kv_heads is not None and config.n_kv_heads < config.n_heads
    kv = 1 if grouped else 2
    over = dict(d_model=WIDTH, n_heads=2, n_kv_heads=kv, vocab_size=VOCAB,
                d_mlp=None if config.d_mlp is None else 4 * WIDTH)
    if config.d_state is not None:  # heads of 32 channels; a core value embedding is n_kv·32 = d_state
        heads = kv if config.value_embeds else 2
        over.update(d_state=32 * heads, n_state_heads=None if config.n_state_heads is None else heads,
                    d_state_mlp=None if config.d_state_mlp is None else 4 * WIDTH)
    return config.replace(**over)


def _best(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def training_loss(model, idx, k: int) -> torch.Tensor:
    """The loss of a training step with gradients through k loops (next-token cross-entropy on
    `idx` itself, float32): the step `plan` traces and the twin runs. The pass's tensors are freed
    on return, as in a training loop, before the backward pass."""
    import torch.nn.functional as F

    from loopdyn.models import protocol

    ctx = model.encode(idx)
    h = protocol.initial_state(model, ctx)
    for _ in range(k):
        h = model.step(h, ctx)
    logits = model.decode(h, ctx)  # (B, S, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())


def real_pass_seconds(model, prec, batch: int, seq_len: int, loops: int, k: int) -> tuple[float, float]:
    """(forward at `loops` loops, a training step through k of them: forward, loss, backward,
    AdamW) on the CPU, best of 7 and of 5 after a warm-up, seconds (a twin's pass takes
    milliseconds: the repeats make the calibration steady, not slow)."""
    from loopdyn.models import protocol

    idx = torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    model.eval()

    def forward():
        with torch.no_grad(), prec.context("cpu"):
            ctx = model.encode(idx)
            h = protocol.initial_state(model, ctx)
            for _ in range(loops):
                h = model.step(h, ctx)
            model.decode(h, ctx)

    fwd = _best(forward, reps=7)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with prec.context("cpu"):
            loss = training_loss(model, idx, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return fwd, _best(step, reps=5)


def call_overheads(twin_plan, twin_model, prec, seconds: float = 1.0) -> tuple[float, float]:
    """(c_fwd, c_grad) seconds per call (module docstring) from the twin's Plan (traced on meta)
    and the same twin built on the CPU."""
    from loopdyn.scaling.costmodel import Device, measure_kernels

    sigs = [sig for p in twin_plan.passes.values() for sig in p.kernels]
    device = Device(float("inf"), float("inf"), "twin", 0.0, kernel_seconds=measure_kernels(sigs, seconds))
    loops, k = 2, 2
    real_fwd, real_step = real_pass_seconds(twin_model, prec, twin_plan.batch, twin_plan.seq_len, loops, k)
    twin_plan.device = device
    ps = twin_plan.passes
    n_fwd = ps["prelude"].ops + loops * ps["loop"].ops + ps["coda"].ops
    n_step = ps["train_base"].ops + (k - 1) * ps["train_loop"].ops + ps["optimizer"].ops
    c_fwd = max(real_fwd - twin_plan.forward_seconds(loops), 0.0) / max(n_fwd, 1)
    c_grad = max(real_step - twin_plan.training_seconds(loops, k), 0.0) / max(n_step, 1)
    return c_fwd, c_grad
