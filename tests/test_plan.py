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
from hypothesis import given
from hypothesis import strategies as st

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


# per-pass bookkeeping that differs by where a value was cached (the causal mask is made once on
# the CPU, again on meta; a scalar read), not by the kernels a pass runs
_BOOKKEEPING = {"_local_scalar_dense", "_record_function_enter_new", "_record_function_exit", "min", "max",
                "full", "triu", "_is_mkldnn_bf16_supported"}


def _calls(kernels, times: int = 1, out=None):
    """Operator calls by name, x `times`; oneDNN's linear as loopdyn's operator that wraps it."""
    import collections

    out = collections.Counter() if out is None else out
    for sig, (count, *_) in kernels.items():
        name = sig[0]._overloadpacket.__name__
        name = "onednn_linear" if name == "_linear_pointwise" else name
        if name not in _BOOKKEEPING:
            out[name] += times * count
    return out


def _cpu_model(spec, overrides):
    """The model of `spec` on the CPU, built by its own family's class (not by plan's builder)."""
    if spec == "huginn-0125":
        from loopdyn.models.importers.huginn import HuginnConfig, HuginnLM

        return HuginnLM(HuginnConfig(**overrides))
    if spec == "ouro-1.4b":
        from loopdyn.models.importers.ouro import OuroConfig, OuroLM

        return OuroLM(OuroConfig.ouro_1_4b(**overrides))
    return LoopedLM(LoopConfig.preset(spec, **overrides))


@pytest.mark.parametrize("name,overrides,dtype", [
    ("tiny", {}, "float32"), ("small", {}, "bfloat16"),
    ("huginn-0125", {"n_embd": 64, "n_heads": 2, "intermediate_size": 128, "vocab_size": 256}, "float32"),
    ("ouro-1.4b", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "vocab_size": 256}, "bfloat16")])
def test_the_meta_trace_runs_the_cpu_passes_operators(name, overrides, dtype):
    """`plan` times the operators the pass runs on this CPU, so its meta trace must take the
    CPU's path (oneDNN linear layers, the explicit attention of a training pass, bf16 products
    through float32): the operator calls, by name and count, of real CPU passes — a forward at 4
    loops, a training step through 3 loops, AdamW's second update — equal the plan's passes."""
    from loopdyn.models import protocol
    from loopdyn.models.precision import precision
    from loopdyn.scaling.calibrate import training_loss
    from loopdyn.scaling.costmodel import OpTrace

    B, S = 2, 32
    p = plan(name, batch=B, seq_len=S, dtype=dtype, overrides=overrides)
    prec = precision(dtype)
    torch.manual_seed(0)
    model = _cpu_model(name, overrides)
    prec.apply(model)
    idx = torch.randint(0, 256, (B, S))
    model.eval()
    with torch.no_grad(), prec.context("cpu"), OpTrace() as tr:
        ctx = model.encode(idx)
        h = protocol.initial_state(model, ctx)
        for _ in range(4):
            h = model.step(h, ctx)
        model.decode(h, ctx)
    planned = _calls(p.passes["prelude"].kernels)
    _calls(p.passes["loop"].kernels, 4, planned)
    _calls(p.passes["coda"].kernels, 1, planned)
    assert _calls(tr.cost.kernels) == planned
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(2):
        with prec.context("cpu"), OpTrace() as tr:
            training_loss(model, idx, 3).backward()
        with OpTrace() as tr_opt:
            opt.step()
        opt.zero_grad(set_to_none=True)
    planned = _calls(p.passes["train_base"].kernels)
    _calls(p.passes["train_loop"].kernels, 2, planned)
    assert _calls(tr.cost.kernels) == planned
    assert _calls(tr_opt.cost.kernels) == _calls(p.passes["optimizer"].kernels)


