"""The phase classifier on maps whose phase is known in closed form."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from loopdyn.dynamics.phases import classify_token, crossing_of, token_phases

T = 16


def orbit(step, x0, n=T):
    xs = [np.asarray(x0, float)]
    for _ in range(n):
        xs.append(step(xs[-1]))
    return np.array(xs)


def rotation(theta, r=1.0, center=(0.0, 0.0, 0.0, 0.0)):
    c, s = math.cos(theta), math.sin(theta)
    M = np.eye(4)
    M[:2, :2] = r * np.array([[c, -s], [s, c]])
    M[2:, 2:] = 0.3 * np.eye(2)
    ctr = np.asarray(center)
    return lambda x: ctr + M @ (x - ctr)


X0 = np.array([1.0, 0.5, 2.0, -1.0])


@pytest.mark.parametrize("k", [3, 4, 5, 7])
def test_rational_rotation_is_a_cycle_of_its_period(k):
    label, lam = classify_token(orbit(rotation(2 * math.pi / k, center=(1, 2, 0, 0)), X0), eps=1e-16)
    assert label == f"cycle {k}"


def far_from_rational(th, k_max=8, gap=0.02):
    return all(abs(th - 2 * math.pi * round(th * k / (2 * math.pi)) / k) > gap for k in range(1, k_max + 1))


@given(st.floats(0.3, 2.8).filter(far_from_rational))
def test_irrational_rotation_is_quasi_periodic(theta):
    label, lam = classify_token(orbit(rotation(theta, center=(1, 2, 0, 0)), X0), eps=1e-16)
    assert label == "quasi-periodic" and abs(abs(lam) - 1) < 1e-6


def test_period_two_maps():
    # linear flip about a centre: x ↦ c − (x − c)
    flip = lambda x: 2 * np.array([1.0, -1, 0.5, 0]) - x
    assert classify_token(orbit(flip, X0), eps=1e-16)[0] == "cycle 2"
    # a nonlinear period-2 orbit x = ±1 that attracts: x ↦ −x(1 + μ)/(1 + μx²)
    mu = 0.5
    f = lambda x: np.r_[-x[0] * (1 + mu) / (1 + mu * x[0] ** 2), 0.5 * x[1:] + 1]
    assert classify_token(orbit(f, X0, 24), eps=1e-16)[0] == "cycle 2"


@pytest.mark.parametrize("r", [0.5, 0.9, 0.97])
def test_contractions_are_fixed_points(r):
    label, lam = classify_token(orbit(rotation(1.0, r=r, center=(1, 2, 3, 4)), X0), eps=1e-16)
    assert label == "fixed point" and abs(lam) < 1


def test_drift_and_divergence():
    assert classify_token(orbit(lambda x: x + np.array([1.0, 0, 0, 0]), X0), eps=1e-16)[0] == "drifting"
    assert classify_token(orbit(lambda x: 1.3 * x, X0), eps=1e-16)[0] == "divergent"
    assert classify_token(orbit(rotation(1.0, r=1.2), X0), eps=1e-16)[0] == "divergent"
    bad = orbit(lambda x: 1.3 * x, X0)
    bad[-1, 0] = np.inf
    assert classify_token(bad)[0] == "divergent"


@pytest.mark.parametrize("lam,kind", [(0.98, "fold"), (1.02, "fold"), (-0.99, "flip"),
                                      (0.99 * complex(math.cos(1.0), math.sin(1.0)), "neimark-sacker")])
def test_crossing_types(lam, kind):
    c = crossing_of([0.2, lam, 0.5j])
    assert c["type"] == kind
    assert c["side"] == ("inside" if abs(lam) < 1 else "outside")
    assert crossing_of([0.5, -0.3]) is None  # nothing near the circle


def test_token_phases_json_and_plot(tmp_path):
    # three tokens: a cycle, a fixed point, a drift
    xs = [orbit(rotation(2 * math.pi / 3, center=(1, 2, 0, 0)), X0),
          orbit(lambda x: 0.5 * x + 1, X0),
          orbit(lambda x: x + 0.1, X0)]
    states = [torch.tensor(np.stack([x[t] for x in xs])[None]) for t in range(T + 1)]  # (1, 3, 4) float64
    ph = token_phases(states, eigenvalues=[-0.5 + 0.866j, -0.5 - 0.866j], source="test")
    js = ph.to_json()
    assert js["labels"] == ["cycle 3", "fixed point", "drifting"]
    assert js["counts"] == {"cycle 3": 1, "drifting": 1, "fixed point": 1}
    assert js["crossing"]["type"] == "neimark-sacker" and js["crossing"]["side"] == "on"
    assert "cycle 3 1" in ph.to_text()[0]
    from types import SimpleNamespace

    from loopdyn.plots import style
    from loopdyn.plots.audit import plot_phases

    fig, caption = plot_phases(SimpleNamespace(phases=ph, model=SimpleNamespace(injection="test")))
    assert "1 cycle 3" in caption and "neimark-sacker" in caption
    out = style.save(fig, tmp_path / "phases.png", "png", caption=caption)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_circle_maps_of_the_forecast_cases():
    """The limit-cycle cases of the forecast suite (period 3, quasi-periodic, period 2) and a
    contraction, measured by the real loop (LoopAdapter)."""
    from loopdyn.dynamics.trajectory import measure_trajectory
    from tests.forecast_cases import CASES, idx_of

    want = {"limit_cycle_period_3": "cycle 3", "limit_cycle_quasi_periodic": "quasi-periodic",
            "limit_cycle_period_2": "cycle 2", "lti_rho_0.97": "fixed point", "additive_drift": "drifting",
            "flip_on_circle": "cycle 2"}
    for name, label in want.items():
        case = CASES[name]
        traj = measure_trajectory(case.build(), idx_of(case), 24)
        ph = token_phases(traj.states)
        assert set(ph.labels) == {label}, (name, ph.labels)


def test_audit_reports_phases_in_json_and_text():
    from loopdyn.dynamics import audit
    from tests.helpers import small_loop_model

    model = small_loop_model("additive")  # official init: the core is the identity, h_t = t·e: drifting
    idx = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    report = audit(model, idx, loops=6, horizon=12)
    js = report.to_json()["phases"]
    assert js["labels"] == ["drifting"] * 10 and js["counts"] == {"drifting": 10}
    assert js["crossing"]["type"] == "fold"  # J = I: the eigenvalue +1
    assert "dynamical phase per token" in report.to_text()


def test_phases_of_states_that_carry_autograd_history():
    """`model.unroll` outside no_grad returns states with a graph (as the README's API block does):
    token_phases labels them exactly as it labels the detached states."""
    from tests.helpers import small_loop_model

    model = small_loop_model("diagonal", perturb=0.2)
    idx = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    states, _ = model.unroll(idx, 6)
    assert states[-1].requires_grad
    assert token_phases(states).labels == token_phases([s.detach() for s in states]).labels
