"""Every figure rendered headless (Agg) and checked for content: axis labels, integer ticks on
loop/index axes, labelled reference lines, linear vs log ρ axes, one colour per
parameterisation across figures, legends that cover no data (checked here with the artists'
own display-space geometry, independently of loopdyn.plots.style's placement code), file formats,
and captions that describe only what was drawn."""
from __future__ import annotations

import io
import math
import types
from dataclasses import asdict

import matplotlib
import numpy as np
import pytest
import torch

from loopdyn.plots import style
from loopdyn.cli import main
from loopdyn.compare import CompareResult, RunRecord, RunSpec
from tests.helpers import small_loop_model

matplotlib.use("Agg")
MU = 4
UNIGRAM = 3.26


# ---- independent geometry checks ---------------------------------------------------------------

def _data_lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_gid() != "reference-line" and len(ln.get_xdata())
            and not ln.get_label().startswith("_child")]


def _segment_hits_box(p, q, box) -> bool:
    """Does the segment p→q (display px) pass through the box? (Liang–Barsky clipping)."""
    x0, y0, x1, y1 = box.x0 + 1, box.y0 + 1, box.x1 - 1, box.y1 - 1
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, p[0] - x0), (dx, x1 - p[0]), (-dy, p[1] - y0), (dy, y1 - p[1])):
        if pk == 0:
            if qk < 0:
                return False
        else:
            t = qk / pk
            if pk < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 > t1:
                return False
    return True


def legend_covers_data(ax, legend) -> list[str]:
    """Labels of the data lines (segments or markers) that pass under the legend box."""
    ax.figure.canvas.draw()
    box = legend.get_window_extent()
    hits = []
    for ln in _data_lines(ax):
        xy = ln.get_transform().transform(np.column_stack([ln.get_xdata(), ln.get_ydata()]).astype(float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        marker_only = ln.get_linestyle() in ("None", "", " ", "none")
        inside = ((xy[:, 0] > box.x0 + 1) & (xy[:, 0] < box.x1 - 1) & (xy[:, 1] > box.y0 + 1) & (xy[:, 1] < box.y1 - 1))
        if inside.any() or (not marker_only and any(_segment_hits_box(a, b, box) for a, b in zip(xy[:-1], xy[1:]))):
            hits.append(ln.get_label())
    return hits


def check_legends(fig):
    """Each legend is either inside its axes without covering data, or a figure legend outside every axes."""
    fig.canvas.draw()
    n = 0
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        n += 1
        box, frame = leg.get_window_extent(), ax.get_window_extent()
        if leg.get_gid() == "legend-outside":
            assert not box.overlaps(frame), "an outside legend overlaps its axes"
            continue
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1
        assert legend_covers_data(ax, leg) == [], f"legend covers data in {ax.get_title()!r}"
    for leg in fig.legends:
        n += 1
        box = leg.get_window_extent()
        for ax in fig.axes:
            if ax.get_visible():
                assert not box.overlaps(ax.get_window_extent()), "figure legend overlaps a panel"
    return n


def integer_ticks(ax, which="x") -> bool:
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    ticks = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
    return len(ticks) >= 2 and all(abs(t - round(t)) < 1e-9 for t in ticks)


def tick_texts(ax, which="y") -> list[str]:
    ax.figure.canvas.draw()
    labels = ax.get_yticklabels() if which == "y" else ax.get_xticklabels()
    return [t.get_text() for t in labels if t.get_text()]


def reference_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_gid() == "reference-label"]


def line_colours(fig) -> set[str]:
    from matplotlib.colors import to_hex

    return {to_hex(ln.get_color()) for ax in fig.axes for ln in _data_lines(ax)}


# ---- audit figures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audits():
    from loopdyn.dynamics import audit

    out = {}
    stable = small_loop_model("diagonal", d=16, perturb=0.05)
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    out["stable"] = audit(stable, idx, 4, 16, lyapunov_k=3)
    explosive = small_loop_model("linear", d=16, perturb=0.05)
    with torch.no_grad():
        explosive.injection.W.weight[:, :16] = 2.5 * torch.eye(16)
    out["explosive"] = audit(explosive, idx, 4, 16, lyapunov_k=3)
    return out


@pytest.mark.parametrize("which", ["stable", "explosive"])
def test_audit_figures_content(audits, which):
    from loopdyn.plots.audit import OPTIONAL_PLOTS, PLOTS

    report = audits[which]
    optional = {name: draw for name, (part, draw) in OPTIONAL_PLOTS.items() if getattr(report, part) is not None}
    assert "phases" in optional
    for name, draw in {**PLOTS, **optional}.items():
        fig, caption = draw(report)
        assert caption and caption.endswith(".")
        for ax in fig.axes:
            assert ax.get_ylabel() and (ax.get_xlabel() or ax is not fig.axes[-1]), name
            assert not any("×10" in t or "$" in t for t in tick_texts(ax)), f"{name}: {tick_texts(ax)}"
        check_legends(fig)
        # width at the printed size and readable text (≥ 6.5 pt everywhere)
        assert fig.get_figwidth() <= style.DOUBLE
        fig.canvas.draw()
        sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t.get_visible()]
        assert min(sizes) >= 6.5, name
    fig, cap = PLOTS["eigenvalues"](report)
    ev = np.abs(np.asarray(report.injection.eigenvalues))
    assert (f"{int((ev > 1).sum())} of {ev.size} outside the unit circle" if (ev > 1).any()
            else f"all {ev.size} inside the unit circle") in cap
    # integer loop and index axes
    fig, _ = PLOTS["trajectory"](report)
    assert integer_ticks(fig.axes[-1])
    assert any("μ_rec = 4" in s for s in reference_labels(fig.axes[0]))
    fig, cap = PLOTS["jacobian"](report)
    assert integer_ticks(fig.axes[0]) and "ρ = 1" in reference_labels(fig.axes[0])
    fig, cap = PLOTS["lyapunov"](report)
    ax = fig.axes[0]
    assert integer_ticks(ax) and "0" in reference_labels(ax)
    drawn = [ln for ln in _data_lines(ax) if ln.get_linestyle() in ("None", "none")]
    assert sum(len(ln.get_xdata()) for ln in drawn) == len(report.lyapunov.exponents)
    for x in report.lyapunov.exponents:
        assert f"{x:.3g}" in cap