def test_time_from_a_given_device():
    """The roofline: with no fixed cost per operator and an unbounded bandwidth the forward pass
    takes its FLOPs at the matmul rate; with an unbounded matmul rate, at least every weight is
    read once per stage; the fixed cost adds n_ops × overhead."""
    B, S = 4, 128
    compute = plan("small", batch=B, seq_len=S, device=Device(1e12, float("inf"), "given", overhead=0.0))
    assert compute.forward_seconds(8) == pytest.approx(compute.inference_flops(8) * B * S / 1e12, rel=1e-9)
    memory = plan("small", batch=B, seq_len=S, device=Device(float("inf"), 1e11, "given", overhead=0.0))
    assert memory.forward_seconds(8) >= memory.weight_bytes / 1e11
    fixed = plan("small", batch=B, seq_len=S, device=Device(float("inf"), float("inf"), "given", overhead=1e-6))
    ops = fixed.passes["prelude"].ops + 8 * fixed.passes["loop"].ops + fixed.passes["coda"].ops
    assert fixed.forward_seconds(8) == pytest.approx(ops * 1e-6) and ops > 50
    assert fixed.training_seconds(8, 4) > fixed.forward_seconds(8)


def test_replayed_operator_calls():
    """`plan --measure` replays each distinct traced call on tensors of its layout: the layouts are
    rebuilt exactly (a transposed, an expanded and an offset view), repeated calls are counted
    once per signature, a pass then costs Σ count · t_call (+ the per-call overhead), a call
    without a time keeps its roofline, and a memory cap leaves big calls out."""
    from loopdyn.scaling.costmodel import OpTrace, _spec, measure_kernels

    base = torch.randn(9, 7)
    for x in (base.t(), base[2:, 1:], base[:1].expand(5, 7), base.t()[1:, ::2]):
        made = _spec(x).make()
        assert (made.shape, made.stride(), made.storage_offset(), made.dtype) == \
            (x.shape, x.stride(), x.storage_offset(), x.dtype)
        assert bool(((made >= 0.5) & (made < 1)).all())
    a, b = torch.empty(64, 32, device="meta"), torch.empty(32, 16, device="meta")
    with OpTrace() as tr:
        for _ in range(3):
            y = torch.relu(a @ b) + 1.0
    cost = tr.snapshot()
    counts = {str(sig[0]): c for sig, (c, *_) in cost.kernels.items()}
    assert counts == {"aten.mm.default": 3, "aten.relu.default": 3, "aten.add.Tensor": 3}
    assert y.shape == (64, 16)
    times = measure_kernels(cost.kernels, seconds=0.2)
    assert set(times) == set(cost.kernels) and all(0 < t < 0.1 for t in times.values())
    assert measure_kernels(cost.kernels, seconds=0.1, cap_bytes=0) == {}
    fixed = {sig: 1e-3 for sig in cost.kernels}
    assert cost.seconds(Device(1e9, 1e9, "test", overhead=1.0, kernel_seconds=fixed)) == pytest.approx(9e-3)
    assert cost.seconds(Device(1e9, 1e9, "test", kernel_seconds=fixed, call_overhead=1e-4)) == pytest.approx(9.9e-3)
    mm = next(sig for sig in cost.kernels if str(sig[0]) == "aten.mm.default")
    partial = {sig: t for sig, t in fixed.items() if sig != mm}
    roof = max(2 * 64 * 32 * 16 / 1e9, (64 * 32 + 32 * 16 + 64 * 16) * 4 / 1e9) + 1e-6
    assert cost.seconds(Device(1e9, 1e9, "test", overhead=1e-6, kernel_seconds=partial)) == \
        pytest.approx(6e-3 + 3 * roof)
    with OpTrace() as tr1:
        torch.relu(a @ b)
    left = cost.minus(tr1.snapshot()).kernels
    assert {str(sig[0]): c for sig, (c, *_) in left.items()} == \
        {"aten.mm.default": 2, "aten.relu.default": 2, "aten.add.Tensor": 3}


@pytest.mark.parametrize("spec,overrides", [("small", {"n_kv_heads": 2, "value_embeds": False}), ("small", {"d_state": 128, "n_state_heads": 2, "n_kv_heads": 2}),
                                           ("huginn-0125", {}), ("ouro-1.4b", {})])
