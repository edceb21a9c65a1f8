"""The documentation is part of the contract: the README stays short and opens with the two
commands, every design section a docstring cites exists, nothing cites the old out-of-repository
design note, and the API reference builds with `mkdocs build --strict`."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SOURCE_DIRS = ("models", "dynamics", "probes", "loopdyn", "tests", "bench", "docs")


def _sources():
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    setup = "\n".join(lines[:20])
    assert "loopdyn demo" in setup and "python -m pytest -q" in setup


def test_nothing_cites_the_design_note_outside_the_repository():
    old = "shared/" + "DESIGN"  # split so this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in _sources() if old in p.read_text(errors="replace")]
    assert offenders == []


def test_every_cited_design_section_exists():
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M))
    cited = {}
    for path in _sources():
        for n in re.findall(r"docs/design\.md §(\d+)", path.read_text(errors="replace")):
            cited.setdefault(n, str(path.relative_to(ROOT)))
    assert cited, "no docstring cites docs/design.md"
    missing = {n: where for n, where in cited.items() if n not in sections}
    assert missing == {}


def test_relative_links_between_pages_resolve():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert broken == []


def test_api_reference_builds_strictly(tmp_path):
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "dynamics" / "index.html").read_text()
    assert "loopdyn.dynamics" in page and "forecast" in page


def test_the_verdict_section_is_the_rule_tables_own_words():
    """docs/design.md §8 quotes loopdyn.dynamics.verdict's criteria: change one, change both."""
    from loopdyn.dynamics import verdict

    text = DESIGN.read_text()
    for word, criterion in {**verdict.verdict_criteria(), **verdict.criteria()}.items():
        assert f"| `{word}` | {criterion} |" in text, word


def test_every_file_in_the_concept_table_exists():
    text = DESIGN.read_text()
    table = text[text.index("## 9. Where each concept lives"):]
    missing = []
    for cell in re.findall(r"^\|[^|]*\| (.*) \|$", table, re.M):
        folder = None
        for name in re.findall(r"`([^`]+)`", cell):
            path = ROOT / name if "/" in name else (folder / name if folder else ROOT / name)
            if "/" in name:
                folder = (ROOT / name).parent
            if not path.exists():
                missing.append(name)
    assert missing == []
