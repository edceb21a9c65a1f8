"""Issue 9: one import name. The wheel's only top-level name is `loopdyn`, and the installed
package works from a research project that has its own `models/`, `dynamics/` and `probes/`.

The wheel is built offline, with the PEP 517 backend already installed (what `pip wheel
--no-build-isolation` calls): setuptools ≥ 70.1, or an older setuptools plus the `wheel`
package (both in the `test` extra, so CI gets them from the same `pip install -e ".[test]"`
and needs no network of its own). It is then installed the way pip installs a pure-Python
wheel, by unpacking it, and run with `python -S` so the editable install of the source tree
(a .pth hook) cannot stand in for it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from loopdyn.models import save
from tests.test_models import make_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "models", "dynamics", "probes", "loopdyn")
DECOYS = ("models", "dynamics", "probes")


def _can_build_offline() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if version >= (70, 1):
        return True
    import importlib.util

    return importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def wheel_file(tmp_path_factory) -> Path:
    if not _can_build_offline():
        pytest.skip("building a wheel offline needs setuptools >= 70.1 or the `wheel` package (test extra)")
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        (shutil.copytree(path, src / name, ignore=ignore) if path.is_dir() else shutil.copy(path, src / name))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(dist)], cwd=src, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return dist / result.stdout.strip().splitlines()[-1]


def test_the_wheel_has_one_top_level_name(wheel_file):
    with zipfile.ZipFile(wheel_file) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        top_level = z.read(info).decode().split()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"loopdyn"} and top_level == ["loopdyn"]
    for module in ("loopdyn/models/errors.py", "loopdyn/models/checkpoint.py", "loopdyn/dynamics/__init__.py",
                   "loopdyn/probes/__init__.py", "loopdyn/cli.py", "loopdyn/commands/audit.py"):
        assert module in names, module


@pytest.fixture(scope="module")
def installed(wheel_file, tmp_path_factory) -> tuple[Path, dict]:
    """The wheel unpacked into a fresh site folder, and an environment that sees only it
    (plus the third-party packages of this interpreter), not the editable source tree."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel_file) as z:
        z.extractall(site)
    third_party = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    third_party += [sysconfig.get_paths()["purelib"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), *third_party])}
    return site, env


@pytest.fixture
def project(tmp_path) -> Path:
    """A research project with its own models/, dynamics/ and probes/ packages, each of which
    records that it was imported."""
    for name in DECOYS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            "import os\n"
            f"LoopConfig = 'the user\\'s own {name}'\n"
            f"open(os.path.join(os.path.dirname(__file__), '..', 'imported.log'), 'a').write('{name}\\n')\n")
    return tmp_path


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_installed_loopdyn_works_beside_a_users_models_package(installed, project):
    site, env = installed
    ckpt = save(make_model(seed=0, block_size=64), project / "ckpt")
    result = _run(["-m", "loopdyn", "audit", str(ckpt), "--loops", "2", "--horizon", "4", "--lyapunov-k", "1",
                   "--seq-len", "16", "--no-progress", "--json", "audit.json"], project, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((project / "audit.json").read_text())["verdict"] in ("stable", "marginal", "explosive")
    code = ("import sys, loopdyn, loopdyn.dynamics, loopdyn.probes, loopdyn.models\n"
            "from loopdyn.models import LoopConfig\n"
            "print(loopdyn.__file__)\n"
            "assert 'models' not in sys.modules and 'dynamics' not in sys.modules, sorted(sys.modules)\n"
            "import models\n"  # the user's own package is still theirs
            "print(models.LoopConfig)\n")
    result = _run(["-c", code], project, env)
    assert result.returncode == 0, result.stderr[-2000:]
    where, decoy = result.stdout.strip().splitlines()
    assert Path(where).is_relative_to(site)  # the wheel's copy, not the source tree
    assert decoy == "the user's own models"
    assert (project / "imported.log").read_text().split() == ["models"]  # only by the user's import
