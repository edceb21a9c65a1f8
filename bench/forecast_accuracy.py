"""The explosion forecast against the loop itself, on the constructed cases of tests/forecast_cases.py.

For each case the forecast measures T = 8 loops (trained depth μ = 8) and predicts H = 64; the
truth is the loop run to 256 loops with plain `model.step` calls. Prints one row per case: the
true and forecast verdicts, the deciding model, the ratio predicted/true of ‖h‖ at 4T and 8T
(non-explosive cases), and max_safe_loops against the first truly unsafe loop.

    python bench/forecast_accuracy.py [--markdown]

Ends with: RESULT forecast_accuracy verdicts=<right>/<cases> norm_within_2x=<k>/<n> safe_ok=<k>/<cases>
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from loopdyn.dynamics import forecast  # noqa: E402
from tests.forecast_cases import CASES, H, T, idx_of, run_truth  # noqa: E402


def evaluate(case):
    model = case.build()
    idx = idx_of(case)
    truth = run_truth(model, idx, case)
    f = forecast(model, idx, H, T)
    ratios = []
    for t in (4 * T, 8 * T):
        pred, true = f.state_norm[t - 1], truth.norms[t]
        ratios.append(pred / true if true > 0 and math.isfinite(true) else math.nan)
    safe_ok = truth.first_unsafe is None or f.max_safe_loops < truth.first_unsafe
    return dict(name=case.name, cls=case.cls, truth=truth.verdict, verdict=f.verdict, decided=f.decided_by,
                r4=ratios[0], r8=ratios[1], safe=f.max_safe_loops, first=truth.first_unsafe, safe_ok=safe_ok,
                forecast=f, truth_obj=truth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [evaluate(c) for n, c in CASES.items() if args.only is None or args.only in n]
    if args.markdown:
        print("| case | class | truth | forecast | decided by | ‖h_32‖ pred/true | ‖h_64‖ pred/true | max_safe / first unsafe |")
        print("|---|---|---|---|---|---|---|---|")
    ok_v = ok_n = n_n = ok_s = 0
    for r in rows:
        right = r["truth"] == r["verdict"]
        ok_v += right
        ok_s += r["safe_ok"]
        norm_txt = ["—", "—"]
        if r["truth"] != "explosive":
            n_n += 1
            within = all(0.5 <= x <= 2 for x in (r["r4"], r["r8"]))
            ok_n += within
            norm_txt = [f"{r['r4']:.3f}", f"{r['r8']:.3f}"]
        first = "—" if r["first"] is None else str(r["first"])
        if args.markdown:
            print(f"| {r['name']} | {r['cls']} | {r['truth']} | {r['verdict']}{'' if right else ' ✗'} | {r['decided']} "
                  f"| {norm_txt[0]} | {norm_txt[1]} | {r['safe']} / {first} |")
        else:
            print(f"{r['name']:<30} truth {r['truth']:<9} forecast {r['verdict']:<9}{'' if right else ' WRONG'} "
                  f"by {r['decided']:<10} h32 {norm_txt[0]:>7} h64 {norm_txt[1]:>7} safe {r['safe']:>3} first {first}")
    print(f"RESULT forecast_accuracy verdicts={ok_v}/{len(rows)} norm_within_2x={ok_n}/{n_n} safe_ok={ok_s}/{len(rows)}")


if __name__ == "__main__":
    main()
