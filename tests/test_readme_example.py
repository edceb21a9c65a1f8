"""The documented examples run as written: docs/own-model.md's "Bring your own looped model" (and its
audit is right) and the README's "Python API" block."""
import re
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OWN_MODEL = ROOT / "docs" / "own-model.md"


def readme_block(heading: str, page: Path = README) -> str:
    text = page.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_bring_your_own_model_example_runs(capsys):
    torch.manual_seed(0)
    scope: dict = {}
    code = readme_block("# Bring your own looped model", OWN_MODEL)
    audit_part, monitor_part = code.split("from loopdyn import probes")  # the audit, then training
    exec(compile(audit_part, "docs/own-model.md", "exec"), scope)
    report, fc, net = scope["report"], scope["fc"], scope["net"]
    assert "VERDICT" in capsys.readouterr().out
    # Ā = 0.7·I given through linear_part: ρ(Ā) = ‖Ā‖ = 0.7 exactly
    assert abs(report.injection.spectral_radius - 0.7) < 1e-6 and report.skipped[0].startswith("gain graph")
    # the audit measured the user's own loop: compare with running the user's forward by hand
    idx = scope["idx"]
    with torch.no_grad():
        e = net.embed(idx)
        h = torch.zeros_like(e)
        norms = []
        for _ in range(net.n_loops):
            h = net.step(h, e)
            norms.append(float(h.norm(dim=-1).mean()))
    assert np.allclose(report.trajectory.state_norm[1:], norms, rtol=1e-6)
    # the forecast's curve starts with the measured loops, and the verdict is one of the three
    assert np.allclose(fc.state_norm[: net.n_loops], norms, rtol=1e-6)
    assert fc.verdict in ("stable", "marginal", "explosive") and len(fc.state_norm) == 24
    exec(compile("from loopdyn import probes" + monitor_part, "docs/own-model.md", "exec"), scope)
    # ... and the monitor recorded the loop signals of the user's model through the protocol
    monitor = scope["monitor"]
    assert len(monitor.history["state_norm"]) > 0 and len(monitor.history["injection_radius"]) > 0
    _, rho = monitor.history["injection_radius"].last
    assert abs(rho - float(net.A.detach().abs().max())) < 0.05  # ρ(diag A) = max |A_i| (A moved a little)


def test_python_api_block_runs(tmp_path, monkeypatch):
    """The README's "Python API" block runs as written (its checkpoint goes to a temporary folder)
    and each call gives what the README says it gives."""
    from loopdyn.models import LoopedLM

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(readme_block("## Python API"), "README.md", "exec"), scope)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and isinstance(scope["model"], LoopedLM)
    assert len(scope["states"]) == 8 + 1                      # h_0 .. h_8
    assert scope["logits"].shape == (2, 64, 256)
    assert len(scope["lyap"].exponents) == 4 and len(scope["fc"].state_norm) == 32
    assert scope["report"].verdict in ("stable", "marginal", "explosive")