def test_audit_axes_are_linear_unless_the_range_demands_log(audits):
    from loopdyn.plots.audit import plot_jacobian, plot_trajectory

    fig, _ = plot_jacobian(audits["stable"])
    assert fig.axes[0].get_yscale() == "linear"  # ρ, ‖J‖ of order 1
    fig, _ = plot_trajectory(audits["stable"])
    assert fig.axes[0].get_yscale() == "linear"
    fig, cap = plot_trajectory(audits["explosive"])
    norms = np.asarray(audits["explosive"].forecast.state_norm, dtype=float)
    assert np.nanmax(norms) / np.nanmin(norms) > style.LOG_RANGE and fig.axes[0].get_yscale() == "log"
    assert not any("×10" in t for t in tick_texts(fig.axes[0]))
    assert "explosive" in cap


def test_audit_plots_cli_formats(tmp_path, capsys):
    from loopdyn.models import save

    save(small_loop_model("diagonal", d=16, perturb=0.05), tmp_path / "m")
    for fmt, magic in (("svg", b"<?xml"), ("pdf", b"%PDF")):
        out = tmp_path / fmt
        assert main(["audit", str(tmp_path / "m"), "--loops", "3", "--seq-len", "12", "--no-progress",
                     "--plots", str(out), "--format", fmt]) == 0
        files = sorted(p.name for p in out.iterdir())
        assert files == [f"{n}.{fmt}" for n in ("eigenvalues", "jacobian", "lyapunov", "phases", "trajectory")]
        assert all((out / f).read_bytes().startswith(magic) for f in files)
    printed = capsys.readouterr().out
    assert "trajectory.pdf: Mean token state norm" in printed
    with pytest.raises(SystemExit) as exit_:
        main(["audit", str(tmp_path / "m"), "--plots", str(tmp_path / "x"), "--format", "jpg"])
    assert exit_.value.code == 2


