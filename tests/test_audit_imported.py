"""`loopdyn audit` on imported Huginn/Raven and Ouro checkpoints (fixtures built from the specs):
the verdict of a renormalised loop follows what the norm hides, and Ouro's exit gate is audited."""
import json

import numpy as np
import pytest

from loopdyn import dynamics
from loopdyn.cli import main
from tests.huginn_reference import make_huginn_checkpoint
from tests.ouro_reference import make_ouro_checkpoint

ARGS = ["--seq-len", "12", "--batch", "2", "--loops", "6", "--horizon", "12", "--no-progress"]


@pytest.mark.parametrize("make, fmt", [(make_huginn_checkpoint, "huginn"), (make_ouro_checkpoint, "ouro")])
def test_cli_audit_of_imported_checkpoints(tmp_path, capsys, make, fmt):
    ckpt = make(tmp_path / fmt, seed=1)
    out_json = tmp_path / "audit.json"
    plots = tmp_path / "plots"
    code = main(["audit", str(ckpt), "--json", str(out_json), "--plots", str(plots), *ARGS])
    out, err = capsys.readouterr()
    assert code == 0, err
    js = json.loads(out_json.read_text())
    assert js["model"]["format"] == fmt
    norm = js["normalised"]
    assert norm is not None and norm["verdict"] == js["verdict"]
    # the post-norm state norm is what the trajectory measures; the pre-norm one is what the norm hides
    assert len(norm["pre_norm"]) == 6 and np.allclose(js["trajectory"]["state_norm"], norm["post_norm"], rtol=1e-5)
    if fmt == "ouro":
        assert js["injection"]["spectral_radius"] is None and "no LTI part" in js["injection"]["skipped"]
        gate = js["exit_gate"]
        assert gate["threshold"] == 0.5 and gate["tokens"] == 2 * 12
        assert "exit gate" in out.lower() and (plots / "exit_gate.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert js["injection"]["spectral_radius"] is not None and js["exit_gate"] is None
        assert not (plots / "exit_gate.png").exists()


@pytest.mark.parametrize("rotate, verdict", [(True, "marginal"), (False, "stable")])
def test_normalised_verdict_follows_what_the_norm_hides(rotate, verdict):
    """h ↦ RMSNorm(3·Q h): the post-norm state norm is flat by construction, the norm absorbs a gain
    of exactly 3 every loop. With Q a rotation by 2π/5 in each plane the state circles on the sphere
    for ever (marginal); with Q = I it sits at a fixed point from loop 1 (stable)."""
    import math

    import torch

    from loopdyn.models import LoopAdapter

    c, s = math.cos(2 * math.pi / 5), math.sin(2 * math.pi / 5)
    Q = torch.block_diag(*[torch.tensor([[c, -s], [s, c]])] * 4) if rotate else torch.eye(8)
    W = 3.0 * Q
    emb = torch.nn.Embedding(256, 8)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    model = LoopAdapter(encode=emb, init_state=lambda e: e.clone(), step=lambda h, e: rms(h @ W.T),
                        decode=lambda h, e: h @ emb.weight.T, mean_loops=4, module=emb,
                        state_norm_kind="post", pre_norm_state=lambda h, e: h @ W.T)
    idx = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    rep = dynamics.audit(model, idx, loops=6, horizon=12)
    assert np.allclose(rep.trajectory.state_norm[1:], math.sqrt(8), rtol=1e-4)  # flat by construction
    js = rep.to_json()["normalised"]
    assert np.allclose(js["absorbed_gain"][1:], 3.0, rtol=1e-4)
    assert rep.normalised.verdict == rep.verdict == verdict


@pytest.mark.parametrize("make, fmt", [(make_huginn_checkpoint, "huginn"), (make_ouro_checkpoint, "ouro")])
def test_sweep_loops_on_imported_checkpoints(tmp_path, capsys, make, fmt):
    ckpt = make(tmp_path / fmt, seed=2, vocab_size=256)
    csv = tmp_path / "sweep.csv"
    code = main(["sweep-loops", str(ckpt), "--max-loops", "5", "--batches", "2", "--batch-size", "2",
                 "--seq-len", "8", "--csv", str(csv), "--no-progress", "--no-dynamics"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = csv.read_text().splitlines()
    assert rows[0] == "loops,mean_recurrence,params,tokens,loss" and len(rows) == 6
    # the loss at T loops is the model's own forward at T loops on the same batches
    assert all(np.isfinite(float(r.split(",")[-1])) for r in rows[1:])
    assert "unrolled parameters unknown" in out
