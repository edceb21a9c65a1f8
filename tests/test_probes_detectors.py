"""Detectors on synthetic streams with known injected events: recall, precision and lead
times are computed against the injected ground truth, not eyeballed."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from loopdyn.probes import (Alert, EarlyWarningDetector, Escalation, LoopInstabilityDetector, NonFiniteDetector,
                            OptimizerWatch, SpikeDetector, TrendDetector)


def loss_stream(n=2000, n_spikes=12, seed=0, noise=0.05):
    """A decaying training loss with heavy-tailed noise and `n_spikes` injected spikes
    (+0.5 … +3 nats, decaying over a few steps); returns (values, spike steps)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 2.0 + 1.5 * np.exp(-t / 300) + noise * rng.standard_t(5, size=n)
    spikes = np.sort(rng.choice(np.arange(100, n - 20, 40), size=n_spikes, replace=False))
    for s in spikes:
        height = rng.uniform(0.5, 3.0)
        for k in range(4):
            x[s + k] += height * 0.4 ** k
    return x, spikes


def score_alerts(alert_steps, truth, tolerance=2):
    """(recall, precision): an alert within [s, s + tolerance] of a true event s is a hit."""
    alert_steps = np.asarray(sorted(alert_steps))
    hit_events = sum(any(s <= a <= s + tolerance for a in alert_steps) for s in truth)
    good_alerts = sum(any(s <= a <= s + tolerance for s in truth) for a in alert_steps)
    recall = hit_events / len(truth)
    precision = good_alerts / len(alert_steps) if len(alert_steps) else 1.0
    return recall, precision


