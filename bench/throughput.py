"""Training and forward throughput of loopdyn's looped model, side by side with the plain path
and, when it is importable, the official Parcae code.

Setup (issue 15): the `small` preset (width 256, 2 + 2 + 2 blocks, 4 heads, ReLU², value
embeddings), 8 loops with gradients through the last 4, batch 8 × 128, 2 threads, CPU. One
training step = forward, cross-entropy, backward, AdamW step; one forward = eval mode, no
gradients, 8 loops. Depth schedules: `fixed` (every sequence 4 loops without + 4 with
gradients) and `poisson` (per sequence T = max(Poisson(8), 1), the last min(T, 4) with
gradients: the official per-sequence scheme).

Contestants, all built from the same weights:

* `fast`     loopdyn as shipped (models.layers fast paths on: linear layers through oneDNN,
             one QKV product, closed-form RMS-norm backward, explicit attention when a
             gradient is taken and fused SDPA otherwise, B̄e once per forward, only the active
             sequences stepped);
* `plain`    loopdyn with `fast_paths(False)`: the masked per-sequence loop, fused SDPA, the
             injection on every loop, F.linear (MKL): the code that issue 15 measured at
             0.91–0.95× the official training step;
* `official` the official implementation (`import parcae_lm`, or --official PATH to its
             source): the same architecture (built with `parcae_lm.create_config`, saved with
             `save_pretrained`, loaded into loopdyn through the official-format importer, so
             both hold the same weights) and the same schedule (`recurrent_iteration_method
             = per-sequence`, sampling `fixed` / `poisson-truncated-full`; its `step` counter,
             which seeds its depth draws, advances every training step as in its training
             script). Before timing, the bench prints the max |logit difference| between the
             official model and loopdyn's import of it (eval, same h_0). Skipped, with the
             reason, when the package has no code (the PyPI `parcae-lm` 0.1.0 wheel ships
             only metadata).

The machine is shared, so timings are interleaved: each repeat runs a few steps of every
contestant back to back, in an order that rotates between repeats, and each repeat gives one
ratio per pair (per-step median time of the other ÷ that of `fast`). Printed: min / median /
max of the ratios over the repeats (> 1: `fast` is faster).

    python bench/throughput.py [--repeats 9 --steps 3 --batch 8 --seq 128 --threads 2]
                               [--sampling fixed,poisson] [--official PATH] [--twin] [--compile]

--twin adds the looped-vs-fixed-depth-twin comparison (same forward FLOPs).

--compile adds the fast model under torch.compile (inductor, default mode) as a contestant; its
compilation (the first training step and forward) is timed and printed, not counted. Code that
torch.compile traces takes the plain path, which inductor fuses itself, with the linear layers
on oneDNN through the custom operator loopdyn::onednn_linear (inductor cannot lower oneDNN's own
op with weights that are not constants).
Ends with: RESULT throughput train_vs_plain=<median> forward_vs_plain=<median> ...
"""
from __future__ import annotations

import os

# OpenMP workers that spin while waiting for work starve each other on a shared machine (a
# 2-thread training step measured 25–40 s instead of 0.85 s at load 12): let them sleep. Set
# before torch is imported (and inherited by child processes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import torch

from loopdyn.models import LoopConfig, LoopedLM, load
from loopdyn.models.kernels import fast_paths


# ---- contestants ---------------------------------------------------------------------------------

class Contestant:
    """A model plus how to run one training step and one forward on (x, y)."""

    def __init__(self, name: str, model, train_fn, forward_fn):
        self.name, self.model, self._train, self._forward = name, model, train_fn, forward_fn
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(self, x, y) -> float:
        self.model.train()
        t = time.perf_counter()
        loss = self._train(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t

    def forward(self, x, y) -> float:
        self.model.eval()
        t = time.perf_counter()
        with torch.no_grad():
            self._forward(x)
        return time.perf_counter() - t


def loopdyn_contestant(name: str, model: LoopedLM, fast: bool, loops: int) -> Contestant:
    def train(x, y):
        with fast_paths(fast):
            return model(x, y).loss

    def forward(x):
        with fast_paths(fast):
            return model(x, n_loops=loops).logits

    return Contestant(name, model, train, forward)


def compiled_contestant(model: LoopedLM, loops: int, batches) -> Contestant:
    """A copy of `model` under torch.compile (inductor, default mode), fast paths on. The first
    training step and forward (the compilation) are timed and printed, not counted."""
    twin = LoopedLM(model.config)
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin)
    c = Contestant("compiled", twin, lambda x, y: compiled(x, y).loss, lambda x: compiled(x, n_loops=loops).logits)
    for kind in ("train_step", "forward"):
        t = time.perf_counter()
        getattr(c, kind)(*batches[0])
        print(f"torch.compile: first {kind} (compiling) {time.perf_counter() - t:.0f} s")
    return c


