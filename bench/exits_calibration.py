"""Exit criteria calibrated against the oracle on Huginn- and Ouro-shaped fixtures and on any
checkpoint you pass (e.g. a trained `tiny`): the Pareto table, the calibrated thresholds and the
published defaults side by side (docs/exits.md).

    python bench/exits_calibration.py [CHECKPOINT ...] [--out DIR] [--budget 0.5%]

The fixtures are the importers' test fixtures (random weights, written by tests/huginn_reference.py
and tests/ouro_reference.py into DIR). For each model this runs `loopdyn exits` (the same probe:
2 sequences of min(128, context) byte ids of the default corpus) and writes DIR/NAME.json and DIR/NAME/ figures. Ends with
one line `RESULT exits_calibration ...` (mean loops of the default and of the calibrated threshold
per criterion, per model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fixtures(out: Path) -> dict:
    from tests import huginn_reference as href
    from tests import ouro_reference as oref

    return {"huginn-fixture": href.make_huginn_checkpoint(out / "huginn-fixture", seed=7),
            "ouro-fixture": oref.make_ouro_checkpoint(out / "ouro-fixture", seed=3, gate_scale=6.0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--out", default="exits-bench")
    ap.add_argument("--budget", default="0.5%")
    ap.add_argument("--seq-len", default=None, help="probe tokens per sequence (default: min(128, the context))")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = fixtures(out)
    models.update({Path(c).name: c for c in args.checkpoints})
    from loopdyn.cli import main as loopdyn

    result = []
    for name, path in models.items():
        argv = ["exits", str(path), "--budget", args.budget, *(["--seq-len", args.seq_len] if args.seq_len else []),
                "--batch-size", "2",
                "--json", str(out / f"{name}.json"), "--plots", str(out / name), "--no-progress", "--threads", "1",
                "--no-per-token"]
        print(f"$ loopdyn {' '.join(argv)}", flush=True)
        code = loopdyn(argv)
        if code:
            return code
        rec = json.loads((out / f"{name}.json").read_text())
        cal = rec["calibration"]
        for crit, d in cal["defaults"].items():
            c = cal["calibrated"].get(crit)
            result.append(f"{name}.{crit}.default={d['mean_loops']:.3g}")
            result.append(f"{name}.{crit}.calibrated={'none' if c is None else format(c['mean_loops'], '.3g')}")
        result.append(f"{name}.oracle={cal['oracle']['mean_loops']:.3g}")
    print("RESULT exits_calibration " + " ".join(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