def test_the_calibration_twin_keeps_the_code_path(spec, overrides):
    """The twin `plan --measure` runs for real has width 64 and a 256-token vocabulary, and keeps
    the layers, loops, grouped KV heads and everything else of the model's config."""
    import dataclasses

    from loopdyn.scaling.calibrate import twin_config
    from loopdyn.scaling.plan import _model_class

    p = plan(spec, batch=1, seq_len=8, overrides=overrides)
    twin = twin_config(p.config, p.family)
    changed = {f.name for f in dataclasses.fields(twin) if getattr(twin, f.name) != getattr(p.config, f.name)}
    width = {"loopdyn": {"d_model", "n_heads", "n_kv_heads", "vocab_size"},
             "huginn": {"n_embd", "n_heads", "intermediate_size", "vocab_size"},
             "ouro": {"hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                      "vocab_size"}}[p.family]
    assert changed <= width | {"d_mlp", "d_state", "n_state_heads", "d_state_mlp", "extra"}, changed
    if p.family == "loopdyn":
        assert twin.n_kv_heads < twin.n_heads  # grouped stays grouped
        assert (twin.d_state is None) == (p.config.d_state is None)
    model = _model_class(p.family)(twin)
    assert sum(q.numel() for q in model.parameters()) < p.params / 10
    out = model.decode(model.step(model.init_state(ctx := model.encode(torch.zeros(1, 8, dtype=torch.long))), ctx), ctx)
    assert out.shape == (1, 8, 256)


def test_measure_end_to_end(capsys):
    """`plan --measure` on a preset: every replayable call of the passes timed, the framework's
    cost per call from the twin, and times that grow with the loops."""
    from loopdyn.cli import main

    from loopdyn import allocator

    was_kept = allocator.kept()  # the policy the times assume (a note when this process lacks it)
    p = plan("tiny", batch=2, seq_len=16).measure(0.2)
    assert any("times assume freed memory kept" in n for n in p.notes) == (not was_kept)
    d = p.device
    calls = {sig for q in p.passes.values() for sig in q.kernels}
    assert len(d.kernel_seconds) >= 0.9 * len(calls) and all(t > 0 for t in d.kernel_seconds.values())
    assert d.call_overhead >= 0 and d.grad_call_overhead >= 0 and "twin" in d.source
    assert 0 < p.forward_seconds(2) < p.forward_seconds(8) < p.training_seconds(8, 8)
    assert main(["plan", "tiny", "--seq-len", "16", "--measure"]) == 0
    captured = capsys.readouterr()
    assert "measuring this machine" in captured.err and "operator calls replayed" in captured.out
    assert ("times assume freed memory kept" in captured.out) == (not allocator.kept())  # the command sets it


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30 and parse_bytes("16 GB") == 16e9 and parse_bytes("512MiB") == 2 ** 29
    assert parse_bytes("1e9") == 1e9 and parse_bytes("512m") == 2 ** 29 and parse_bytes("1.5 gb") == 1.5e9
    for bad in ("lots", "GiB", "0GiB", "-1", "inf", "nanGB", "1e400GiB", "2 XB"):
        with pytest.raises(InputError, match="cannot read the memory size"):
            parse_bytes(bad)


@given(st.floats(1e-3, 1e6), st.sampled_from([("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10),
                                               ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("G", 2 ** 30),
                                               ("M", 2 ** 20), ("B", 1), ("", 1)]))
def test_parse_bytes_reads_any_positive_size_in_any_unit(x, unit):
    name, scale = unit
    assert parse_bytes(f"{x!r} {name}") == pytest.approx(x * scale, rel=1e-12)


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


def test_a_burst_of_contention_in_one_sweep_is_not_what_a_call_costs():
    """measure_kernels keeps the least of its sweeps' medians: a call slowed by a burst of
    contention through its whole first sweep (here 20 ms instead of 1 ms: a sleep stands in for
    the stolen CPU) is timed at its quiet cost, which one sweep cannot do."""
    import time

    from loopdyn.scaling.costmodel import _signature, measure_kernels

    calls = []

    def op(x):  # slow while the first sweep's burst lasts
        calls.append(len(calls))
        time.sleep(0.02 if len(calls) <= 6 else 0.001)  # all of sweep 1 (4 calls) and 2 calls of sweep 2
        return x

    sig = _signature(op, (torch.ones(4),), {})
    one = measure_kernels([sig], seconds=0.0, sweeps=1)[sig]
    calls.clear()
    two = measure_kernels([sig], seconds=0.0, sweeps=2)[sig]
    assert one > 0.015 and 0.0009 < two < 0.005
