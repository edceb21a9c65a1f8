"""Issue 22 part 3: `loopdyn plan` against independent counts.

FLOPs against loopdyn/scaling/flops.py's closed-form counts (dense attention, as the flop counter sees
it); parameters against the built model and the published counts; the saved-activation bytes
counted on the meta device against the same count on a real CPU run (tensors deduplicated by
their storage); the largest T against the memory formula it inverts. Measured memory and time
against the plan on this machine: bench/plan_check.py (no timed test here).
"""
from __future__ import annotations

import json

import pytest
import torch

from loopdyn.scaling.flops import forward_flops, training_flops
from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.models.errors import InputError
from loopdyn.scaling.plan import Device, parse_bytes, plan


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_flops_and_parameters_match_the_closed_form_counts(name):
    c = LoopConfig.preset(name)
    S = 48
    p = plan(name, batch=2, seq_len=S)
    assert p.params == LoopedLM(c).num_params()
    for T in (1, 4, 9):
        want = forward_flops(c, tokens=1, loops=T, attention="dense", seq_len=S).total
        assert p.inference_flops(T) == pytest.approx(want, rel=1e-9)
    for n, k in ((0, 2), (3, 2), (5, 1)):
        want = training_flops(c, tokens=1, n_no_grad=n, n_grad=k, attention="dense", seq_len=S).total
        assert p.training_flops(n + k, k) == pytest.approx(want, rel=1e-9)


def test_published_configurations():
    h = plan("huginn-0125", seq_len=64, dtype="bf16")
    assert h.params == 3_564_976_800 and h.weight_bytes == 2 * h.params and h.mean_loops == 32
    o = plan("ouro-2.6b", seq_len=64, dtype="bf16")
    assert o.params == 2_667_974_657 and o.layers == (0, 48, 0)
    # Huginn per loop: 4 sandwich blocks, 2 FLOPs per weight and token, plus the adapter
    core = sum(q.numel() for n, q in _meta("huginn-0125").named_parameters() if n.startswith(("core.", "adapter.")))
    assert h.flops_loop == pytest.approx(2 * core, rel=0.02)


def _meta(spec):
    from loopdyn.scaling.plan import _build

    return _build(spec)[0]


def test_saved_activations_counted_on_meta_equal_a_real_cpu_run():
    torch.manual_seed(0)
    c = LoopConfig.preset("tiny", mean_loops=3)
    p = plan("tiny", batch=2, seq_len=32, overrides={"mean_loops": 3})
    model = LoopedLM(c).train()
    idx = torch.randint(0, 256, (2, 32))
    seen, total, params = set(), [0], {id(q) for q in model.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params:
            return t
        key = base.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += base.untyped_storage().nbytes()
        return t
    ctx = model.encode(idx)
    h = model.init_state(ctx).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.step(h, ctx)
    assert p.saved_loop == pytest.approx(total[0], rel=0.05)


def test_largest_T_inverts_the_memory_formula():
    p = plan("small", batch=4, seq_len=128)
    assert p.peak_train_loop > 0
    budget = p.training_bytes(1) + 7.5 * p.peak_train_loop
    T = p.max_loops(budget, "train")
    assert T == 8 and p.training_bytes(T) <= budget < p.training_bytes(T + 1)
    assert p.max_loops(p.training_bytes(1) - 1, "train") is None
    G = p.max_loops(p.inference_bytes(1, True) + 10 * p.layers[1] * p.kv_per_layer, "generate")
    assert G == 11


def _real_step(model, idx, k, trace):
    """One training step's forward and backward on real CPU tensors under `trace`."""
    import torch.nn.functional as F

    from loopdyn.models import protocol

    with trace:
        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)
        for _ in range(k):
            h = model.step(h, ctx)
        logits = model.decode(h, ctx)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
        del ctx, h, logits
        loss.backward()
    model.zero_grad(set_to_none=True)
    return trace.peak


