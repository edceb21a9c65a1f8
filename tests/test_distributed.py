"""torch.distributed: every rank takes the same decision; only rank 0 writes files.

Two processes on the gloo backend: `torchrun --nproc_per_node=2 -m loopdyn train ...` end to
end, and a direct check that a fault seen by one rank stops both at the same step.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_two_ranks_train_and_only_rank_zero_writes(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "loopdyn",
           "train", "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress",
           "--data", str(text), "--log-file", str(out / "log.jsonl"), "--alerts", str(out / "alerts.jsonl"),
           "--on-spike", "skip"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0/2: 6 steps" in proc.stderr and "rank 1/2: 6 steps" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["alerts.jsonl", "log.jsonl"]  # nothing from rank 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # one writer: no duplicated lines
    assert records[-1]["tokens"] == 6 * 2 * 16 * 2  # tokens of both ranks


class _QueueDict:
    def __init__(self, queue):
        self.queue = queue

    def __setitem__(self, key, value):
        self.queue.put((key, value))


def _worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from loopdyn.probes import StabilityMonitor

        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        monitor = StabilityMonitor(model, opt, console=False, on_spike="stop", sync_every=5)
        x = torch.randn(16, 4)
        stopped_at = None
        for step in range(1, 21):
            loss = (model(x) ** 2).mean()
            if rank == 1 and step == 7:
                loss = loss * float("nan")  # only rank 1 sees the fault
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.record_loss(loss)
            if monitor.stop_requested:
                stopped_at = step
                break
        monitor.close()
        results[rank] = (stopped_at, [a.kind for a in monitor.alerts])
    finally:
        dist.destroy_process_group()


def test_a_fault_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    ctx = mp.get_context("fork")  # no second torch import: quick
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(rank, 2, str(tmp_path / "init"), _QueueDict(queue)))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = dict(queue.get() for _ in procs)
    (stop0, kinds0), (stop1, kinds1) = results[0], results[1]
    assert stop0 == stop1 == 10  # the first agreed sync point after step 7 (every 5 steps)
    assert "nonfinite" in kinds1 and "nonfinite" not in kinds0  # rank 0 saw nothing itself...
    assert "action" in kinds0  # ...but took the same decision


def _fsdp_worker(rank, world, init_file, results):
    """FSDP2 (fully_shard) on gloo: every rank holds half of each parameter (a DTensor)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import numpy as np
        from torch.distributed.fsdp import fully_shard

        from loopdyn.models import LoopConfig, LoopedLM
        from loopdyn.probes import StabilityMonitor

        torch.manual_seed(0)
        model = LoopedLM(LoopConfig.preset("tiny", injection="linear", value_embeds=False)).train()
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        monitor = StabilityMonitor(model, opt, console=False, on_loop="stop", sync_every=5)
        d = model.config.d_state
        W = model.injection.W.weight
        g = torch.Generator().manual_seed(rank)  # each rank its own batches
        rho_full, stopped = {}, None
        for step in range(1, 16):
            x = torch.randint(0, 256, (2, 17), generator=g)
            loss = model(x[:, :-1], x[:, 1:]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            full = W.full_tensor().detach().double().numpy()[:, :d]  # a collective: every rank, same step
            rho_full[step] = float(np.abs(np.linalg.eigvals(full)).max())
            if step == 6:
                with torch.no_grad():
                    W.mul_(2.0)  # ρ(2A) = 2ρ(A) > 1 from step 7 on
            if monitor.stop_requested:
                stopped = step
                break
        hist = dict(monitor.history["injection_radius"])
        loop = [a for a in monitor.alerts if a.kind == "loop_instability"]
        monitor.close()
        results[rank] = (stopped, [(a.step, a.value) for a in loop], hist, rho_full,
                         tuple(W.to_local().shape), tuple(W.shape), type(W).__name__)
    finally:
        dist.destroy_process_group()


def test_fsdp2_spectral_signals_come_from_the_full_parameter_and_ranks_agree(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_fsdp_worker, args=(rank, 2, str(tmp_path / "init"), _QueueDict(queue)))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = dict(queue.get() for _ in procs)
    (stop0, loop0, hist0, rho0, local0, shape0, kind0), (stop1, loop1, hist1, _, local1, _, _) = results[0], results[1]
    assert kind0 == "DTensor" and local0 != shape0 and local0 == local1  # really sharded
    assert hist0 == hist1  # the same ρ(Ā) on both ranks, every step
    for step, rho in hist0.items():  # ... and it is ρ of the full Ā (numpy on the gathered matrix)
        assert abs(rho - rho0[step]) <= 1e-5 * rho0[step], step
    assert loop0 == loop1 and loop0[0][0] == 7 and loop0[0][1] > 1  # the same finding on both ranks
    assert stop0 == stop1 == 10  # stop agreed at the first sync point after it (every 5 steps)