def official_module(path: str | None):
    """(parcae_lm, None) or (None, why it is unavailable)."""
    if path:
        sys.path.insert(0, path)
    try:
        import parcae_lm
    except ImportError as err:
        return None, f"not importable ({err}); `pip install parcae-lm` or --official PATH"
    if not hasattr(parcae_lm, "create_config"):
        return None, "the installed parcae_lm has no create_config (the PyPI 0.1.0 wheel ships no code)"
    return parcae_lm, None


def official_contestant(parcae_lm, cfg: LoopConfig, sampling: str, loops: int):
    """The official model with loopdyn's `small` architecture and `sampling`, and a loopdyn
    model holding the same weights (through the official-format importer)."""
    base = parcae_lm.create_config("parcae-small-140m")
    ocfg = dataclasses.replace(
        base, n_embd=cfg.d_model, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.d_mlp, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size,
        block_size=cfg.block_size, n_layers_in_prelude=cfg.n_prelude, n_layers_in_recurrent_block=cfg.n_core,
        n_layers_in_coda=cfg.n_coda, recurrent_embedding_dimension=cfg.d_state,
        recurrent_intermediation_embedding_dimension=cfg.d_state_mlp, recurrent_num_attention_heads=cfg.n_state_heads,
        mean_recurrence=cfg.mean_loops, mean_backprop_depth=cfg.backprop_loops,
        recurrent_iteration_method="per-sequence",
        sampling_scheme="fixed" if sampling == "fixed" else "poisson-truncated-full")
    model = ocfg.construct_model()
    perturb_projections(model.named_parameters())
    with tempfile.TemporaryDirectory() as tmp:
        parcae_lm.save_pretrained(model, os.path.join(tmp, "official"))
        ours = load(os.path.join(tmp, "official"))
    pair = torch.tensor([loops, 0])

    def train(x, y):
        # The official sampler seeds its depth draws from a constant + model.step; its training
        # script advances `step`, so fresh depths every step (else the same draw forever).
        model.step += 1
        return model(x, labels=y)["loss"]

    def forward(x):
        return model(x, num_steps_pair=pair, return_logits=True)["logits"]

    return Contestant("official", model, train, forward), ours


def parity(official: Contestant, ours: LoopedLM, batch: torch.Tensor, loops: int) -> float:
    """Max |logit difference| between the official model and loopdyn's import of it, in eval
    mode with `loops` loops, both starting from loopdyn's h_0 (the official draws its random
    h_0 from the global RNG inside `initialize_state`; the bench hands it ours instead)."""
    model = official.model
    model.eval(), ours.eval()
    with torch.no_grad():
        ctx = ours.encode(batch)
        h0 = ours.init_state(ctx)
        model.initialize_state = lambda e: h0.clone()
        try:
            theirs = model(batch, num_steps_pair=torch.tensor([loops, 0]), return_logits=True)["logits"]
        finally:
            del model.initialize_state
        return float((ours(batch, n_loops=loops).logits - theirs).abs().max())


