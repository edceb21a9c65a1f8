"""What would it cost to audit the real Huginn-0125 and Ouro-1.4B / 2.6B? Nothing is downloaded.

1. The official configurations are built on the `meta` device: exact parameter counts and the
   bytes of their weights in bfloat16 (as shipped) and float32 (as loopdyn computes by default).
2. Models of the same shape but smaller width (Huginn: P/R/C = 2/4/2, head size 96,
   I = 3.39·d, vocab 65536; Ouro: 24 layers, head size 128, I = 2.75·d, vocab 49152) get random
   weights and a full `loopdyn.dynamics.audit` at the real models' loop counts (Huginn μ_rec = 32,
   Ouro T = 4; horizon 4·T), each in a fresh process (peak RSS is per run), sizes interleaved
   over the repeats; the minimum CPU time per size is kept (one thread).
3. The audit time is fitted as t = a + b·F, F = forward FLOPs of one loop step for the probe
   (2·core parameters·tokens + attention 4·S²·d per core layer), and extrapolated to the real
   width; peak RSS as m = c + k·(weight bytes), extrapolated likewise. Larger matrices run at
   higher FLOP rates on a CPU, so the time extrapolation errs high.

    python bench/import_audit_cost.py [--seq-len 64] [--repeats 2]

Needs the protocol-based dynamics (an audit of a HuginnLM / OuroLM).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

HUGINN_WIDTHS = (192, 288, 384)
OURO_WIDTHS = (128, 256, 512)
PROBE_TOKENS = 256  # `loopdyn audit`'s default probe length (DEFAULT_SEQ_LEN)


def huginn_config(d: int | None = None):
    from loopdyn.models.importers.huginn import HuginnConfig
    cfg = HuginnConfig.huginn_0125()
    if d is None:
        return cfg
    return HuginnConfig(name=f"huginn-d{d}", n_embd=d, n_heads=d // 96, intermediate_size=round(d * 17920 / 5280),
                        block_size=cfg.block_size)


def ouro_config(d: int | None = None, layers: int = 24):
    from loopdyn.models.importers.ouro import OuroConfig
    if d is None:
        return OuroConfig.ouro_1_4b() if layers == 24 else OuroConfig.ouro_2_6b()
    return OuroConfig(name=f"ouro-d{d}", hidden_size=d, num_attention_heads=d // 128, num_key_value_heads=d // 128,
                      intermediate_size=round(d * 5632 / 2048), num_hidden_layers=layers)


def build(family: str, d: int | None, layers: int = 24, device: str = "cpu"):
    """The model on `device`; on the CPU it is built on meta and filled in place, as `load` does
    (no construction transients in the peak memory): N(0, 1) embeddings, N(0, 1/fan_in) linears,
    unit norms, RoPE recomputed, a tied head re-tied."""
    from loopdyn.models.importers.huginn import HuginnLM
    from loopdyn.models.layers import rope_table
    from loopdyn.models.importers.ouro import OuroLM
    with torch.device("meta"):
        model = HuginnLM(huginn_config(d)) if family == "huginn" else OuroLM(ouro_config(d, layers))
    if device == "meta":
        return model
    model.to_empty(device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "bias" not in name:
                p.fill_(1.0)
            elif "embed" in name or name.startswith("wte"):
                p.normal_(generator=g)
            else:
                p.normal_(generator=g).mul_(p.shape[-1] ** -0.5)
    if family == "huginn":
        model.lm_head.weight = model.wte.weight
        cfg = model.config
        model.rope = rope_table(cfg.block_size, cfg.head_dim, cfg.rope_base)
    return model


def step_flops(family: str, d: int, S: int) -> float:
    """Forward FLOPs of one loop step over S tokens: 2·(matmul parameters)·S + causal attention."""
    if family == "huginn":
        cfg = huginn_config(d)
        per_layer = 4 * d * d + 3 * d * cfg.intermediate_size
        return 2.0 * (4 * per_layer + 2 * d * d) * S + 4 * 2.0 * S * S * d  # 4 core layers; adapter 2d²
    cfg = ouro_config(d)
    per_layer = 4 * d * d + 3 * d * cfg.intermediate_size
    return 2.0 * 24 * per_layer * S + 24 * 2.0 * S * S * d  # causal q·k and a·v: 2·S²·d per layer


def one(family: str, d: int, S: int) -> dict:
    """Audit one random-weight model; runs in its own process."""
    torch.set_num_threads(1)
    from loopdyn.dynamics import audit

    model = build(family, d).eval()
    idx = torch.randint(0, model.vocab_size, (1, S), generator=torch.Generator().manual_seed(0))
    loops = model.mean_loops
    start, cpu = time.perf_counter(), time.process_time()
    report = audit(model, idx, loops=loops, horizon=4 * loops)
    # one thread: CPU time is the audit's cost, robust to other processes sharing the cores
    seconds, wall = time.process_time() - cpu, time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return dict(family=family, d=d, seconds=seconds, wall=wall, loops=loops, tokens=S, verdict=report.verdict,
                weight_bytes=weight_bytes, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("FAMILY", "D"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.seq_len)))
        return

    real = {}
    for name, family, layers in (("huginn-0125", "huginn", 24), ("ouro-1.4b", "ouro", 24), ("ouro-2.6b", "ouro", 48)):
        start = time.perf_counter()
        model = build(family, None, layers, device="meta")
        n = model.num_params()
        real[name] = dict(params=n, build_s=time.perf_counter() - start, bf16_gb=2 * n / 1e9, fp32_gb=4 * n / 1e9,
                          d=model.config.n_embd if family == "huginn" else model.config.hidden_size, family=family,
                          layers=layers)
        print(f"{name}: {n:,} parameters (built on meta in {real[name]['build_s']:.2f} s); weights "
              f"{real[name]['bf16_gb']:.2f} GB bf16, {real[name]['fp32_gb']:.2f} GB float32")

    runs: dict[tuple, list[dict]] = {}
    jobs = [("huginn", d) for d in HUGINN_WIDTHS] + [("ouro", d) for d in OURO_WIDTHS]
    for _ in range(args.repeats):
        for family, d in jobs:  # interleaved: every size once per repeat
            out = subprocess.run([sys.executable, __file__, "--one", family, str(d), "--seq-len", str(args.seq_len)],
                                 capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault((family, d), []).append(rec)
            print(f"  {family} d={d}: audit {rec['seconds']:.1f} s CPU ({rec['wall']:.1f} s wall), peak RSS {rec['peak_rss'] / 1e9:.2f} GB, "
                  f"weights {rec['weight_bytes'] / 1e9:.3f} GB, verdict {rec['verdict']}", flush=True)

    S = args.seq_len
    results = []
    for name, info in real.items():
        family = info["family"]
        widths = HUGINN_WIDTHS if family == "huginn" else OURO_WIDTHS
        recs = [min(runs[(family, d)], key=lambda r: r["seconds"]) for d in widths]
        F = np.array([step_flops(family, d, S) for d in widths])
        t = np.array([r["seconds"] for r in recs])
        b, a = np.polyfit(F, t, 1)
        layers_scale = info["layers"] / 24
        F_real = step_flops(family, info["d"], S) * layers_scale
        F_real_256 = step_flops(family, info["d"], PROBE_TOKENS) * layers_scale
        w = np.array([r["weight_bytes"] for r in recs], dtype=float)
        m = np.array([r["peak_rss"] for r in recs], dtype=float)
        k, c = np.polyfit(w, m, 1)
        mem = c + k * info["fp32_gb"] * 1e9
        t_real, t_256 = a + b * F_real, a + b * F_real_256
        rate = F / t / 1e9
        print(f"{name}: audit at {S} tokens ≈ {t_real / 3600:.1f} h, at {PROBE_TOKENS} tokens ≈ {t_256 / 3600:.1f} h "
              f"(fit t = {a:.1f} s + F/{1 / b / 1e9:.2f} GFLOP/s; small sizes ran at {', '.join(f'{x:.2f}' for x in rate)} "
              f"step-GFLOP/s); peak memory ≈ {mem / 1e9:.1f} GB in float32 (RSS = {c / 1e9:.2f} GB + "
              f"{k:.2f} × weight bytes)")
        results.append(f"{name}_hours_{S}tok={t_real / 3600:.2f} {name}_hours_{PROBE_TOKENS}tok={t_256 / 3600:.2f} "
                       f"{name}_mem_gb={mem / 1e9:.1f} {name}_params={info['params']}")
    print("RESULT import_audit_cost " + " ".join(results))


if __name__ == "__main__":
    main()
