"""loopdyn/allocator.py: freed activations kept for the next pass, counted in page faults.

Ground truth is the kernel's count of minor page faults (getrusage's ru_minflt) over rounds of
allocating and freeing tensors as a pass does, in a fresh process (the policy is process-wide
and cannot be undone): with glibc's defaults every round faults its memory in again; with the
policy set, a steady round faults nothing in. Each case runs its control beside it, so the test
fails if the policy stops mattering.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from loopdyn import allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's malloc only")

PASSES = r"""
import json, resource, sys, torch
from loopdyn import allocator
state = allocator.keep_freed_memory()
torch.set_num_threads(2)
from loopdyn.models import LoopConfig, LoopedLM, protocol
torch.manual_seed(0)
model = LoopedLM(LoopConfig.preset("small")).eval()
idx = torch.randint(0, 256, (4, 64))
faults = []
with torch.no_grad():
    for _ in range(5):  # a forward pass at 16 loops: activations from 256 KiB to 4 MiB, freed as it goes
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)
        for _ in range(16):
            h = model.step(h, ctx)
        model.decode(h, ctx)
        del ctx, h
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "state": state}))
"""

ROUNDS = r"""
import json, resource, torch
from loopdyn import allocator
state = allocator.keep_freed_memory()
faults = []
for _ in range(4):  # 96 tensors of 512 KiB written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(2 ** 17) for _ in range(96)]
    del xs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "state": state}))
"""
PAGES = 96 * 2 ** 19 // 4096  # pages one round writes


def _run(script: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LOOPDYN_ALLOCATOR", "GLIBC_TUN"))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return json.loads(out.stdout)


@glibc
def test_a_steady_pass_faults_nothing_in_once_freed_memory_is_kept():
    """A real forward pass (`small`, 16 loops): its four steady passes fault their freed
    activations in again with glibc's defaults (measured 25–120 k pages over the four, depending
    on the heap's history), and fault almost nothing in with the policy (measured ≤ 200)."""
    kept, system = _run(PASSES), _run(PASSES, LOOPDYN_ALLOCATOR="system")
    assert kept["state"] == allocator.KEPT and system["state"] == "left alone: LOOPDYN_ALLOCATOR=system"
    assert sum(kept["faults"][1:]) < 1000, kept
    assert sum(system["faults"][1:]) > 5000, system  # the control: the policy is what made the difference


@glibc
@pytest.mark.parametrize("env, reason", [
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "glibc malloc tuned by MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "glibc malloc tuned by GLIBC_TUNABLES"),
])
def test_a_users_own_tuning_is_left_alone(env, reason):
    run, ours = _run(ROUNDS, **env), _run(ROUNDS)
    assert run["state"] == f"left alone: {reason}"
    assert min(run["faults"]) > 0.9 * PAGES, run  # the user's "give everything back" still rules
    assert ours["state"] == allocator.KEPT and max(ours["faults"][2:]) < 0.05 * PAGES, ours


def test_another_allocator_preloaded_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator._reason_to_leave_alone() == "jemalloc preloaded"
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert allocator._reason_to_leave_alone() == "the C library is not glibc (Darwin)"


@glibc
def test_the_command_line_sets_it_before_it_works():
    code = "from loopdyn.cli import main; from loopdyn import allocator; " \
           "assert main(['plan', 'tiny', '--seq-len', '8']) == 0; print(allocator.state())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == allocator.KEPT
