"""dynalens and transformers import together from any working directory, and the wheel holds the package.

The top-level folders ``kernels/``, ``models/``, ``probes/`` and ``circuits/``
are no packages of their own (see ``dynalens/_layout.py``): were ``kernels/``
one, Python started in the repository root (its folder first on ``sys.path``)
would import it as HuggingFace's ``kernels`` when transformers probes for that,
and fail with a circular import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels", "models", "probes", "circuits", "dashboard")

DYNALENS_FIRST = """
import dynalens
from transformers import MambaForCausalLM
"""
TRANSFORMERS_FIRST = """
from transformers import MambaForCausalLM
import dynalens
"""
CHECKS = """
import importlib.util
assert MambaForCausalLM.__module__.startswith("transformers."), MambaForCausalLM
from dynalens.kernels import selective_scan
from dynalens.probes import LogitLens
from dynalens.models.mamba import HookedMamba
import dynalens.circuits, dynalens.dashboard.pages
for name in {subpackages}:
    module = importlib.import_module("dynalens." + name)
    print(name, module.__file__)
kernels = importlib.util.find_spec("kernels")  # HuggingFace's, an empty namespace or none: never our folder
assert kernels is None or not (kernels.origin or "").startswith({root!r}), kernels
print("ok")
"""


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> dict[str, str]:
    """Run ``python -c code`` in ``cwd`` (no ``-P``, no ``PYTHONSAFEPATH``); the printed ``name file`` pairs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    run = subprocess.run(
        [sys.executable, "-c", code + CHECKS.format(subpackages=SUBPACKAGES, root=str(ROOT))],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0 and run.stdout.endswith("ok\n"), f"in {cwd}:\n{run.stdout[-2000:]}{run.stderr[-4000:]}"
    return dict(line.split(" ", 1) for line in run.stdout.splitlines()[:-1])


@pytest.mark.parametrize("order", [DYNALENS_FIRST, TRANSFORMERS_FIRST], ids=["dynalens_first", "transformers_first"])
@pytest.mark.parametrize("cwd", [ROOT, ROOT / "notebooks"], ids=["root", "notebooks"])
def test_dynalens_and_transformers_mamba_import_in_any_order(order: str, cwd: Path) -> None:
    files = run_python(order, cwd)
    for name in SUBPACKAGES:
        assert Path(files[name]).parent == ROOT / name  # this checkout's folder, whichever finder found it


def test_the_wheel_holds_each_subpackage_with_its_init(tmp_path: Path) -> None:
    """``pip wheel`` of a copy of the sources: ``dynalens/<name>/__init__.py`` beside the modules, no ``_init.py``;
    imported from the unpacked wheel (outside any checkout), every subpackage is the wheel's."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "tests", "notebooks", "benchmarks", "build", "*.egg-info",
                                      "__pycache__", ".*"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("dynalens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SUBPACKAGES:
        assert f"dynalens/{name}/__init__.py" in names
        assert f"dynalens/{name}/_init.py" not in names
    assert "dynalens/kernels/selective_scan.py" in names and "dynalens/dashboard/pages/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] in SUBPACKAGES]  # nothing generic at the top level

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    files = run_python(TRANSFORMERS_FIRST, tmp_path, pythonpath=site)
    for name in SUBPACKAGES:
        assert Path(files[name]) == site / "dynalens" / name / "__init__.py"
