"""Loops past the trained depth: overthinking and the best test-time loop count, in sweep-loops and the audit."""
import math

import numpy as np
import pytest
import torch

from loopdyn.dynamics.overthinking import overthinking
from tests.helpers import small_loop_model


def test_rising_loss_past_the_trained_depth_overthinks():
    loops = np.arange(1, 13)
    loss = np.r_[3.0, 2.6, 2.4, 2.30, 2.28, 2.29, 2.35, 2.45, 2.6, 2.8, 3.0, 3.3]  # μ = 4, best at T = 5
    o = overthinking(loops, loss, 4)
    assert o.overthinks and o.best_loops == 5 and o.best_loss == pytest.approx(2.28)
    assert o.rise == pytest.approx(3.3 / 2.28 - 1)
    assert "overthinks" in o.summary() and "T = 5" in o.summary()


@pytest.mark.parametrize("loss", [
    np.r_[3.0, 2.5, 2.3, 2.2, 2.15, 2.12, 2.11, 2.105],  # keeps improving: best near the end
    np.r_[3.0, 2.5, 2.3, 2.2, 2.201, 2.199, 2.202, 2.2],  # flat past μ within noise (< 0.5%)
])
def test_no_overthinking(loss):
    o = overthinking(np.arange(1, 9), loss, 4)
    assert not o.overthinks
    # the best loop count is the smallest T within 0.5% of the minimum
    best = loss.min()
    assert o.best_loops == int(np.nonzero(loss <= best * 1.005)[0][0]) + 1


def test_nonfinite_loss_past_the_depth_overthinks():
    o = overthinking(np.arange(1, 7), np.r_[3.0, 2.5, 2.4, 2.3, np.inf, np.nan], 4)
    assert o.overthinks and math.isinf(o.rise) and o.best_loops == 4


def test_per_token_best_depth_in_the_overthinking_line():
    """Tokens whose loss bottoms out at known loops (3, 5, 5, 7) and rises after: each token's best
    depth is found with the reason 'overthinking'; a cycling token gets 'cycling'."""
    H = 12
    t = np.arange(1, H + 1)[:, None]
    best = np.array([3, 5, 5, 7])
    token_loss = 2.0 + 0.1 * np.abs(t - best[None, :])
    labels = ["fixed point", "fixed point", "cycle 2", "fixed point"]
    o = overthinking(np.arange(1, H + 1), token_loss.mean(1), 4, token_loss=token_loss, token_labels=labels)
    d = o.per_token
    assert d.best.tolist() == [3, 5, 5, 7]
    assert d.reason == ("overthinking", "overthinking", "cycling", "overthinking") and d.period.tolist() == [0, 0, 2, 0]
    assert "per token:" in o.summary()
    assert overthinking(np.arange(1, H + 1), token_loss.mean(1), 4).per_token is None


def test_audit_says_whether_the_model_overthinks_with_the_dynamical_reason():
    from loopdyn.dynamics import audit

    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    add = audit(small_loop_model("additive", perturb=0.05), idx, loops=4, horizon=16)
    o = add.forecast.overthinking
    assert o is not None and len(o.loss) == 16 and np.all(np.isfinite(o.loss))
    # the probe loss equals the model's own loss at each loop count (independent path: forward)
    model = small_loop_model("additive", perturb=0.05)
    for T in (1, 4, 9, 16):
        assert o.loss[T - 1] == pytest.approx(float(model(idx[:, :-1], idx[:, 1:], n_loops=T).loss), rel=1e-4)
    assert "dynamical reason" in o.reason and "marginal" in add.verdict
    # per token: the best depth of each of the 2 × 9 tokens with a target; their mean is the probe loss
    assert o.per_token is not None and len(o.per_token.best) == 18 and len(o.per_token.reason) == 18
    np.testing.assert_allclose(o.per_token.mean_loss, o.loss, rtol=1e-6)
    assert o.per_token.probe_best == o.best_loops
    lo, hi = o.per_token.interval
    assert lo <= o.best_loops <= hi and "per token: best depth of the probe" in o.summary()
    assert any(e.startswith("loops past the trained depth") for e in add.to_json()["forecast"]["evidence"])
    par = audit(small_loop_model("diagonal", perturb=0.05), idx, loops=4, horizon=16)
    assert par.verdict == "stable" and "converges" in par.forecast.overthinking.reason


def test_sweep_loops_reports_overthinking(tmp_path, capsys):
    from loopdyn.cli import main
    from loopdyn.models import save

    src = tmp_path / "corpus.txt"
    src.write_bytes(open(__file__, "rb").read() * 4)
    ckpt = save(small_loop_model("additive", perturb=0.05), tmp_path / "m")
    assert main(["sweep-loops", str(ckpt), "--data", str(src), "--batches", "1", "--batch-size", "2",
                 "--seq-len", "16", "--max-loops", "12", "--csv", str(tmp_path / "s.csv"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("loops past the trained depth"))
    assert ("overthinks" in line or "does not overthink" in line) and "best test-time loop count" in line
    assert "dynamical reason" in line
