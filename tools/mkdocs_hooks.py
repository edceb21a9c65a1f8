"""mkdocs hook: lay out the import tree `loopdyn.*` for the API reference.

The repository keeps `models/`, `dynamics/` and `probes/` at the top level and maps them to
`loopdyn.models`, `loopdyn.dynamics` and `loopdyn.probes` at install time (pyproject's
`package-dir`, docs/design.md §2). mkdocstrings reads the sources statically and does not follow
linked folders, so before the build this hook rebuilds `build/api-src/loopdyn/` as real folders
holding symbolic links to the source files, in the installed layout. It runs on `on_config`,
ahead of the plugins: mkdocstrings drops a search path that does not exist yet when it configures
itself, so a fresh clone would otherwise fail to find `loopdyn.*` on its first build.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "api-src"
SOURCES = {"loopdyn": ROOT / "loopdyn", "loopdyn/models": ROOT / "models",
           "loopdyn/dynamics": ROOT / "dynamics", "loopdyn/probes": ROOT / "probes"}


@event_priority(100)  # before mkdocstrings reads its `paths`, which must exist by then
def on_config(config, **kwargs):
    _lay_out()
    return config


def _lay_out() -> None:
    if TREE.exists():
        shutil.rmtree(TREE)
    for dest, src in SOURCES.items():
        for path in src.rglob("*.py"):
            link = TREE / dest / path.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
