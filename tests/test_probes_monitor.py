"""StabilityMonitor: hooks, recorded signals against independent computations, gating,
faults, resume. Tiny models, a few steps each."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from loopdyn.models import LoopConfig, LoopedLM
from loopdyn.probes import MonitorConfig, StabilityMonitor
from loopdyn.probes.history import SignalBuffer
from loopdyn.probes.spectral import loop_jacobian_sigma


def tiny(injection="diagonal", seed=0, **overrides):
    torch.manual_seed(seed)
    model = LoopedLM(LoopConfig.preset("tiny", injection=injection, **overrides)).train()
    with torch.no_grad():  # leave the official zero init so the core is not the identity
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.proj.weight")):
                p.normal_(0, 0.02)
    return model


def batches(n, B=4, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 256, (B, S + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def train_steps(model, opt, n, seed=0, on_step=None):
    outs = []
    for i, (x, y) in enumerate(batches(n, seed=seed)):
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if on_step:
            on_step(i + 1, out)
        opt.step()
        outs.append(out)
    return outs


def all_hook_dicts_empty(model, opt):
    mods = all(not m._forward_hooks and not m._forward_pre_hooks and not getattr(m, "_forward_hooks_with_kwargs", {})
               and not getattr(m, "_forward_pre_hooks_with_kwargs", {}) for m in model.modules())
    return mods and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_close_and_context_manager_remove_every_hook():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, console=False)
    assert model._forward_hooks and model.state_tap._forward_hooks and opt._optimizer_step_post_hooks
    train_steps(model, opt, 2)
    monitor.close()
    monitor.close()  # idempotent
    assert all_hook_dicts_empty(model, opt)
    with StabilityMonitor(model, opt, console=False) as m2:
        train_steps(model, opt, 1)
    assert m2.step == 1 and all_hook_dicts_empty(model, opt)


def test_default_monitor_leaves_training_bit_identical():
    """Same seed with and without a monitor (every probe on, at its fastest cadence): the
    parameters after N steps are bit-identical (no RNG use, no in-place changes)."""
    def run(with_monitor):
        model = tiny("linear", seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(7)  # the depth sampler's RNG
        monitor = StabilityMonitor(model, opt, console=False, spectral_every=1, attention_every=1,
                                   jacobian_every=2) if with_monitor else None
        train_steps(model, opt, 6)
        if monitor:
            assert set(monitor.history) >= {"jacobian_norm", "attn_logit_max", "injection_radius", "state_norm"}
            assert not monitor.disabled
            monitor.close()
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    (a, rng_a), (b, rng_b) = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(rng_a, rng_b)


def test_update_ratio_cadence_dense_first_then_sparse():
    """The update ratio (the monitor's costliest signal: a copy of θ) is taken every step of the
    first `update_dense` steps, then every `update_every`; each value is ‖Δθ‖/‖θ_after‖ of its step."""
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = StabilityMonitor(model, opt, console=False, update_dense=4, update_every=5)
    expected = {}

    def on_step(step, out):
        expected[step] = [p.detach().clone() for p in model.parameters()]

    train_steps(model, opt, 12, on_step=on_step)
    hist = monitor.history["update_ratio"]
    monitor.close()
    assert [s for s, _ in hist] == [1, 2, 3, 4, 5, 10]
    # recompute step 10 from the copies: θ after step 10 is θ before step 11
    model2 = tiny()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    train_steps(model2, opt2, 10)
    after = [p.detach() for p in model2.parameters()]
    d = torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(after, expected[10])))
    n = torch.sqrt(sum((a.double() ** 2).sum() for a in after))
    assert hist.at(10) == pytest.approx(float(d / n), rel=1e-4)


def test_attention_hooks_and_per_loop_norms_only_on_the_steps_that_read_them():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    attn = [m for m in model.modules() if callable(getattr(m, "max_logit", None))]
    hooked = []
    monitor = StabilityMonitor(model, opt, console=False, attention_every=3, loop_every=2)
    train_steps(model, opt, 7, on_step=lambda step, out: hooked.append(
        (step, all(len(m._forward_pre_hooks) == 1 for m in attn))))
    steps = [s for s, _ in monitor.history["attn_logit_max"]]
    per_loop = [s for s, _ in monitor.history["state_norm_max"]]  # per-loop norms: the probe cadence
    every_step = [s for s, _ in monitor.history["state_norm"]]
    monitor.close()
    assert steps == [3, 6] and per_loop == [2, 4, 6] and every_step == list(range(1, 8))
    assert hooked == [(s, s % 3 == 0) for s in range(1, 8)]
    assert all(not m._forward_pre_hooks for m in attn)  # nothing left behind


def test_signals_match_independent_computations():
    model = tiny("linear")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = StabilityMonitor(model, opt, console=False, spectral_every=1, attention_every=1, update_every=1)
    expected = {}
    attn_inputs = {}

    def grab(module, args):
        attn_inputs[module] = args
    handles = [blk.attn.register_forward_pre_hook(grab) for blk in [*model.prelude, *model.core, *model.coda]]

    def on_step(step, out):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        expected[step] = {
            "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))),
            "before": [p.detach().clone() for p in model.parameters()],
            "state_norm": float(out.state.detach().norm(dim=-1).mean()),
            "rel_residual": float((out.state - out.prev_state).detach().norm(dim=-1).mean()
                                  / out.state.detach().norm(dim=-1).mean()),
            "logz": float(torch.logsumexp(out.logits.detach().double(), -1).mean()),
            "attn": float(max(_max_logit_by_hand(m, a) for m, a in attn_inputs.items())),
        }
        attn_inputs.clear()

    train_steps(model, opt, 3, on_step=on_step)
    for h in handles:
        h.remove()
    hist = monitor.history
    monitor.close()
    for step, exp in expected.items():
        for name in ("grad_norm", "state_norm", "rel_residual", "logz"):
            assert hist[name].at(step) == pytest.approx(exp[name], rel=1e-5), name
        assert hist["attn_logit_max"].at(step) == pytest.approx(exp["attn"], rel=1e-5)
    # update ratio of the last step and the spectral radius after it, against numpy
    before = expected[3]["before"]
    after = [p.detach() for p in model.parameters()]
    d = math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(after, before)))
    p = math.sqrt(sum(float((a.double() ** 2).sum()) for a in after))
    assert hist["update_ratio"].at(3) == pytest.approx(d / p, rel=1e-4)
    A = model.injection.W.weight.detach().double().numpy()[:, : model.config.d_state]
    assert hist["injection_radius"].at(3) == pytest.approx(np.abs(np.linalg.eigvals(A)).max(), rel=1e-4)
    assert hist["injection_norm"].at(3) <= np.linalg.norm(A, 2) * (1 + 1e-5)
    assert hist["lr"].at(3) == pytest.approx(3e-3)
    steps, values = hist["loss"].steps, hist["loss"].values
    assert list(steps) == [1, 2, 3] and list(hist["loss"])[0] == (1, values[0])


def _max_logit_by_hand(attn, args, n=2):
    a, rope = args[0][:n], args[1]  # the monitor looks at the first `attention_batch` = 2 sequences
    ve = args[2][:n] if len(args) > 2 and args[2] is not None else None
    q, k, _ = (t.transpose(1, 2) for t in attn.qkv(a, rope, ve))
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(attn.head_dim)
    S = s.shape[-1]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    return s[..., mask].max().detach()


def test_diagonal_injection_radius_is_exact_every_step():
    model = tiny("diagonal")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with StabilityMonitor(model, opt, console=False) as monitor:
        train_steps(model, opt, 3)
    abar = torch.exp(-torch.nn.functional.softplus(model.injection.dt_bias) * torch.exp(model.injection.A_log))
    assert monitor.history["injection_radius"].at(3) == pytest.approx(float(abar.max()), rel=1e-6)
    assert len(monitor.history["injection_radius"]) == 3


def test_loop_jacobian_sigma_matches_dense_svd():
    """Power iteration on JᵀJ with JVP/VJP against numpy's SVD of the dense Jacobian."""
    model = tiny("linear")
    with torch.no_grad():  # a dominant direction in Ā, so that power iteration converges fast
        g = torch.Generator().manual_seed(2)
        u, v = torch.randn(64, generator=g), torch.randn(64, generator=g)
        model.injection.W.weight[:, :64] += 0.8 * torch.outer(u / u.norm(), v / v.norm())
    idx = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(1))  # one token: no
    # near-copies of the top singular value across positions
    with torch.no_grad():
        ctx = model.encode(idx)
        h = model.init_state(ctx, generator=torch.Generator().manual_seed(0))
        h = model.step(h, ctx)
    f = lambda x: model.step(x, ctx)  # noqa: E731
    J = torch.autograd.functional.jacobian(f, h, vectorize=True).reshape(h.numel(), h.numel()).double().numpy()
    true = np.linalg.svd(J, compute_uv=False)[0]
    top2 = np.linalg.svd(J, compute_uv=False)[:2]
    assert top2[1] / top2[0] < 0.9
    sigma, v = loop_jacobian_sigma(f, h, None, iters=60, generator=torch.Generator().manual_seed(0))
    assert float(sigma) == pytest.approx(true, rel=1e-3)
    # Warm start: 3 more iterations from the converged vector keep the value.
    sigma2, _ = loop_jacobian_sigma(f, h, v, iters=3)
    assert float(sigma2) == pytest.approx(true, rel=1e-4)