def test_png_is_300_dpi_with_the_caption_in_its_metadata(audits, tmp_path):
    from PIL import Image

    from loopdyn.plots.audit import write_audit_plots

    [(path, caption), *_] = write_audit_plots(audits["stable"], tmp_path)
    im = Image.open(path)
    assert round(im.info["dpi"][0]) == 300 and im.info["Description"] == caption
    assert im.size[0] == round(style.SINGLE * 300)


# ---- compare figures ---------------------------------------------------------------------------

def _record(inj, lr, seed=0, steps=60, rho=0.6, growth=1.0, explode=False, val=2.2):
    mu = None if inj == "fixed" else MU
    x = np.arange(steps)
    losses = list(val + (5.5 - val) * np.exp(-x / 10) + np.random.default_rng(seed).normal(0, 0.03, steps))
    probe = list(range(0, steps + 1, 6))
    if mu:
        rhos = [rho * (1 + 0.3 * i / len(probe)) for i in range(len(probe))]
        states = [[10.0 * growth ** t for t in range(4 * mu + 1)] for _ in probe]
        if explode:
            rhos = [0.6 * 1.5 ** i for i in range(len(probe))]
            states = [[10.0 * (1.1 + 0.2 * i) ** t for t in range(4 * mu + 1)] for i in range(len(probe))]
        vals = {str(t): val + 0.02 * abs(t - mu) / mu for t in (1, 2, 4, 8, 16)}
    else:
        rhos, states, vals = [], [], {"0": val - 0.05}
    return RunRecord(spec=asdict(RunSpec(inj, lr, seed=seed, steps=steps)), params=250_000, mean_loops=mu,
                     steps=steps, tokens=steps * 1024, seconds=1.0, losses=losses, val_by_loops=vals, probe_steps=probe,
                     spectral_radius=rhos, spectral_norm=[r * 1.1 for r in rhos], state_norms=states,
                     final_state_norms=states[-1] if states else [], unigram_loss=UNIGRAM,
                     outcome="converged" if not explode else "residual explosion",
                     outcome_reason="validation loss 2.2", audit={"verdict": "stable", "evidence": ["LTI: ρ(Ā) 0.6"]})


def compare_result(tmp_path, injections=("diagonal", "linear", "additive", "fixed"), explode=False, seeds=(0,)):
    recs = []
    for inj in injections:
        for lr in (0.01, 0.05):
            for seed in seeds:
                recs.append(_record(inj, lr, seed, rho=1.0 if inj == "additive" else 0.6,
                                    growth=1.08 if inj == "additive" else 1.0,
                                    explode=explode and inj == "linear" and lr == 0.05))
    return CompareResult(out=tmp_path, records=recs, skipped=[])


def test_compare_figures_content_and_palette(tmp_path):
    from loopdyn.plots.compare import PLOTS

    result = compare_result(tmp_path, seeds=(0, 1))
    for name, draw in PLOTS.items():
        fig, caption = draw(result)
        assert check_legends(fig) == 1 and fig.legends, name  # one legend above the panels
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert len(panels) == 2 and panels[0].get_ylabel(), name
        for ax in panels:
            assert ax.get_xlabel() and ax.get_title().startswith("lr ")
            assert integer_ticks(ax), (name, ax.get_xticks())
        # the palette is fixed per parameterisation, the same in every figure
        expected = {style.COLORS[i].lower() for i in ("diagonal", "linear", "additive", "fixed")}
        colours = line_colours(fig)
        assert colours <= expected | {"#4d4d4d"}, (name, colours)
        assert "2 seeds" in caption
    fig, cap = PLOTS["loss_curves"](result)
    assert "nats/byte" in fig.axes[0].get_ylabel() and "unigram baseline" in reference_labels(fig.axes[0])[0]
    fig, cap = PLOTS["spectral_radius"](result)
    assert fig.axes[0].get_yscale() == "linear" and "ρ = 1" in reference_labels(fig.axes[0])[0]
    fig, cap = PLOTS["val_vs_loops"](result)
    ax = fig.axes[0]
    assert [int(t) for t in ax.get_xticks()] == [1, 2, 4, 8, 16]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    assert any("μ_rec = 4" in s for s in reference_labels(ax))
    assert "fixed-depth twin" in cap and "nats/byte" in ax.get_ylabel()


