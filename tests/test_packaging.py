"""The sdist and the wheel ship every module of keraslm/, serve/ and export/ (subpackages
included) and the page, and nothing from tests/ or bench/ (issue 22).

The tree is copied to a temporary folder (so a stale build/ here cannot leak in, and nothing is
written into the checkout), built into an sdist with the PEP 517 hook, and the wheel is built from
that sdist, as `python -m build` does. Offline: no build isolation, no index (the `test` extra
installs the setuptools that pyproject.toml's build-system asks for).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("keraslm", "serve", "export")
PAGE_DIR = "serve/web/static"
NOT_SHIPPED = ("tests", "bench", "docs")
EXTRAS = {"train", "cpu", "gpu", "serve", "dataset", "ray", "test"}
# Left out of the copy: what is not source (and may be big).
SKIP = {".git", ".venv", "venv", "build", "dist", "runs", "bundles", ".pytest_cache",
        ".hypothesis", ".ruff_cache", "__pycache__"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in SKIP or n.endswith((".egg-info", ".pyc"))}


def source_files(tree: Path) -> set[str]:
    """What must ship: every .py under the packages and every file of the page's folder."""
    wanted = {p for pkg in PACKAGES for p in tree.joinpath(pkg).rglob("*.py")}
    wanted |= {p for p in tree.joinpath(PAGE_DIR).rglob("*") if p.is_file()}
    return {p.relative_to(tree).as_posix() for p in wanted if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.fail(f"setuptools {setuptools.__version__} is older than the build-system's "
                    "setuptools>=77: pip install -e '.[test]' installs a new enough one")
    base = tmp_path_factory.mktemp("packaging")
    tree, out = base / "src", base / "dist"
    shutil.copytree(ROOT, tree, ignore=_ignore)
    out.mkdir()
    sdist = subprocess.run(
        [sys.executable, "-c", ("import sys; from setuptools import build_meta as b; "
                                "print(b.build_sdist(sys.argv[1]))"), str(out)],
        cwd=tree, capture_output=True, text=True, timeout=120, check=False)
    assert sdist.returncode == 0, f"building the sdist failed:\n{sdist.stderr[-4000:]}"
    sdist_path = out / sdist.stdout.strip().splitlines()[-1]
    wheel = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(out), str(sdist_path)],
        cwd=base, capture_output=True, text=True, timeout=120, check=False)
    assert wheel.returncode == 0, f"building the wheel from the sdist failed:\n{wheel.stderr[-4000:]}"
    wheels = list(out.glob("keraslm-*.whl"))
    assert len(wheels) == 1, wheels
    return {"tree": tree, "sdist": sdist_path, "wheel": wheels[0]}


def test_wheel_ships_every_module_and_the_page_and_nothing_else(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        names = set(z.namelist())
    expected = source_files(built["tree"])
    assert "keraslm/training/__init__.py" in expected and f"{PAGE_DIR}/index.html" in expected
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {len(missing)} file(s): {missing}"
    dist_info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    extra = sorted(names - expected - dist_info)
    assert not extra, f"the wheel ships files that are not package source: {extra}"
    leaked = sorted(n for n in names if n.split("/")[0] in NOT_SHIPPED)
    assert not leaked, leaked


def test_sdist_holds_every_module_and_the_page(built):
    with tarfile.open(built["sdist"]) as t:
        # keraslm-0.1.0/serve/web/static/index.html -> serve/web/static/index.html
        names = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name and m.isfile()}
    missing = sorted(source_files(built["tree"]) - names)
    assert not missing, f"the sdist lacks {len(missing)} file(s): {missing}"
    assert "pyproject.toml" in names and "README.md" in names


def test_console_scripts_and_extras_point_into_the_wheel(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    targets = dict(scripts["console_scripts"])
    assert {"keraslm-train", "keraslm-export", "keraslm-evaluate", "keraslm-score",
            "keraslm-serve", "keraslm-generate", "keraslm-score-dataset"} <= set(targets)
    for script, target in targets.items():
        module = target.split(":")[0].replace(".", "/")
        assert f"{module}.py" in names or f"{module}/__init__.py" in names, (script, target)
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines()
              if line.startswith("Provides-Extra:")}
    assert EXTRAS <= extras, f"extras {sorted(EXTRAS - extras)} are missing from the metadata"
