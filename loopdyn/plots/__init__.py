"""Every figure loopdyn draws, in one style; the only place that imports matplotlib.

- `loopdyn.plots.style`: the style (sizes, palette, axes, legends, file formats, atomic saving);
- `loopdyn.plots.audit`: `loopdyn audit --plots`;
- `loopdyn.plots.compare`: `loopdyn compare` (and `demo`);
- `loopdyn.plots.fit`: `loopdyn fit --plot`;
- `loopdyn.plots.monitor`: `loopdyn train --probes --plots`;
- `loopdyn.plots.exits`: `loopdyn exits --plots` and `audit --exits --plots`.

Each `plot_*` returns (figure, caption); matplotlib is imported only when a figure is drawn.
"""