def test_captions_describe_only_what_was_drawn(tmp_path):
    from loopdyn.plots.compare import plot_val_vs_loops

    fig, cap = plot_val_vs_loops(compare_result(tmp_path, injections=("diagonal", "linear")))
    assert "fixed" not in cap and "dashed" not in cap
    assert all(ln.get_linestyle() != "--" for ax in fig.axes for ln in _data_lines(ax))


def test_spectral_radius_goes_log_only_when_the_range_demands(tmp_path):
    from loopdyn.plots.compare import plot_spectral_radius, plot_state_norm

    result = compare_result(tmp_path, explode=True)
    rho = [v for r in result.records for v in r.spectral_radius]
    assert max(rho) / min(rho) > style.LOG_RANGE
    fig, cap = plot_spectral_radius(result)
    assert fig.axes[0].get_yscale() == "log" and "log axis" in cap
    assert not any("×10" in t or "^" in t for t in tick_texts(fig.axes[1]))
    fig, _ = plot_state_norm(result)
    assert fig.axes[0].get_yscale() == "log"


def test_autonomous_has_its_own_colour_and_label(tmp_path):
    from loopdyn.plots.compare import plot_loss_curves

    assert len(set(style.COLORS.values())) == len(style.COLORS) == 5
    fig, _ = plot_loss_curves(compare_result(tmp_path, injections=("diagonal", "autonomous")))
    assert style.COLORS["autonomous"].lower() in line_colours(fig)
    assert "autonomous" in [t.get_text() for t in fig.legends[0].get_texts()]


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_compare_writes_figures_in_the_requested_format(tmp_path, fmt, magic):
    from loopdyn.report import write_outputs

    data = write_outputs(compare_result(tmp_path, injections=("diagonal",)), fmt, "loopdyn compare --test")
    for name in ("loss_curves", "spectral_radius", "state_norm", "val_vs_loops"):
        assert (tmp_path / f"{name}.{fmt}").read_bytes().startswith(magic)
    assert set(data["figures"]) == {f"{n}.{fmt}" for n in ("loss_curves", "spectral_radius", "state_norm",
                                                            "val_vs_loops")}


# ---- fit figure --------------------------------------------------------------------------------

def _testtime_csv(tmp_path, unit=True):
    T = np.arange(1, 13)
    loss = 2.0 + 0.8 * np.exp(-0.6 * T) * np.exp(0.002 * np.random.default_rng(0).standard_normal(12))
    rows = ["loops,loss" + (",unit" if unit else "")] + [f"{t},{v:.6f}" + (",nats/byte" if unit else "")
                                                        for t, v in zip(T, loss)]
    path = tmp_path / "tt.csv"
    path.write_text("\n".join(rows) + "\n")
    return path, loss


