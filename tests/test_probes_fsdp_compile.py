"""torchrun, two processes, FSDP2 + torch.compile on gloo: the monitor is compile-safe, its
probe pass gathers the sharded parameters (every rank at the same step), the loop signals and
the loop Jacobian are recorded, the learning-rate jump is warned at its step, no graph break."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_fsdp2_compile_two_ranks(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_compile_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["compile_safe"] and not r["disabled"], r
    for name in ("state_norm", "rel_residual", "state_growth"):
        assert r["signals"][name] == [4, 8, 12, 16, 20, 24], (name, r)
    assert r["signals"]["jacobian_norm"] == [8, 16, 24]
    assert r["lr_warnings"][:1] == [16]
    assert r["dynamo_monitored"] == r["dynamo_plain"], r  # the monitor compiled nothing, broke no graph
    assert list(r["coverage"]["missing"]) == ["attention logits"], r["coverage"]  # the net has none
