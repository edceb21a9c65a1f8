"""Issue 11: the autonomous parameterisation (no injection, Ouro-style h_{t+1} = Norm(core(h_t)),
h_0 = e) in LoopedLM and in `loopdyn compare`."""
from __future__ import annotations

import math

import pytest
import torch

from loopdyn.compare import RunSpec, grid, injection_norms, run_one
from loopdyn.models import ConfigError, LoopConfig, LoopedLM, load, save, validate
from loopdyn.models.protocol import linear_part, state_norm_kind


def model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LoopedLM(LoopConfig.preset("tiny", injection="autonomous", **overrides)).eval()


def idx(B=2, S=9):
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(1))


def test_the_loop_is_autonomous_and_renormalised():
    m = model()
    x = idx()
    validate(m, x)
    assert linear_part(m) is None and m.linear_part() is None
    assert state_norm_kind(m) == "post" and m.injection_name == "autonomous"
    assert state_norm_kind(LoopedLM(LoopConfig.preset("tiny"))) == "none"
    with torch.no_grad():
        ctx = m.encode(x)
        # h_0 = e whatever state_init says (the loop never sees the input again)
        assert torch.equal(m.init_state(ctx), ctx.e)
        assert torch.equal(model(state_init="zero").init_state(ctx), ctx.e)
        # the step ignores e: changing e leaves step(h) unchanged
        h = torch.randn(2, 9, 64)
        other = type(ctx)(idx=ctx.idx, e=torch.randn_like(ctx.e), rope=ctx.rope, core_ve=ctx.core_ve)
        assert torch.equal(m.step(h, ctx), m.step(h, other))
        # step = RMSNorm(core(h)): unit RMS per token at init (gain 1), whatever the scale of h
        r = m.pre_norm_state(100 * h, ctx)
        s = m.step(100 * h, ctx)
        assert torch.allclose(s, r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + m.config.norm_eps), atol=1e-6)
        assert torch.allclose(s.pow(2).mean(-1), torch.ones(2, 9), atol=1e-4)
        assert torch.equal(m.renormalise(r, ctx), s)  # step = renormalise ∘ pre_norm_state, bit for bit
        x_ = h
        for sub in m.sublayers(ctx):
            assert sub.kind != "injection"
            x_ = x_ + sub.fn(x_) if sub.kind == "residual" else sub.fn(x_)
        assert torch.allclose(x_, m.step(h, ctx), atol=1e-5)
        assert m.sublayers(ctx)[-1].name == "state_norm"
        # the forward pass at T loops decodes h_T of the unrolled loop
        states, _ = m.unroll(x, 5)
        assert torch.equal(m(x, n_loops=5).logits, m.decode(states[-1], ctx))


def test_autonomous_needs_equal_widths_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="autonomous injection needs d_state == d_model"):
        LoopConfig.preset("tiny", injection="autonomous", d_state=32, n_state_heads=2)
    m = model(seed=2)
    with torch.no_grad():
        m.state_norm.weight.uniform_(0.5, 1.5)
    loaded = load(save(m, tmp_path / "auto"))
    assert torch.equal(loaded.state_norm.weight, m.state_norm.weight)
    with torch.no_grad():
        assert torch.equal(loaded(idx(), n_loops=6).logits, m(idx(), n_loops=6).logits)


def test_it_trains_a_few_steps_on_the_tiny_preset(tmp_path):
    spec = grid(["autonomous"], [3e-3], [0], steps=25, batch_size=8, seq_len=32)[0]
    assert spec == RunSpec(injection="autonomous", lr=3e-3, steps=25, batch_size=8, seq_len=32)
    assert spec.config().injection == "autonomous"
    record = run_one(spec, tmp_path / spec.name, audit=False)
    assert record.steps == 25 and all(math.isfinite(x) for x in record.losses)
    assert sum(record.losses[-5:]) / 5 < record.losses[0] - 0.3  # it learns
    assert all(math.isnan(x) for x in record.spectral_radius)  # no Ā to measure
    # the per-loop states stay RMS-normalised, so their norm is √d·(norm gain), never explosive
    assert max(record.final_state_norms[1:]) < 3 * math.sqrt(64)
    assert math.isnan(injection_norms(LoopedLM(spec.config()))[0])
    assert (tmp_path / spec.name / "model" / "config.json").is_file()