def test_fit_plot_band_clipped_held_out_marked_extrapolation_shaded(tmp_path, capsys):
    from matplotlib.patches import Polygon, Rectangle

    from loopdyn.plots.fit import plot_fit as _plot
    from loopdyn import scaling as laws

    path, loss = _testtime_csv(tmp_path)
    cols = laws.read_law_csv(path, "testtime")
    fit = laws.fit_law("testtime", cols, holdout_above=6, restarts=8, bootstrap=8)
    held = cols["loops"] > 6
    fig, cap = _plot(fit, cols, held, None, "nats/byte")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    span = loss.max() - loss.min()
    assert lo >= loss.min() - 0.5 * span and hi <= loss.max() + 0.5 * span  # the data, not the band, sets the axis
    assert ax.get_ylabel() == "loss (nats/byte)" and integer_ticks(ax)
    open_markers = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and ln.get_markerfacecolor() in ("white", (1, 1, 1, 1))]
    assert sum(len(ln.get_xdata()) for ln in open_markers) == held.sum()
    shaded = [p for p in ax.patches if isinstance(p, (Polygon, Rectangle))]
    assert shaded and "extrapolation" in " ".join(t.get_text() for t in ax.texts)
    assert "held-out" in cap and "extrapolation beyond the fitted loops range (> 6)" in cap
    check_legends(fig)
    # end to end: the unit comes from the CSV's `unit` column, --format picks the file type
    out = tmp_path / "fit.svg"
    assert main(["fit", str(path), "--law", "testtime", "--holdout-above", "6", "--plot", str(out),
                 "--format", "svg", "--restarts", "4", "--bootstrap", "4"]) == 0
    svg = out.read_text()
    assert svg.startswith("<?xml") and "nats/byte" in capsys.readouterr().out
    assert main(["fit", str(path), "--law", "testtime", "--plot", str(tmp_path / "f.png"), "--format", "pdf"]) == 1
    assert "contradicts --format pdf" in capsys.readouterr().err


def test_fit_unit_defaults_to_plain_nats_without_a_unit_column(tmp_path, capsys):
    path, _ = _testtime_csv(tmp_path, unit=False)
    assert main(["fit", str(path), "--law", "testtime", "--plot", str(tmp_path / "f.png"), "--restarts", "4",
                 "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "loss in nats;" in out
    assert main(["fit", str(path), "--law", "testtime", "--plot", str(tmp_path / "g.png"), "--restarts", "4",
                 "--bootstrap", "0", "--unit", "nats/token"]) == 0
    assert "loss in nats/token" in capsys.readouterr().out


# ---- monitor figure ------------------------------------------------------------------------------

def fake_monitor():
    """A monitor through its public API only: history (signal → Series) and alerts."""
    from loopdyn.probes import Series
    from loopdyn.probes.alerts import Alert

    steps = np.arange(1, 101)
    rho = np.r_[np.full(60, 0.8), np.linspace(0.8, 1.4, 40)]
    loss = 5.0 * np.exp(-steps / 20) + 2.0
    loss[80:] += np.linspace(0, 3, 20)
    hist = {"loss": Series(steps, loss), "grad_norm": Series(steps, 1 + 0.1 * np.sin(steps)),
            "injection_radius": Series(steps, rho), "injection_norm": Series(steps, rho * 1.2),
            "state_norm": Series(steps, 10 * np.exp(np.maximum(0, steps - 60) / 5))}
    alerts = [Alert(70, "early_warning", "warning", "injection_radius", 1.05, 1.0, "ρ(Ā) > 1"),
              Alert(85, "spike", "critical", "loss", 4.0, 6.0, "loss spike"),
              Alert(85, "action", "info", "loss", 0.0, 0.0, "rollback to step 50"),
              Alert(90, "probe_error", "warning", "jacobian", 0.0, 0.0, "probe failed")]
    return types.SimpleNamespace(history=hist, alerts=alerts)


def test_monitor_figure_marks_every_alert_on_its_signal():
    from loopdyn.plots.monitor import ALERT_STYLE, plot_monitor

    mon = fake_monitor()
    fig, cap = plot_monitor(mon, title="test")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == ["training loss", "gradient norm", "injection Ā", "state norm ‖h_T‖₂"]
    assert integer_ticks(axes[-1]) and axes[-1].get_xlabel() == "training step"
    for ax in axes:  # alert lines cross every panel: warning at 70, spike and action at 85
        xs = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_gid() == "reference-line"
                    and ln.get_xdata()[0] == ln.get_xdata()[1])  # vertical lines
        assert xs == [70, 85, 85]
    markers = {c: [(ax, ln) for ax in axes for ln in ax.get_lines() if ln.get_marker() == s["marker"]
                   and ln.get_gid() != "reference-line"] for c, s in ALERT_STYLE.items()}
    (ax, ln), = markers["warning"]
    assert ax.get_ylabel() == "injection Ā" and ln.get_ydata()[0] == pytest.approx(mon.history["injection_radius"].values[69])
    (ax, ln), = markers["spike"]
    assert ax.get_ylabel() == "training loss" and ln.get_xdata()[0] == 85
    assert len(markers["action"]) == 1
    assert "ρ = 1" in reference_labels(axes[2])
    assert "1 warning (first at step 70); 1 spike (first at step 85); 1 action (first at step 85)" in cap
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["warning (1)", "spike (1)", "action (1)"]
    check_legends(fig)


def test_train_probes_plots_end_to_end(tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["train", "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
                 "--probes", "--plots", str(out), "--format", "svg", "--no-progress",
                 "--set", "d_model=32", "--set", "n_heads=2", "--set", "d_mlp=64"]) == 0
    assert (out / "monitor.svg").read_text().startswith("<?xml")
    assert "monitor.svg: Signals recorded by the stability monitor" in capsys.readouterr().out
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "--steps", "1", "--plots", str(afile), "--no-progress"]) == 1  # before any training
    assert "exists and is not a folder" in capsys.readouterr().err and afile.read_text() == "x"