def test_monitor_jacobian_estimate_is_a_tight_lower_bound():
    model = tiny("linear")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # parameters fixed: the estimate converges
    monitor = StabilityMonitor(model, opt, console=False, jacobian_every=1, jacobian_tokens=6)
    train_steps(model, opt, 6)
    monitor.close()
    idx = monitor.bus.probe_idx
    with torch.no_grad():
        ctx = model.encode(idx)
        h = model.init_state(ctx, generator=torch.Generator().manual_seed(0))
        for _ in range(model.config.mean_loops - 1):
            h = model.step(h, ctx)
    J = torch.autograd.functional.jacobian(lambda x: model.step(x, ctx), h, vectorize=True).reshape(h.numel(), -1).numpy()
    true = np.linalg.svd(J.astype(np.float64), compute_uv=False)[0]
    est = monitor.history["jacobian_norm"].values
    assert np.all(est <= true * (1 + 1e-4))
    assert est[-1] >= 0.95 * true


def test_eval_functorch_and_paused_forwards_are_not_recorded():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, console=False)
    x, y = next(batches(1))
    model.eval()
    with torch.no_grad():
        model(x, y)
    model.train()
    with monitor.pause():
        model(x, y)
    ctx = model.encode(x)
    h = model.init_state(ctx)
    torch.func.jvp(lambda s: model.step(s, ctx), (h,), (torch.ones_like(h),))
    # A whole training-mode forward inside a torch.func transform (grad enabled) is not a step either.
    params = {k: v.detach() for k, v in model.named_parameters()}
    torch.func.grad(lambda p: torch.func.functional_call(model, p, (x, y)).loss)(params)
    assert monitor.bus.acc == {} and monitor.bus.forwards_since_step == 0
    train_steps(model, opt, 1)
    assert len(monitor.history["loss"]) == 1
    monitor.close()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_generic_module_gets_the_generic_signals():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = StabilityMonitor(model, opt, console=False)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    losses = []
    for _ in range(5):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.record_loss(loss)  # after the step: belongs to the step just taken
        losses.append(float(loss))
    hist = monitor.history
    monitor.close()
    assert hist["loss"].values.tolist() == pytest.approx(losses)
    assert list(hist["loss"].steps) == [1, 2, 3, 4, 5]
    assert set(hist) >= {"grad_norm", "update_ratio", "logz", "lr"}
    assert hist["logz"].at(5) == pytest.approx(float(torch.logsumexp(model(x), -1).mean()), rel=0.2)
    assert not any(k.startswith(("state_", "injection", "jacobian")) for k in hist)


