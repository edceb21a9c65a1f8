"""torchrun worker for test_probes_fsdp_compile.py: a user's looped network, FSDP2
(`fully_shard`) on the gloo backend, then torch.compile, monitored through LoopAdapter; the
learning rate ×10 at step JUMP. Rank 0 writes what the monitor saw to argv[1] (JSON)."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.stack_models import LOOP_SIGNALS, UserLoopNet, adapter, token_batches  # noqa: E402

STEPS, JUMP = 24, 16


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        from torch.distributed.fsdp import fully_shard

        from loopdyn.probes import StabilityMonitor

        def dynamo() -> dict:
            out = {"graphs": counters["stats"].get("unique_graphs", 0),
                   "graph_breaks": sum(counters["graph_break"].values())}
            torch._dynamo.reset()
            counters.clear()
            return out

        def build():
            net = UserLoopNet()
            fully_shard(net)
            return net, torch.compile(net, backend="aot_eager"), torch.optim.AdamW(net.parameters(), lr=3e-3)

        dynamo()
        net, compiled, opt = build()  # the reference: the same run without the monitor
        for x, y in token_batches(8, seed=rank):
            compiled(x, y).backward()
            opt.step()
            opt.zero_grad()
        plain = dynamo()
        net, compiled, opt = build()
        monitor = StabilityMonitor(compiled, opt, console=False, loop=adapter(net), loop_every=4, sync_every=4,
                                   jacobian_every=8)
        for step, (x, y) in enumerate(token_batches(STEPS, seed=rank), start=1):
            if step == JUMP:
                for g in opt.param_groups:
                    g["lr"] *= 10
            loss = compiled(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        hist = monitor.history
        result = {"compile_safe": monitor.compile_safe,
                  "signals": {name: [int(s) for s in hist[name].steps] for name in LOOP_SIGNALS + ("jacobian_norm",)
                              if name in hist},
                  "lr_warnings": [a.step for a in monitor.alerts if a.kind == "spike_warning" and a.signal == "lr"],
                  "dynamo_plain": plain, "dynamo_monitored": dynamo(),
                  "disabled": dict(monitor.disabled), "coverage": monitor.coverage().as_dict()}
        monitor.close()
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