@pytest.mark.parametrize("name,B,S", [("tiny", 2, 32), ("small", 2, 48)])
def test_the_meta_trace_has_the_real_runs_activation_peak(name, B, S):
    """The tensors a pass allocates, on meta, live exactly as long as in the real CPU pass: the
    traced peaks (inference; training through 1 and 3 loops) equal the real run's, counted by
    the same storage bookkeeping on real tensors."""
    from loopdyn.scaling.costmodel import OpTrace

    torch.manual_seed(0)
    c = LoopConfig.preset(name)
    p = plan(name, batch=B, seq_len=S)
    model = LoopedLM(c).train()
    idx = torch.randint(0, c.vocab_size, (B, S))
    for k in (1, 3):
        real = _real_step(model, idx, k, OpTrace())
        assert p.peak_train + (k - 1) * p.peak_train_loop == pytest.approx(real, rel=0.02)
    model.eval()
    with torch.no_grad(), OpTrace() as tr:
        from loopdyn.models import protocol

        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)
        for _ in range(4):
            h = model.step(h, ctx)
        model.decode(h, ctx)
    assert p.peak_inference == pytest.approx(tr.peak, rel=0.02)


def test_time_from_a_given_device():
    """The roofline: with no fixed cost per operator and an unbounded bandwidth the forward pass
    takes its FLOPs at the matmul rate; with an unbounded matmul rate, at least every weight is
    read once per stage; the fixed cost adds n_ops × overhead."""
    from loopdyn.scaling.costmodel import Device

    B, S = 4, 128
    compute = plan("small", batch=B, seq_len=S, device=Device(1e12, float("inf"), "given", overhead=0.0))
    assert compute.forward_seconds(8) == pytest.approx(compute.inference_flops(8) * B * S / 1e12, rel=1e-9)
    memory = plan("small", batch=B, seq_len=S, device=Device(float("inf"), 1e11, "given", overhead=0.0))
    assert memory.forward_seconds(8) >= memory.weight_bytes / 1e11
    fixed = plan("small", batch=B, seq_len=S, device=Device(float("inf"), float("inf"), "given", overhead=1e-6))
    ops = fixed.passes["prelude"].ops + 8 * fixed.passes["loop"].ops + fixed.passes["coda"].ops
    assert fixed.forward_seconds(8) == pytest.approx(ops * 1e-6) and ops > 50
    assert fixed.training_seconds(8, 4) > fixed.forward_seconds(8)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30 and parse_bytes("16 GB") == 16e9 and parse_bytes("512MiB") == 2 ** 29
    with pytest.raises(InputError, match="cannot read the memory size"):
        parse_bytes("lots")


def test_cli(tmp_path, capsys):
    from loopdyn.cli import main

    js = tmp_path / "plan.json"
    assert main(["plan", "tiny", "--seq-len", "32", "--memory", "1GiB", "--dtype", "bf16", "--tflops", "1",
                 "--bandwidth", "50", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "largest T in 1.000 GiB" in out and "bfloat16" in out
    data = json.loads(js.read_text())
    assert data["precision"] == "bfloat16" and data["max_loops"]["train"] > 100 and data["forward_seconds"] > 0
    assert main(["plan", "tiny", "--memory", "lots"]) == 1
    assert main(["plan", "tiny", "--tflops", "1"]) == 1
    assert main(["plan", "no-such-preset"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_a_transient_peak_then_the_loops_activations():
    """A Huginn-shaped model with a large vocabulary and few tokens: the training peak at k = 1
    and 2 is a transient (the embedding and head gradients), which the loops' saved activations
    outgrow only past ~100 loops. The plan's piecewise peak equals the real CPU run's on both
    sides of the break."""
    from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM
    from loopdyn.scaling.costmodel import OpTrace

    over = {"n_embd": 256, "n_heads": 4, "intermediate_size": 512, "vocab_size": 32768}
    p = plan("huginn-0125", batch=1, seq_len=16, overrides=over)
    assert p.activation_peak(2) == p.activation_peak(1)  # flat: the transient
    torch.manual_seed(0)
    model = HuginnLM(HuginnConfig(**over)).train()
    idx = torch.randint(0, 32768, (1, 16))
    for k in (1, 150):
        real = _real_step(model, idx, k, OpTrace())
        assert p.activation_peak(k) == pytest.approx(real, rel=0.03), k
    assert p.activation_peak(150) > 1.3 * p.activation_peak(1)