def run(detector, values, start=0):
    return [a for i, v in enumerate(values) if (a := detector.forward(start + i, detector.signal, float(v))) is not None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mad_spike_detector_recall_and_precision(seed):
    x, truth = loss_stream(seed=seed)
    alerts = run(SpikeDetector("loss", "mad", min_rel=0.05), x)
    recall, precision = score_alerts([a.step for a in alerts], truth)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    first = {s: min((a.step for a in alerts if s <= a.step <= s + 2), default=None) for s in truth}
    assert all(v == s for s, v in first.items() if v is not None)  # reported at the spike step itself


@pytest.mark.parametrize("seed", [0, 1])
def test_ema_spike_detector_recall_and_precision(seed):
    x, truth = loss_stream(seed=seed, noise=0.03)
    alerts = run(SpikeDetector("loss", "ema", warmup=25), x)
    recall, precision = score_alerts([a.step for a in alerts], truth)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_ratio_detector_on_gradient_norm_bursts():
    """Megatron-style 10× rule on a log-normal gradient norm with ×30 … ×100 bursts."""
    rng = np.random.default_rng(3)
    g = np.exp(rng.normal(0.0, 0.3, size=1500))
    truth = np.arange(150, 1450, 97)
    g[truth] *= rng.uniform(30, 100, size=len(truth))
    alerts = run(SpikeDetector("grad_norm", "ratio"), g)
    recall, precision = score_alerts([a.step for a in alerts], truth, tolerance=0)
    assert recall == 1.0 and precision == 1.0


def test_spike_detector_is_silent_during_warmup_and_on_a_level_shift():
    det = SpikeDetector("loss", "mad", warmup=20, window=64)
    quiet = run(det, [5.0] * 5 + list(np.linspace(5, 1, 15)))  # warm-up: anything goes
    assert quiet == []
    # A lasting shift: one alert at the jump, then the new level is accepted.
    rng = np.random.default_rng(0)
    det = SpikeDetector("loss", "mad", window=64)
    stream = np.r_[2 + 0.02 * rng.standard_normal(100), 4 + 0.02 * rng.standard_normal(200)]
    alerts = run(det, stream)
    assert [a.step for a in alerts] == [100]
    assert det.forward(400, "loss", 4.0) is None and det.forward(401, "loss", 6.0) is not None  # sensitive again


@settings(max_examples=30)
@given(st.floats(1e-3, 1e3), st.integers(0, 50), st.sampled_from(["mad", "ema", "ratio"]))
def test_spike_alerts_are_invariant_to_the_signal_scale(scale, seed, method):
    x, _ = loss_stream(n=400, n_spikes=5, seed=seed)
    a = [al.step for al in run(SpikeDetector("s", method), x)]
    b = [al.step for al in run(SpikeDetector("s", method), x * scale)]
    assert a == b


@settings(max_examples=30)
@given(st.integers(0, 10_000))
def test_bounded_noise_never_alarms(seed):
    """Uniform noise: |x − median| ≤ 1 while 6 robust σ ≈ 4.4, so a MAD alert is impossible."""
    x = 3 + np.random.default_rng(seed).uniform(-1, 1, size=300)
    assert run(SpikeDetector("loss", "mad"), x) == []


@settings(max_examples=30)
@given(st.integers(0, 1000), st.integers(30, 370), st.sampled_from(["mad", "ema", "ratio"]))
def test_spike_state_dict_resumes_exactly(seed, cut, method):
    x, _ = loss_stream(n=400, n_spikes=6, seed=seed)
    whole = [a.step for a in run(SpikeDetector("s", method), x)]
    first = SpikeDetector("s", method)
    part1 = [a.step for a in run(first, x[:cut])]
    resumed = SpikeDetector("s", method)
    resumed.load_state_dict(first.state_dict())
    part2 = [a.step for a in run(resumed, x[cut:], start=cut)]
    assert part1 + part2 == whole


def test_nonfinite_detector_alerts_once_per_episode():
    det = NonFiniteDetector("loss")
    values = [1.0, math.nan, math.inf, 2.0, -math.inf]
    alerts = run(det, values)
    assert [(a.step, a.severity, a.kind) for a in alerts] == [(1, "critical", "nonfinite"), (4, "critical", "nonfinite")]
    assert SpikeDetector("loss").forward(0, "loss", math.nan) is None  # spikes ignore non-finite values


def test_trend_detector_finds_exponential_growth_and_not_noise():
    rng = np.random.default_rng(0)
    flat = 30 * np.exp(0.1 * rng.standard_normal(200))
    assert run(TrendDetector("state_norm", warmup=30), flat) == []
    growing = np.r_[flat[:100], 30 * np.exp(0.05 * np.arange(1, 101) + 0.1 * rng.standard_normal(100))]
    alerts = run(TrendDetector("state_norm", warmup=30, min_growth=2.0), growing)
    assert len(alerts) == 1
    # 0.05/step over a 30-point window: ×4.3 once the window is all growth; ×2 after ~14 points.
    assert 100 < alerts[0].step <= 125
    assert alerts[0].value >= 2.0


def _feed(ew, series, steps):
    """Feed {signal: values} step by step; return the first alert."""
    for i in steps:
        for name, values in series.items():
            if i < len(values) and values[i] is not None:
                ew.update(i, name, float(values[i]))
        alert = ew.compute(i)
        if alert is not None:
            return alert
    return None


def test_early_warning_precedes_a_state_explosion_with_a_lead_estimate():
    """State norm flat, then growing 15 %/step from step 100; the 'loss spike' is when the
    state reaches 30× its level (step 100 + ln 30/ln 1.15 ≈ 124). The warning must come first."""
    rng = np.random.default_rng(1)
    n = 160
    state = 30 * np.exp(0.05 * rng.standard_normal(n))
    growth = np.where(np.arange(n) >= 100, 1.15 ** (np.arange(n) - 100), 1.0)
    state = state * growth
    spike_step = 100 + int(math.ceil(math.log(30) / math.log(1.15)))
    loss = 2.5 + 0.05 * rng.standard_normal(n)
    alert = _feed(EarlyWarningDetector(), {"state_norm": state, "loss": loss}, range(n))
    assert alert is not None and alert.kind == "spike_warning" and alert.family == "spike"
    assert alert.signal == "state_norm" and alert.value == pytest.approx(state[alert.step])  # the signal's value
    assert alert.score >= alert.threshold == 1.0  # the fused score against its threshold
    lead = spike_step - alert.step
    assert lead >= 5, lead
    assert alert.lead_time is not None and alert.lead_time >= 0


def test_early_warning_projects_the_spectral_radius_crossing():
    """ρ rises 0.01/step from 0.7 at step 50: it reaches 1 at step 80. Before that the steady
    climb is a moderate precursor whose lead estimate matches the true remaining steps; a one-step
    update spike at step 74 does not confirm it, an update moving the weights by 6 % does: the
    fused warning fires there, 6 steps ahead."""
    n = 120
    rho = np.array([0.7 if i < 50 else 0.7 + 0.01 * (i - 50) for i in range(n)])
    ew = EarlyWarningDetector(warmup=10)
    assert _feed(ew, {"injection_radius": rho}, range(76)) is None
    (p,) = ew.last_precursors
    assert p.signal == "injection_radius" and p.score == 0.5 and p.lead == pytest.approx(80 - 75, abs=0.5)
    # Past 1, ρ alone is a moderate spike precursor only; on its own it is the other family:
    # the loop will explode at more loops, whatever the loss does.
    assert _feed(ew, {"injection_radius": rho}, range(76, n)) is None
    loop = LoopInstabilityDetector()
    found = []
    for i in range(n):
        loop.update(i, "injection_radius", rho[i])
        a = loop.compute(i)
        if a is not None:
            found.append(a)
    assert found[0].step == 81 and found[0].kind == "loop_instability" and found[0].family == "loop_instability"
    assert found[0].value == pytest.approx(rho[81]) and found[0].threshold == 1.0

    rng = np.random.default_rng(5)
    u = 0.005 * (1 + 0.05 * rng.standard_normal(n))
    u[74] = 0.03  # a one-step update spike (a hard batch) says nothing about ρ's drift
    assert _feed(EarlyWarningDetector(warmup=10), {"injection_radius": rho, "update_ratio": u}, range(n)) is None
    u[74] = 0.06  # an update that moves the weights by 6 % of their norm is evidence of its own
    fused = _feed(EarlyWarningDetector(warmup=10), {"injection_radius": rho, "update_ratio": u}, range(n))
    assert fused.step == 74 and fused.lead_time == pytest.approx(80 - 74, abs=1)
    assert fused.score == pytest.approx(1.0) and fused.value in (pytest.approx(u[74]), pytest.approx(rho[74]))


def test_early_warning_needs_fused_evidence_and_ignores_guaranteed_stable_injections():
    rng = np.random.default_rng(2)
    n = 100
    g = 1 + 0.05 * rng.standard_normal(n)
    g[60] = 10.0  # one gradient spike alone: a moderate precursor, not an alarm
    assert _feed(EarlyWarningDetector(), {"grad_norm": g}, range(n)) is None
    u = 0.005 * (1 + 0.05 * rng.standard_normal(n))
    u[60] = 0.03  # the update spikes with it: the same hard batch, one event, still no alarm
    assert _feed(EarlyWarningDetector(), {"grad_norm": g, "update_ratio": u}, range(n)) is None
    # Confirmed by evidence of another kind (the state norm ×3 its reference from step 58), it fires.
    state = 20 * (1 + 0.02 * rng.standard_normal(n))
    state[58:] *= 3
    alert = _feed(EarlyWarningDetector(), {"grad_norm": g, "update_ratio": u, "state_norm": state}, range(n))
    assert alert is not None and alert.step == 60 and alert.score == pytest.approx(1.0)
    assert alert.value in (pytest.approx(10.0), pytest.approx(0.03), pytest.approx(state[60]))
    # ρ above 1 for an injection that cannot cross 1 (e.g. additive: ρ = 1 exactly) is ignored.
    rho = np.full(n, 1.0)
    assert _feed(EarlyWarningDetector(watch_radius=False), {"injection_radius": rho * 1.01}, range(n)) is None


def test_early_warning_lasting_update_ratio_shift_is_not_a_spike():
    rng = np.random.default_rng(4)
    n = 120
    u = 0.005 * (1 + 0.05 * rng.standard_normal(n))
    u[60:] *= 3  # a learning-rate change: one fresh spike at 60, held for 5 steps only
    ew = EarlyWarningDetector()
    _feed(ew, {"update_ratio": u}, range(70))
    assert ew.last_score == 0


def _at(steps, values):
    """values observed at `steps` only, as _feed's step-indexed list (None elsewhere)."""
    out = [None] * (max(steps) + 1)
    for s, v in zip(steps, values):
        out[s] = v
    return out


def test_absolute_precursors_warn_from_the_first_steps():
    """A run with too short a warm-up breaks before any reference exists: the update ratio's own
    level and the state norm's per-step growth rate count from step 1 (the relative precursors
    wait `warmup` steps)."""
    # One update that moves the weights by 12 % of their norm: strong on its own, at step 2.
    alert = _feed(EarlyWarningDetector(), {"update_ratio": _at(range(1, 4), [0.004, 0.12, 0.06])}, range(1, 4))
    assert alert is not None and alert.step == 2 and alert.signal == "update_ratio"
    assert alert.value == pytest.approx(0.12) and alert.score == pytest.approx(1.0)
    # A measured level counts for spike_hold (5) steps, not until the next measurement.
    ew = EarlyWarningDetector()
    assert _feed(ew, {"update_ratio": _at(range(1, 3), [0.004, 0.12])}, range(1, 20)).step == 2
    ew.compute(6)
    assert [p.signal for p in ew.last_precursors] == ["update_ratio"]
    ew.compute(7)
    assert not [p for p in ew.last_precursors if p.signal == "update_ratio"]
    # 6 %: moderate, it needs a second precursor; a healthy 1 % is nothing.
    assert _feed(EarlyWarningDetector(), {"update_ratio": _at(range(1, 6), [0.06] * 5)}, range(1, 6)) is None
    ew = EarlyWarningDetector()
    assert _feed(ew, {"update_ratio": _at(range(1, 6), [0.01] * 5)}, range(1, 6)) is None and ew.last_score == 0
    # ‖h_T‖ ×1.9–3.9 per step from step 1 (the measured 1-step warm-up run: 11.5, 45, 85, 223):
    # the third growing interval makes it strong, at step 4; a healthy start (≤ ×1.2) is nothing.
    alert = _feed(EarlyWarningDetector(), {"state_norm": _at(range(1, 6), [11.5, 45.4, 85.0, 223.0, 523.0])}, range(1, 6))
    assert alert is not None and alert.step == 4 and alert.signal == "state_norm" and alert.value == 223.0
    ew = EarlyWarningDetector()
    assert _feed(ew, {"state_norm": _at(range(1, 8), [11.5, 11.2, 13.6, 16.4, 19.8, 19.0, 20.7])}, range(1, 8)) is None
    assert ew.last_score == 0
    # Sparse observations (every 10 steps) are judged per step: ×1.04 per step is no explosion,
    # ×1.6 per step is.
    slow = [10 * 1.04 ** (10 * k) for k in range(5)]
    assert _feed(EarlyWarningDetector(), {"state_norm": _at(range(0, 50, 10), slow)}, range(50)) is None
    fast = [10 * 1.6 ** (10 * k) for k in range(5)]
    alert = _feed(EarlyWarningDetector(), {"state_norm": _at(range(0, 50, 10), fast)}, range(50))
    assert alert is not None and alert.step == 30


@given(st.floats(0.3, 3.0), st.floats(1.0, 1.45), st.integers(1, 10))
@settings(max_examples=40, deadline=None)
def test_state_rate_is_scale_free_and_silent_below_its_rate(scale, rate, gap):
    """Any state norm growing slower than ×1.5 per step never triggers the rate precursor,
    whatever its scale or observation gap; ×1.5 and faster always does, by the 4th observation."""
    steps = range(0, 8 * gap, gap)
    ew = EarlyWarningDetector(warmup=10**6)  # the relative precursors (growth vs reference) stay out
    assert _feed(ew, {"state_norm": _at(steps, [scale * rate ** s for s in steps])}, steps) is None
    alert = _feed(EarlyWarningDetector(warmup=10**6),
                  {"state_norm": _at(steps, [scale * (rate + 0.6) ** s for s in steps])}, steps)
    assert alert is not None and alert.step == 3 * gap


def test_alert_record_has_exactly_the_contract_fields():
    a = Alert(3, "spike", "warning", "loss", math.inf, 6.0, "m", lead_time=2.0, detected_step=4)
    rec = a.record()
    assert list(rec) == ["step", "kind", "severity", "signal", "value", "threshold", "score", "message",
                         "lead_time", "detected_step"]
    assert rec["value"] is None and rec["threshold"] == 6.0 and rec["score"] is None
    assert Alert.from_state(a.to_state()).record() == rec


def test_spike_alert_value_is_the_signal_and_score_the_statistic():
    x = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(40)] + [3.0]
    (alert,) = run(SpikeDetector("loss"), x)
    assert alert.value == pytest.approx(3.0) and alert.threshold == 6.0
    med = float(np.median(x[:40]))
    mad = float(np.median(np.abs(np.array(x[:40]) - med)))
    assert alert.score == pytest.approx((3.0 - med) / (1.4826 * mad), rel=1e-6)


