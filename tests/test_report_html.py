"""report.html: structure (provenance header, one short verdict per run with the evidence in a
<details> element) parsed with the standard library, and the page rendered in headless
Chromium: a non-blank screenshot, no console errors, and print-to-PDF with the convergence
matrix on its first page (read back with poppler's pdftotext / pdftoppm). The Chromium tests
skip when chromium or poppler-utils is not installed."""
from __future__ import annotations

import re
from html import unescape
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from loopdyn.report import OUTCOME_MARK, write_outputs
from tests.test_figures import _record, compare_result

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
POPPLER = shutil.which("pdftotext") and shutil.which("pdftoppm")
needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="headless Chromium is not installed")
needs_poppler = pytest.mark.skipif(not POPPLER, reason="poppler-utils (pdftotext, pdftoppm) is not installed")
COMMAND = "loopdyn compare --injections diagonal,linear --lrs 0.01,0.05 --steps 60 --out cmp"


class Page(HTMLParser):
    """Just enough of the DOM: text per element path, <details> contents, images."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.details: list[dict] = []
        self.images: list[dict] = []
        self.text: list[tuple[tuple[str, ...], str]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("img", "meta", "link", "br"):
            if tag == "img":
                self.images.append(dict(attrs))
            return
        self.stack.append(tag)
        if tag == "details":
            self.details.append({"summary": "", "body": ""})

    def handle_endtag(self, tag):
        if tag in ("img", "meta", "link", "br"):
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> in {self.stack[-3:]}")
            return
        self.stack.pop()

    def handle_data(self, data):
        if not data.strip():
            return
        self.text.append((tuple(self.stack), data))
        if "details" in self.stack:
            key = "summary" if "summary" in self.stack else "body"
            self.details[-1][key] += data


def _result(tmp_path):
    result = compare_result(tmp_path, injections=("diagonal", "linear"), explode=True)
    short = _record("diagonal", 0.05, steps=40, val=3.3)
    short.outcome, short.outcome_reason = "inconclusive", "too short to judge: still falling"
    result.records[1] = short
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    data = write_outputs(_result(out), "png", COMMAND)
    return out, data


def test_header_stamps_version_command_date_machine(report):
    out, data = report
    page = Page()
    html = (out / "report.html").read_text()
    page.feed(html)
    assert page.errors == [] and page.stack == []
    header = " ".join(t for path, t in page.text if "header" in path)
    from importlib.metadata import version

    assert f"loopdyn {version('loopdyn')}" in header
    assert COMMAND in header
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", header)
    assert "machine:" in header and "GPU:" in header and "thread" in header and "cores" in header
    prov = data["provenance"]
    assert prov["command"] == COMMAND and prov["machine"]["cores"] >= 1


def test_one_short_verdict_per_run_with_the_evidence_in_details(report):
    out, data = report
    page = Page()
    page.feed((out / "report.html").read_text())
    assert len(page.details) == len(data["runs"]) == 4
    for run, det in zip(data["runs"], page.details):
        assert len(det["summary"]) <= 110, det["summary"]  # short: one line
        assert "Arnoldi" not in det["summary"] and run["outcome_reason"] in det["body"]
        assert "audit evidence" in det["body"] and "LTI: ρ(Ā) 0.6" in det["body"]
    summaries = [d["summary"] for d in page.details]
    assert any(s.startswith("too short to judge") for s in summaries)
    assert any(s.startswith("state explodes with loops") for s in summaries)
    # the matrix uses the outcome marks and one colour class per outcome kind
    html = (out / "report.html").read_text()
    for mark in (OUTCOME_MARK["converged"], OUTCOME_MARK["inconclusive"], OUTCOME_MARK["residual explosion"]):
        assert mark in html
    assert 'class="wait"' in html and 'class="bad"' in html and 'class="ok"' in html
    # every figure is embedded with a caption that is also in summary.json
    assert len(page.images) == 4 and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    for caption in data["figures"].values():
        assert caption in unescape(html)


def _chromium(*args, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_chromium
def test_chromium_renders_a_non_blank_page_without_console_errors(report, tmp_path):
    from PIL import Image

    out, _ = report
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 20  # not blank
    dark = (img < 128).mean()
    assert 0.005 < dark < 0.5  # text and figures, not an error page or a black screen


@needs_chromium
def test_a_page_with_a_script_error_is_caught_by_the_console_check(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body>x<script>undefinedFunction()</script></body></html>")
    proc = _chromium("--dump-dom", bad.as_uri())
    assert any("CONSOLE" in line and "Uncaught" in line for line in proc.stderr.splitlines())


@needs_chromium
@needs_poppler
def test_print_to_pdf_has_the_matrix_on_its_first_page(report, tmp_path):
    out, data = report
    pdf = tmp_path / "report.pdf"
    proc = _chromium(f"--print-to-pdf={pdf}", "--no-pdf-header-footer", (out / "report.html").as_uri())
    assert pdf.is_file() and pdf.read_bytes().startswith(b"%PDF"), proc.stderr[-2000:]
    first = subprocess.run(["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"], capture_output=True,
                           text=True, check=True).stdout
    assert "Convergence matrix" in first
    for row in ("diagonal (Parcae)", "linear (Huginn/RDM)"):
        line = next(ln for ln in first.splitlines() if row in ln)
        assert "lr" not in line and ("converged" in line or "inconclusive" in line or "explosion" in line)
    assert "lr 0.01" in first and "lr 0.05" in first
    assert "loopdyn compare --injections" in first  # the command is on the printed page
    # A4 pages, the figures start on a later page and every page has ink
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    assert "595.92 x 842.88" in info or "595 x 842" in info or "A4" in info
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert pages >= 2
    rest = subprocess.run(["pdftotext", "-f", "2", "-l", str(pages), str(pdf), "-"], capture_output=True,
                          text=True).stdout
    assert "Figure 1." in rest and "Figure 1." not in first
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "page")], check=True)
    from PIL import Image

    for png in sorted(tmp_path.glob("page*.png")):
        img = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert img.min() < 128, f"{png.name} is blank"
