"""The monitor on torch.compile'd models, for real (dynamo traces the model; the `aot_eager`
backend keeps the test fast — recompilations and graph breaks are dynamo's, whatever the
backend): no hook on compiled code, no recompilation or graph break caused by the monitor,
every activation signal from its eager probe pass, and the same alerts as the eager monitor."""
import pytest
import torch
from torch._dynamo.utils import counters

from loopdyn.probes import StabilityMonitor
from tests.test_probes_monitor import tiny

BACKEND = "aot_eager"


def dynamo_counts() -> dict:
    """Graphs compiled, frames and graph breaks seen by dynamo since the last reset."""
    stats = counters["stats"]
    return {"unique_graphs": stats.get("unique_graphs", 0), "calls_captured": stats.get("calls_captured", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}


def batches(n, seed=0, B=4, S=32, V=256):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, V, (n, B, S + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def train(model, opt, data, monitor=None, jump_at=None, net=None):
    """A plain loop; the learning rate ×10 from step `jump_at` on."""
    net = model if net is None else net
    for step, (x, y) in enumerate(data, start=1):
        if step == jump_at:
            for g in opt.param_groups:
                g["lr"] *= 10
        loss = net(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def compiled_run(data, monitored: bool):
    """One compiled run from a fresh dynamo cache; the monitor (if any) attached from the start.
    The tiny preset samples its depth per step, so dynamo compiles new graphs as new depths come:
    the reference is the same run without the monitor, not the first steps."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    net = torch.compile(model, backend=BACKEND)
    monitor = (StabilityMonitor(net, opt, console=False, jacobian_every=50, attention_every=10)
               if monitored else None)
    train(model, opt, data, monitor, jump_at=150, net=net)
    return monitor, net, dynamo_counts()


def test_compiled_plain_loop_no_recompile_all_signals_and_the_lr_jump_at_its_step():
    """Over 200 compiled steps the monitor makes dynamo compile nothing more, break no graph and
    recompile nothing (counted against the same run without it), while every signal is recorded
    (the activations on the probe cadence) and the ×10 learning rate is warned at its step."""
    data = batches(200)
    _, _, before = compiled_run(data, monitored=False)
    monitor, net, after = compiled_run(data, monitored=True)
    assert monitor.compile_safe
    assert after["graph_breaks"] == before["graph_breaks"], (before, after)  # no graph break because of it
    hist = monitor.history
    for name in ("loss", "grad_norm", "lr", "injection_radius"):
        assert len(hist[name]) == 200, name
    for name in ("state_norm", "state_norm_max", "rel_residual", "state_growth", "logz", "attn_logit_max"):
        assert list(hist[name].steps) == list(range(10, 201, 10)), name  # the probe pass, every loop_every
    assert list(hist["jacobian_norm"].steps) == [50, 100, 150, 200]
    warn = [a for a in monitor.alerts if a.kind == "spike_warning" and a.signal == "lr"]
    assert warn and warn[0].step == 150
    assert not monitor.coverage().missing, monitor.coverage().line()
    monitor.close()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())

    # The same run, eager, with the monitor's hooks (the state tap every step): the same alerts,
    # each within the probe cadence (loop_every = 10 steps) of its twin.
    twin = tiny()
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    eager = StabilityMonitor(twin, twin_opt, console=False, jacobian_every=50, attention_every=10)
    assert not eager.compile_safe
    train(twin, twin_opt, data, eager, jump_at=150)
    eager.close()

    def findings(m):
        return [(a.kind, a.step) for a in m.alerts if a.kind in ("spike", "nonfinite", "spike_warning",
                                                                     "loop_instability")]

    mine, theirs = findings(monitor), findings(eager)
    assert ("spike_warning", 150) in mine and ("spike_warning", 150) in theirs
    for a, b in ((mine, theirs), (theirs, mine)):
        for kind, step in a:
            assert any(k == kind and abs(s - step) <= 10 for k, s in b), (kind, step, mine, theirs)
    assert after == before, (before, after)  # nothing compiled or recompiled because of the monitor