def watch(w, step, groups, n_state):
    """One optimiser step seen by an OptimizerWatch; the precursors it found then."""
    w.update(step, "param_groups", (groups, n_state))
    return w.new


def test_optimizer_watch_flags_jumps_and_ramps_but_not_warm_up():
    w = OptimizerWatch()
    found = {}
    lrs = [1e-3 * (k + 1) / 10 for k in range(10)] + [1e-3] * 20 + [2e-2] * 5  # warm-up, plateau, ×20
    for step, lr in enumerate(lrs, start=1):
        new = watch(w, step, [{"lr": lr, "betas": (0.9, 0.95)}], 4)
        if new:
            found[step] = new
    assert min(found) == 31  # nothing during warm-up (×2 at most per step), the jump at once
    jump = next(p for p in found[31] if "jumped" in p.text)
    assert jump.score == 1.0 and jump.value == pytest.approx(2e-2) and "×20" in jump.text
    assert all("jumped" not in p.text for s in range(32, 36) for p in found[s])  # then it is a plateau ×20
    # A ramp after a plateau: moderate at ×1.5, strong at ×3.
    w = OptimizerWatch()
    scores = []
    for step in range(1, 60):
        lr = 1e-3 if step <= 30 else 1e-3 * 1.1 ** (step - 30)
        watch(w, step, [{"lr": lr}], 4)
        scores.append(max((p.score for p in w.compute(step) if p.signal == "lr"), default=0.0))
    first_mod = 1 + next(i for i, s in enumerate(scores) if s >= 0.5)
    first_strong = 1 + next(i for i, s in enumerate(scores) if s >= 1.0)
    assert 1.1 ** (first_mod - 30) >= 1.5 > 1.1 ** (first_mod - 31)
    assert 1.1 ** (first_strong - 30) >= 3 > 1.1 ** (first_strong - 31)
    # A changed setting or a state reset: moderate.
    w = OptimizerWatch()
    watch(w, 1, [{"lr": 1e-3, "betas": (0.9, 0.95)}], 4)
    (p,) = watch(w, 2, [{"lr": 1e-3, "betas": (0.9, 0.999)}], 4)
    assert p.signal == "optimizer" and p.score == 0.5 and "betas" in p.text
    (p,) = watch(w, 3, [{"lr": 1e-3, "betas": (0.9, 0.999)}], 0)
    assert "reset" in p.text


