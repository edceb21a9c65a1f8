"""The README's "Bring your own looped model" example runs as written, and its audit is right."""
import re
from pathlib import Path

import numpy as np
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_bring_your_own_model_example_runs(capsys):
    torch.manual_seed(0)
    scope: dict = {}
    code = readme_block("## Bring your own looped model")
    audit_part, monitor_part = code.split("from loopdyn import probes")  # the audit, then training
    exec(compile(audit_part, "README.md", "exec"), scope)
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
    exec(compile("from loopdyn import probes" + monitor_part, "README.md", "exec"), scope)
    # ... and the monitor recorded the loop signals of the user's model through the protocol
    monitor = scope["monitor"]
    assert len(monitor.history["state_norm"]) > 0 and len(monitor.history["injection_radius"]) > 0
    _, rho = monitor.history["injection_radius"].last
    assert abs(rho - float(net.A.detach().abs().max())) < 0.05  # ρ(diag A) = max |A_i| (A moved a little)