def test_a_probe_that_raises_is_disabled_with_one_warning(monkeypatch):
    model = tiny("linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, console=False)

    def boom():
        raise RuntimeError("probe bug")
    monkeypatch.setattr(monitor.bus.spectrum, "values", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, opt, 4)
    ours = [w for w in caught if "disabled" in str(w.message)]
    assert len(ours) == 1 and "spectral" in str(ours[0].message)
    assert "spectral" in monitor.disabled
    assert len(monitor.history["loss"]) == 4 and "injection_radius" not in monitor.history
    assert any(a.kind == "probe_error" for a in monitor.alerts)
    monitor.close()


def test_nan_loss_is_an_alert_not_a_crash():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(model, opt, console=False)
    train_steps(model, opt, 3)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    train_steps(model, opt, 2)
    monitor.close()
    kinds = {(a.kind, a.signal) for a in monitor.alerts}
    assert ("nonfinite", "loss") in kinds and ("nonfinite", "grad_norm") in kinds
    nan_alert = next(a for a in monitor.alerts if a.kind == "nonfinite" and a.signal == "loss")
    assert nan_alert.step == 4 and nan_alert.severity == "critical"


def test_state_dict_resume_continues_the_statistics(tmp_path):
    """40 steps in one go vs 20 + save/load + 20: same alerts (the spike at step 35 needs the
    20-step warm-up the first half provided)."""
    rng = np.random.default_rng(0)
    losses = 2 + 0.02 * rng.standard_normal(40)
    losses[34] = 4.0
    model = nn.Linear(2, 2)

    def run(monitor, values, start):
        for i, v in enumerate(values):
            monitor.record_loss(torch.tensor(v))  # no optimiser: each call is a step
        return [a for a in monitor.alerts if a.kind == "spike"]

    whole = StabilityMonitor(model, None, console=False)
    full = run(whole, losses, 0)
    whole.close()
    first = StabilityMonitor(model, None, console=False)
    run(first, losses[:20], 0)
    torch.save(first.state_dict(), tmp_path / "monitor.pt")
    first.close()
    second = StabilityMonitor(model, None, console=False)
    second.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    resumed = run(second, losses[20:], 20)
    second.close()
    assert [(a.step, a.value) for a in full] == [(a.step, a.value) for a in resumed] == [(35, full[0].value)]
    assert len(second.history["loss"]) == 40


def test_signal_buffer_moves_values_in_one_batch():
    buf = SignalBuffer()
    buf.add("a", 1, torch.tensor(1.5))
    buf.add("b", 1, 2.0)
    buf.add("a", 2, torch.tensor(3.0, dtype=torch.float16))
    out = buf.flush(block=False)  # CPU: nothing to wait for
    assert out == [("b", 1, 2.0), ("a", 1, 1.5), ("a", 2, 3.0)] and buf.syncs == 0
    assert buf.flush() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_signal_buffer_cuda_copies_are_asynchronous():
    buf = SignalBuffer()
    buf.add("a", 1, torch.tensor(1.5, device="cuda"))
    buf.flush(block=False)
    torch.cuda.synchronize()
    assert buf.flush(block=False) == [("a", 1, 1.5)] and buf.syncs == 0


def test_config_validation_and_unknown_options():
    from loopdyn.models.errors import InputError

    model = nn.Linear(2, 2)
    with pytest.raises(TypeError):
        StabilityMonitor(model, None, not_an_option=1)
    with pytest.raises(InputError):
        StabilityMonitor(model, None, sync_every=0)
    with pytest.raises(InputError):
        StabilityMonitor(model, None, on_warning="skip")
    with pytest.raises(InputError):
        StabilityMonitor(model, None, on_warning="cut-it")
    # one concept, the command line's spelling accepted too
    with StabilityMonitor(model, None, on_warning="cut-lr") as monitor:
        assert monitor.config.on_warning == "cut_lr"
    assert MonitorConfig().on_spike == "warn"


def test_config_nests_one_detector_each_and_sets_them_by_dotted_name():
    """The thresholds live in the detectors: MonitorConfig holds configured detectors (copied
    per monitor), a dotted option rebuilds one (its own checks run), None turns it off."""
    from loopdyn.models.errors import InputError
    from loopdyn.probes import EarlyWarningDetector, SpikeDetector

    cfg = MonitorConfig()
    assert cfg.loss_spike.min_rel == 0.05 and cfg.grad_spike.min_rel == 2.0 and cfg.early_warning.warmup == 15
    model = nn.Linear(2, 2)
    with StabilityMonitor(model, None, config=cfg, console=False,
                          **{"early_warning.warmup": 40, "early_warning.optimizer.jump": 5.0,
                             "loss_spike.method": "ema"}) as m:
        ew = m.policy.early_warning
        assert ew.warmup == 40 and ew.optimizer.jump == 5.0 and m.policy.detectors["loss"][0].method == "ema"
        assert ew is not cfg.early_warning and cfg.early_warning.warmup == 15  # the config is not touched
    with StabilityMonitor(model, None, console=False, early_warning=None, loop_instability=None) as m:
        assert m.early_warning is None and m.policy.loop_detector is None
    with StabilityMonitor(model, None, console=False, early_warning=EarlyWarningDetector(threshold=2.0)) as m:
        assert m.early_warning.threshold == 2.0
    for bad in ({"early_warning.optimizer.jump": 0.5}, {"loss_spike.method": "median"}, {"early_warning.nope": 1},
                {"loss_spike": SpikeDetector("grad_norm")}, {"early_warning": 3}):
        with pytest.raises(InputError):
            StabilityMonitor(model, None, console=False, **bad)