def test_escalation_reports_again_only_as_things_worsen_and_rate_limited():
    esc = Escalation(factor=1.5, every=10, rearm=10)
    reports = []
    rho = [1.2 * 1.02 ** i for i in range(100)]  # worsening 2 %/step
    for step, r in enumerate(rho):
        k = esc.update(step, True, {"injection_radius": r})
        if k is not None:
            reports.append((step, k))
    steps = [s for s, _ in reports]
    assert [k for _, k in reports] == list(range(len(reports)))
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:]))  # rate-limited
    for a, b in zip(steps, steps[1:]):  # each report after the evidence grew ×1.5 since the last
        assert rho[b] >= 1.5 * rho[a] > rho[b - 1]
    esc2 = Escalation()
    assert [esc2.update(s, True, {"x": 2.0}) for s in range(30)].count(None) == 29  # flat: one report only
    for s in range(30, 40):
        esc2.update(s, False, {})
    assert esc2.update(41, True, {"x": 2.0}) == 0  # a new episode after `rearm` quiet steps


def test_loop_instability_needs_persistent_state_growth():
    det = LoopInstabilityDetector()
    growth = [1.2] * 20 + [1.6, 1.7, 1.2] + [1.6] * 10
    fired = []
    for step, g in enumerate(growth):
        det.update(step, "state_growth", g)
        a = det.compute(step)
        if a is not None:
            fired.append(a)
    assert fired[0].step == 23 + 4 and fired[0].signal == "state_growth" and fired[0].threshold == 1.5
    assert det.first_step == 27


