"""The forecast on re-drawn variants of the constructed classes (new seeds, spectra, core gains), which
the forecast was not tuned on: 17 classes × 6 seeds = 102 loops, truth from the loop run to 256 loops.

    python bench/forecast_variants.py [name-filter]

Prints the misses, then: RESULT forecast_variants verdicts=<right>/<n> norm_within_2x=<k>/<n> safe_ok=<k>/<n>
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from loopdyn.dynamics import forecast  # noqa: E402
from tests.forecast_cases import (D, H, LM_IDX, MU, T, Case, PreNormCore, affine_loop, circle_map, fill,  # noqa: E402
                                  idx_of, linear_lm, nonnormal, run_truth, slow_parcae_lm, with_spectrum)
from tests.helpers import small_loop_model  # noqa: E402

torch.set_num_threads(1)
r = np.random.default_rng
rows = []
for seed in range(20, 26):
    th = r(seed).uniform(0.4, 2.7)
    variants = [
      ("lti_below", Case("x","", lambda: affine_loop(with_spectrum(fill([0.96 + 0.03*r(seed).random()]), r(seed))))),
      ("lti_above", Case("x","", lambda: affine_loop(with_spectrum(fill([1.01 + 0.04*r(seed).random()]), r(seed))))),
      ("pre_below", Case("x","", lambda: affine_loop(with_spectrum(fill([0.97]), r(seed)), core=PreNormCore(D, 0.1+0.5*r(seed).random(), seed)))),
      ("pre_above", Case("x","", lambda: affine_loop(with_spectrum(fill([1.03]), r(seed)), core=PreNormCore(D, 0.1+0.5*r(seed).random(), seed)), large_state_unstable=True)),
      ("rot_on", Case("x","", lambda: affine_loop(with_spectrum(fill([complex(math.cos(th), math.sin(th))]), r(seed))))),
      ("rot_near", Case("x","", lambda: affine_loop(with_spectrum(fill([0.975*complex(math.cos(th), math.sin(th))]), r(seed))))),
      ("rot_core", Case("x","", lambda: affine_loop(with_spectrum(fill([0.97*complex(math.cos(th), math.sin(th))]), r(seed)), core=PreNormCore(D, 0.3, seed)))),
      ("flip_core", Case("x","", lambda: affine_loop(with_spectrum(fill([-0.97]), r(seed)), core=PreNormCore(D, 0.3, seed)))),
      ("nonnormal_core", Case("x","", lambda: nonnormal(True, core=PreNormCore(D, 0.1+0.3*r(seed).random(), seed)))),
      ("contr_exp", Case("x","", lambda: affine_loop(0.5*np.linalg.qr(r(seed).standard_normal((D,D)))[0], core=PreNormCore(D, 1.0+3*r(seed).random(), seed)))),
      ("nonnormal_ne", Case("x","", lambda: affine_loop(with_spectrum(fill([0.9, 0.85]), r(seed), normal=False), core=PreNormCore(D, 0.2, seed)))),
      ("cycle", Case("x","", lambda: circle_map(2*math.pi/(2+seed%5), seed=seed))),
      ("qp", Case("x","", lambda: circle_map(th, seed=seed))),
      ("lm_parcae", Case("x","", lambda: slow_parcae_lm(0.97+0.02*r(seed).random(), seed=seed, perturb=0.02+0.05*r(seed).random()), idx=LM_IDX)),
      ("lm_lin_below", Case("x","", lambda: linear_lm(0.9, 0.05, seed=seed), idx=LM_IDX)),
      ("lm_lin_above", Case("x","", lambda: linear_lm(1.05, 0.05, seed=seed), large_state_unstable=True, idx=LM_IDX)),
      ("lm_additive", Case("x","", lambda: small_loop_model("additive", d=16, perturb=0.05, seed=seed, mean_loops=MU), idx=LM_IDX)),
    ]
    for name, c in variants:
        if len(sys.argv) > 1 and sys.argv[1] not in name: continue
        m = c.build(); idx = idx_of(c)
        tr = run_truth(m, idx, c); f = forecast(m, idx, H, T)
        ok = tr.verdict == f.verdict
        rat = [f.state_norm[t-1]/tr.norms[t] for t in (32, 64)] if tr.verdict != "explosive" else [float('nan')]*2
        nok = tr.verdict == "explosive" or all(0.5 <= x <= 2 for x in rat)
        sok = tr.first_unsafe is None or f.max_safe_loops < tr.first_unsafe
        rows.append((ok, nok, sok))
        if not (ok and nok and sok):
            print(f"{name:<15} seed {seed}: truth {tr.verdict:<9} fc {f.verdict:<9} by {f.decided_by:<10} ratios {np.round(rat,2)} safe {f.max_safe_loops} first {tr.first_unsafe}")
a = np.array(rows)
print(f"RESULT forecast_variants verdicts={a[:, 0].sum()}/{len(a)} norm_within_2x={a[:, 1].sum()}/{len(a)} "
      f"safe_ok={a[:, 2].sum()}/{len(a)}")