# ---- the style module itself ---------------------------------------------------------------------

def test_place_legend_moves_off_the_data_and_goes_outside_when_full():
    fig, ax = style.figure()
    x = np.linspace(0, 1, 50)
    ax.plot(x, x, label="rising")  # diagonal from lower left to upper right
    leg = style.place_legend(ax)
    assert leg.get_gid() in ("legend-inside:upper left", "legend-inside:lower right")
    assert legend_covers_data(ax, leg) == []
    assert legend_covers_data(ax, ax.legend(loc="center")) == ["rising"]  # the check itself can fail
    fig, ax = style.figure()
    rng = np.random.default_rng(0)
    ax.plot(rng.uniform(size=4000), rng.uniform(size=4000), ".", label="everywhere")
    leg = style.place_legend(ax)
    assert leg.get_gid() == "legend-outside"
    check_legends(fig)


def test_plain_log_tick_labels():
    assert [style._plain(v) for v in (0.5, 1, 2, 0.02, 1000, 1e6, 2e-5)] == ["0.5", "1", "2", "0.02", "1000", "1e6", "2e-05"]


def test_format_is_checked():
    from loopdyn.models.errors import InputError

    assert style.check_format("PDF") == "pdf"
    with pytest.raises(InputError, match="unsupported format 'jpg'"):
        style.check_format("jpg")
    assert style.loss_unit(256) == "nats/byte" and style.loss_unit(32768) == "nats/token"
    assert math.isclose(style.SINGLE, 3.5)
    buf = io.BytesIO(style.render(style.figure()[0], "png"))
    assert buf.read(4) == b"\x89PNG"


def test_exit_gate_figure_content(tmp_path):
    """The exit-gate figure of an audited Ouro-format model: labels, integer ticks, legend off the data."""
    from loopdyn import dynamics
    from loopdyn.models import load
    from loopdyn.plots.audit import plot_exit_gate
    from tests.ouro_reference import make_ouro_checkpoint

    model = load(make_ouro_checkpoint(tmp_path / "ouro", seed=3, gate_scale=4.0))
    idx = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    report = dynamics.audit(model, idx, loops=6, horizon=12)
    fig, caption = plot_exit_gate(report)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("exit loop") and ax.get_ylabel() == "convergence loop"
    assert all(t.isdigit() for t in tick_texts(ax, "x") if t), tick_texts(ax, "x")
    assert tick_texts(ax)[-1] == "never"  # tokens that never converged sit on the top row
    assert f"for {report.exit_gate.n_tokens} tokens over 6 loops" in caption
    check_legends(fig)