@settings(max_examples=40, deadline=None)
@given(st.floats(-5, 5), st.floats(-10, 10), st.integers(3, 40), st.integers(0, 10_000))
def test_theil_sen_is_exact_on_a_line_and_robust_to_one_outlier(slope, intercept, n, seed):
    """Ground truth: on y = a·x + b every pairwise slope is a, so the median is a and Kendall's τ
    is sign(a); one wild point moves at most n − 1 of the n(n−1)/2 slopes, so for n ≥ 5 the
    median stays a (closed form, not the library's own answer)."""
    from loopdyn.probes.detectors import theil_sen

    x = np.sort(np.random.default_rng(seed).choice(np.arange(1000.0), size=n, replace=False))
    y = slope * x + intercept
    a, tau = theil_sen(x, y)
    assert a == pytest.approx(slope, abs=1e-9)
    if abs(slope) > 1e-6:
        assert tau == pytest.approx(math.copysign(1.0, slope))
    if n >= 5:
        y[n // 2] += 1e6
        assert theil_sen(x, y)[0] == pytest.approx(slope, abs=1e-6)
    assert theil_sen(np.ones(n), y) == (0.0, 0.0)  # no spread in x: no slope


def test_every_detector_has_the_one_interface():
    """update(step, signal, value) feeds, compute(step) concludes, forward does both; a signal a
    detector does not watch changes nothing."""
    from loopdyn.probes import Detector

    for det in (SpikeDetector("loss"), NonFiniteDetector("loss"), TrendDetector("state_norm"),
                EarlyWarningDetector(), LoopInstabilityDetector(), OptimizerWatch()):
        assert isinstance(det, Detector)
        before = det.state_dict()
        det.update(0, "some_other_signal", 1.0)
        if not isinstance(det, EarlyWarningDetector):  # the early warning watches every signal
            assert det.state_dict() == before
    assert NonFiniteDetector("loss").forward(3, "loss", math.nan).step == 3
    assert NonFiniteDetector("loss").forward(3, "grad_norm", math.nan) is None


def test_detectors_check_their_own_arguments():
    for bad in (lambda: SpikeDetector("loss", "median"), lambda: SpikeDetector("loss", threshold=0),
                lambda: OptimizerWatch(jump=1.0), lambda: Escalation(factor=1.0),
                lambda: LoopInstabilityDetector(growth=0.9), lambda: TrendDetector("x", min_growth=-1)):
        with pytest.raises(ValueError):
            bad()
    assert SpikeDetector("loss").threshold == 6.0 and SpikeDetector("loss", "ratio").threshold == 10.0
