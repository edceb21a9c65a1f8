"""Issue 22 part 1: the compute dtype everywhere it matters.

Ground truth: the spec-only Parcae reference (tests/parcae_reference.py) computed in bf16 on
the same bf16 weights (PyTorch's own bf16 kernels), float64 products for the low-precision
linear kernel, and the float32 model for mixed precision (autocast leaves the weights and the
state float32 and rounds only the products).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopdyn.models import load, save
from loopdyn.models.errors import InputError
from loopdyn.models.kernels import fast_linear, fast_paths
from loopdyn.models.precision import (MixedPrecisionLoop, model_precision, native_matmul, precision,
                                      upcast_linear)
from tests import parcae_reference as ref
from tests.test_models import make_model, tokens

BF16_ULP = 2.0 ** -8  # bf16 unit roundoff u = eps/2 = 2⁻⁸ relative


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("spec,name,weights,compute,mixed", [
    ("bf16", "bfloat16", torch.bfloat16, torch.bfloat16, False),
    (torch.float16, "float16", torch.float16, torch.float16, False),
    ("FP32", "float32", torch.float32, torch.float32, False),
    (None, "float32", torch.float32, torch.float32, False),
    ("bf16-mixed", "bf16-mixed", torch.float32, torch.bfloat16, True),
    ("16-mixed", "fp16-mixed", torch.float32, torch.float16, True),
])
def test_precision_names(spec, name, weights, compute, mixed):
    p = precision(spec)
    assert (p.name, p.weights, p.compute, p.mixed) == (name, weights, compute, mixed)
    assert precision(p) is p


def test_unknown_precision_is_one_clear_error():
    with pytest.raises(InputError, match="unknown dtype 'int8'.*bf16-mixed"):
        precision("int8")


def test_unit_roundoff():
    assert precision("bf16").unit_roundoff == 2.0 ** -8
    assert precision("fp16").unit_roundoff == 2.0 ** -11
    assert precision("float32").unit_roundoff == 2.0 ** -24
    assert precision("bf16-mixed").unit_roundoff == 2.0 ** -8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_linear_is_the_exact_product_rounded_once(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    exact = F.linear(x.double(), w.double(), b.double())
    y = upcast_linear(x, w, b)
    assert y.dtype == dtype
    # one rounding of a float32 accumulation: within one unit roundoff of the exact product
    u = torch.finfo(dtype).eps / 2
    assert float(((y.double() - exact).abs() / exact.abs().max()).max()) <= 1.01 * u
    assert rel(y, F.linear(x, w, b)) <= 2 * u  # PyTorch's own kernel: the same up to accumulation order


def test_upcast_linear_gradients_and_double_backward_match_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(24, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    u = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16).requires_grad_(True)
    y = upcast_linear(x, w)
    (gx,) = torch.autograd.grad(y, x, u, create_graph=True)  # Jᵀu, recorded
    v = torch.randn_like(x)
    (jv,) = torch.autograd.grad(gx, u, v)  # J·v by reverse over reverse
    assert rel(gx, u.double() @ w.double()) <= 4 * BF16_ULP
    assert rel(jv, v.double() @ w.double().T) <= 4 * BF16_ULP
    (gw,) = torch.autograd.grad(upcast_linear(x, w), w, u)
    assert gw.dtype == torch.bfloat16
    assert rel(gw, u.double().flatten(0, 1).T @ x.double().flatten(0, 1)) <= 4 * BF16_ULP


def test_fast_linear_takes_a_correct_path_in_bf16():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 96, generator=g).to(torch.bfloat16)
    w = torch.randn(80, 96, generator=g).to(torch.bfloat16)
    y = fast_linear(x, w)
    assert y.dtype == torch.bfloat16
    assert rel(y, F.linear(x.double(), w.double())) <= 1.01 * BF16_ULP
    if not native_matmul(torch.bfloat16):  # this machine: the float32 kernel, not the slow generic loop
        assert torch.equal(y, upcast_linear(x, w))


def _parcae_bf16(tmp_path, **overrides):
    cfg = ref.official_parcae_config(**overrides)
    sd = {k: v.to(torch.bfloat16) for k, v in ref.random_official_state_dict(cfg, seed=7).items()}
    ref.write_official_checkpoint(tmp_path / "official", cfg, sd, weights_name="model.safetensors")
    return cfg, sd


@pytest.mark.parametrize("overrides", [{}, {"injection_type": "linear", "bias": True, "tie_embeddings": False}])
def test_parcae_bf16_import_matches_the_reference_computed_in_bf16(tmp_path, overrides):
    cfg, sd = _parcae_bf16(tmp_path, **overrides)
    model = load(tmp_path / "official", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.dtype == torch.float32  # constants stay float32, as officially
    idx = tokens(B=2, S=24, seed=11, vocab=cfg["vocab_size"])
    for T in (1, 8):
        want = ref.official_forward(cfg, sd, idx, T)  # PyTorch's own bf16 kernels throughout
        with torch.no_grad():
            with fast_paths(False):
                plain = model(idx, n_loops=T).logits
            fast = model(idx, n_loops=T).logits
        assert torch.equal(plain, want)  # bit-identical: the same bf16 operations
        # fast path: the same up to the accumulation order of the products (bf16 round-off, grown
        # through T loops of a random model)
        assert rel(fast, want) <= 8 * T * BF16_ULP
        want32 = ref.official_forward(cfg, {k: v.float() for k, v in sd.items()}, idx, T)
        assert rel(want, want32) > BF16_ULP  # and bf16 is a different computation from float32


def test_own_format_loads_in_the_requested_dtype_without_a_float32_copy(tmp_path):
    model = make_model()
    path = save(model.to(torch.bfloat16), tmp_path / "ck")
    low = load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(model.state_dict().items(), low.state_dict().values()):
        assert torch.equal(a, b), name
    assert model_precision(low).name == "bfloat16"
    full = load(path)  # default: float32, the exact cast of the stored bf16
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    mixed = load(path, dtype="bf16-mixed")  # mixed precision holds float32 weights
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}


def test_mixed_precision_loop_runs_products_in_bf16_on_a_float32_state():
    model = make_model()
    idx = tokens()
    wrapped = precision("bf16-mixed").wrap(model)
    assert isinstance(wrapped, MixedPrecisionLoop) and model_precision(wrapped).name == "bf16-mixed"
    assert wrapped.mean_loops == model.mean_loops and wrapped.linear_part is not None
    with torch.no_grad():
        ctx = wrapped.encode(idx)
        h = wrapped.init_state(ctx)
        h32 = model.init_state(model.encode(idx))
        for _ in range(3):
            h, h32 = wrapped.step(h, ctx), model.step(h32, model.encode(idx))
        assert h.dtype == torch.float32  # the state stays float32 ...
        err = rel(h, h32)
        assert 1e-4 < err < 0.05  # ... but the products were rounded to bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ctx_ref = model.encode(idx)
            href = model.init_state(ctx_ref)
            for _ in range(3):
                href = model.step(href, ctx_ref)
        assert torch.equal(h, href)  # exactly what torch.autocast around the model gives
        assert torch.equal(wrapped(idx).logits, _autocast_logits(model, idx))


def _autocast_logits(model, idx):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(idx).logits


def test_pure_bf16_audit_runs_in_bf16_and_agrees_with_float32():
    from loopdyn.dynamics.auditing import audit

    model = make_model()
    idx = tokens(B=1, S=12)
    r32 = audit(model, idx, 4, 8, lyapunov_k=2)
    r16 = audit(precision("bf16").wrap(make_model()), idx, 4, 8, lyapunov_k=2)
    assert r16.verdict == r32.verdict
    assert abs(r16.lyapunov.exponents[0] - r32.lyapunov.exponents[0]) < 0.05
    assert r16.trajectory.state_norm[4] == pytest.approx(r32.trajectory.state_norm[4], rel=0.05)


# ---- the command line --------------------------------------------------------------------------

def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x * 2\n" * 200)
    return path


@pytest.mark.parametrize("dtype,weights", [("bf16", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_train_in_a_low_precision(tmp_path, capsys, dtype, weights):
    from loopdyn.cli import main

    out = tmp_path / "model"
    code = main(["train", "--data", str(_corpus(tmp_path)), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                 "--eval-every", "0", "--no-progress", "--set", "block_size=32", "--mean-loops", "2",
                 "--dtype", dtype, "--save", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    model = load(out, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {weights}
    # a pure-bf16 run trained bf16 weights: the saved weights are bf16 numbers
    stored = load(out)
    if weights == torch.bfloat16:
        assert all(torch.equal(p, p.to(torch.bfloat16).float()) for p in stored.parameters())


def test_audit_and_sweep_with_dtype(tmp_path, capsys):
    import json

    from loopdyn.cli import main

    ck = save(make_model(), tmp_path / "ck")
    js = tmp_path / "a.json"
    code = main(["audit", str(ck), "--loops", "3", "--horizon", "6", "--seq-len", "12", "--no-progress",
                 "--dtype", "bfloat16", "--json", str(js)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "the loop ran in bfloat16" in out
    assert json.loads(js.read_text())["verdict"] in ("stable", "marginal", "explosive")
    csv = tmp_path / "s.csv"
    code = main(["sweep-loops", str(ck), "--max-loops", "3", "--batches", "1", "--batch-size", "2", "--seq-len", "16",
                 "--data", str(_corpus(tmp_path)), "--no-progress", "--no-dynamics", "--dtype", "bf16-mixed",
                 "--csv", str(csv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "computed in bf16-mixed" in out and csv.read_text().count("\n") == 4


def test_a_bad_dtype_is_a_usage_error(capsys):
    from loopdyn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["audit", "x", "--dtype", "int8"])
    assert exc.value.code == 2
    assert "unknown dtype 'int8'" in capsys.readouterr().err


def test_compare_passes_the_dtype_to_every_run():
    from loopdyn.compare import grid
    from loopdyn.compare.records import _differing_settings

    specs = grid(["diagonal"], [0.01], [0], dtype="bfloat16")
    assert specs[0].dtype == "bfloat16"
    # a record written before --dtype existed is a float32 run
    old = {k: v for k, v in grid(["diagonal"], [0.01], [0])[0].__dict__.items() if k != "dtype"}
    assert _differing_settings(old, grid(["diagonal"], [0.01], [0])[0]) == ""
    assert "dtype" in _differing_settings(old, specs[0])


@pytest.mark.parametrize("shape,bias", [((3, 5, 1024), True), ((7, 1024), False)])
def test_the_blockwise_cast_is_the_whole_cast_bit_for_bit(shape, bias):
    """`_f32_product` casts a large bf16 weight a block of output rows at a time (no weight-sized
    float32 copy): every output element is the same float32 reduction as with the whole weight
    cast at once, so the result is bit-identical; a small transposed weight takes the whole cast."""
    from loopdyn.models import precision as P

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(torch.bfloat16)
    w = (torch.randn(4096 + 17, 1024, generator=g) * 0.02).to(torch.bfloat16)  # 2 blocks and a remainder
    b = torch.randn(4096 + 17, generator=g).to(torch.bfloat16) if bias else None
    from loopdyn.models.kernels import fast_linear

    assert w.numel() > P._CHUNK and x.numel() // 1024 < P._CHUNK // 1024
    got = P._f32_product(x, w, b)
    whole = fast_linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    assert torch.equal(got, whole)  # the same kernel on the whole weight
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # independent: float64
    assert torch.allclose(got.double(), exact, rtol=2 ** -8, atol=1e-6 * exact.abs().max().item())
    wt = w[:1024, :].t()  # (1024, 1024) transposed view
    assert torch.equal(P._f32_product(x, wt, None), fast_linear(x.float(), wt.float()).to(torch.bfloat16))


@pytest.mark.parametrize("shape,bias", [((3, 5, 4096 + 17), True), ((7, 4096 + 17), False)])
def test_a_large_transposed_weight_is_cast_a_reduction_block_at_a_time(shape, bias):
    """A backward pass's g·W reaches `_f32_product` as x·(Wᵀ)ᵀ with a transposed view: its
    contiguous row blocks are blocks of the reduction, cast and accumulated in float32. Against
    float64: one rounding of a float32 sum (the whole cast's result within one bf16 unit)."""
    from loopdyn.models import precision as P

    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(torch.bfloat16)
    W = (torch.randn(4096 + 17, 1024, generator=g) * 0.02).to(torch.bfloat16)  # (K, N): 3 blocks
    b = torch.randn(1024, generator=g).to(torch.bfloat16) if bias else None
    assert W.numel() > P._CHUNK
    got = P._f32_product(x, W.t(), b)
    assert got.shape == (*shape[:-1], 1024) and got.dtype == torch.bfloat16
    exact = x.double() @ W.double() + (0 if b is None else b.double())
    scale = exact.abs().max()
    assert float(((got.double() - exact).abs() / scale).max()) <= 1.01 * BF16_ULP
    whole = fast_linear(x.float(), W.t().float(), None if b is None else b.float()).to(torch.bfloat16)
    assert float(((got.double() - whole.double()).abs() / scale).max()) <= 2 * BF16_ULP


def test_batched_gradients_take_the_plain_path_through_the_bf16_kernel():
    """`autograd.grad(..., is_grads_batched=True)` (an audit's Lyapunov products on a small state)
    runs backward passes under the legacy vmap: `under_transform` sees its batched tensors, so the
    low-precision kernel takes plain products there (its blockwise copies into an unbatched buffer
    failed under vmap). Jᵀ·W and reverse-over-reverse J·V equal the products one at a time."""
    from loopdyn.models import precision as P

    g = torch.Generator().manual_seed(4)
    W = (torch.randn(4096 + 17, 1024, generator=g) * 0.02).to(torch.bfloat16)  # a blockwise-cast weight
    assert W.numel() > P._CHUNK
    x = torch.randn(4, 1024, generator=g).to(torch.bfloat16).requires_grad_(True)
    y = upcast_linear(x, W)
    u = torch.zeros_like(y).requires_grad_(True)
    (gx,) = torch.autograd.grad(y, x, u, create_graph=True)
    V = torch.randn(3, 4, 1024, generator=g).to(torch.bfloat16)
    Wv = torch.randn(3, 4, 4096 + 17, generator=g).to(torch.bfloat16)
    (jv,) = torch.autograd.grad(gx, u, V, retain_graph=True, is_grads_batched=True)
    (jtw,) = torch.autograd.grad(y, x, Wv, retain_graph=True, is_grads_batched=True)
    for i in range(3):
        assert rel(jv[i], V[i].double() @ W.double().T) <= 2 * BF16_ULP
        assert rel(jtw[i], Wv[i].double() @ W.double()) <= 2 * BF16_ULP