def perturb_projections(named_parameters) -> None:
    """Output projections N(0, 0.02²) (the official init makes them zero: every block the
    identity), the same draws for either implementation's names (same order of blocks)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in named_parameters:
            if name.endswith(("attn.c_proj.weight", "mlp.proj.weight")):
                p.normal_(0, 0.02, generator=g)


# ---- interleaved measurement -----------------------------------------------------------------------

def interleaved(contestants: list[Contestant], kind: str, batches, repeats: int, steps: int) -> dict:
    """Per repeat, `steps` steps of each contestant back to back (rotating order); returns the
    per-repeat median step times {name: [seconds per repeat]}."""
    times = {c.name: [] for c in contestants}
    for c in contestants:  # warm-up
        for x, y in batches[:2]:
            getattr(c, kind)(x, y)
    for r in range(repeats):
        order = contestants[r % len(contestants):] + contestants[: r % len(contestants)]
        for c in order:
            torch.manual_seed(r)  # the same h_0 and depth draws for every loopdyn contestant
            per_step = [getattr(c, kind)(*batches[(r * steps + i) % len(batches)]) for i in range(steps)]
            times[c.name].append(statistics.median(per_step))
    return times


def ratio_summary(times: dict, other: str, ref: str = "fast") -> tuple[float, float, float]:
    ratios = sorted(a / b for a, b in zip(times[other], times[ref]))
    return ratios[0], statistics.median(ratios), ratios[-1]


def compare_twin(preset: str, batches, args) -> float:
    """Looped model vs its fixed-depth twin with the same forward FLOPs: tokens/s ratio."""
    torch.manual_seed(0)
    cfg = LoopConfig.preset(preset)
    looped = loopdyn_contestant("looped", LoopedLM(cfg), True, cfg.mean_loops)
    twin_model = LoopedLM(cfg.fixed_depth_twin("flops"))
    twin = Contestant("twin", twin_model, lambda x, y: twin_model(x, y).loss, lambda x: twin_model(x).logits)
    times = interleaved([looped, twin], "train_step", batches, args.repeats, args.steps)
    lo, med, hi = ratio_summary(times, "twin", "looped")
    print(f"twin ({preset}, {twin_model.config.n_prelude} blocks): looped/twin tokens/s min {lo:.2f} "
          f"median {med:.2f} max {hi:.2f}")
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=3, help="steps per contestant per repeat")
    p.add_argument("--sampling", default="fixed,poisson")
    p.add_argument("--official", default=None, metavar="PATH", help="folder holding the parcae_lm package")
    p.add_argument("--twin", action="store_true", help="also compare with the fixed-depth twin")
    p.add_argument("--compile", action="store_true",
                   help="also time the fast model under torch.compile (inductor; compiling takes minutes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parcae_lm, why = official_module(args.official)
    from loopdyn.data import load_text

    data = load_text()
    g = torch.Generator().manual_seed(0)
    batches = [data.batch(args.batch, args.seq, g) for _ in range(8)]
    print(f"preset {args.preset}, batch {args.batch} × {args.seq} tokens, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats × {args.steps} steps per contestant; ratios = other's step time ÷ fast's")
    if parcae_lm is None:
        print(f"official: skipped: {why}")
    fields = []
    for sampling in args.sampling.split(","):
        torch.manual_seed(0)
        cfg = LoopConfig.preset(args.preset, depth_sampling=sampling)
        loops = cfg.mean_loops
        official = None
        if parcae_lm is not None:
            official, model = official_contestant(parcae_lm, cfg, sampling, loops)
        else:
            model = LoopedLM(cfg)
            perturb_projections(model.named_parameters())
        plain_model = LoopedLM(model.config)
        plain_model.load_state_dict(model.state_dict())
        contestants = [loopdyn_contestant("fast", model, True, loops),
                       loopdyn_contestant("plain", plain_model, False, loops)]
        if args.compile:
            contestants.append(compiled_contestant(model, loops, batches))
        if official is not None:
            contestants.append(official)
            diff = parity(official, model, batches[0][0], loops)
            with fast_paths(False):
                diff_plain = parity(official, model, batches[0][0], loops)
            print(f"[{sampling}] parity: max |logit(loopdyn) − logit(official)| = {diff:.2e} fast path, "
                  f"{diff_plain:.2e} plain path ({loops} loops, eval, same h_0)")
            fields.append(f"parity_{sampling}={diff:.1e}")
            fields.append(f"parity_plain_{sampling}={diff_plain:.1e}")
        for kind, label in (("train_step", "train"), ("forward", "forward")):
            times = interleaved(contestants, kind, batches, args.repeats, args.steps)
            tokens = args.batch * args.seq
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"[{sampling}] {label:7s} " + "  ".join(f"{k} {tokens / v:8,.0f} tok/s" for k, v in med.items()))
            for other in [c.name for c in contestants if c.name != "fast"]:
                lo, m, hi = ratio_summary(times, other)
                print(f"[{sampling}] {label:7s} fast vs {other:8s}: speed-up min {lo:.2f} median {m:.2f} max {hi:.2f}")
                fields.append(f"{label}_vs_{other}_{sampling}={m:.2f}")
                fields.append(f"{label}_vs_{other}_{sampling}_min={lo:.2f}")
    if args.twin:
        fields.append(f"looped_vs_twin={compare_twin(args.preset, batches, args):.2f}")
    if parcae_lm is None:
        fields.append("official=unavailable")
    print("RESULT throughput " + " ".join(fields))


if __name__ == "__main__":
    main()
