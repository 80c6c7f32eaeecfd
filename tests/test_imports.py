"""``import dynalens`` loads no heavy library; every public name still resolves, on first use.

The heavy imports are checked in fresh processes through ``sys.modules``
(timings live in ``benchmarks/import_time.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dynalens as dl
from dynalens import _lazy

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformer_lens", "transformers", "ray", "dash", "plotly", "pyarrow", "scipy", "sklearn",
         "numba", "triton", "accelerate", "networkx", "pandas")
LAZY_PACKAGES = ("dynalens", "dynalens.models", "dynalens.probes", "dynalens.circuits")


def heavy_modules_after(code: str) -> list[str]:
    """The libraries of ``HEAVY`` in ``sys.modules`` after running ``code`` in a fresh Python."""
    check = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return eval(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import dynalens",
    "import dynalens as dl; dl.models; dl.probes; dl.circuits; dir(dl.probes)",
    "from dynalens.cli import main; main(['models'])",
    "from dynalens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
], ids=["import", "subpackages", "cli_models", "cli_help"])
def test_no_heavy_library_loads(code: str) -> None:
    assert heavy_modules_after(code) == []


def test_a_name_loads_its_module_on_first_use() -> None:
    loaded = heavy_modules_after("import dynalens as dl; dl.Prompts")
    assert "torch" in loaded and "transformer_lens" not in loaded


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_listed_name_resolves_and_completes(package: str) -> None:
    module = sys.modules[package] if package in sys.modules else __import__(package, fromlist=["_"])
    listed = set(_lazy.type_checking_imports(Path(module.__file__).read_text())) | {"__version__"}
    assert set(module.__all__) <= listed | set(vars(module)), "a name in __all__ that nothing imports"
    assert set(module.__all__) >= listed - {"__version__"}, "a lazy name missing from __all__"
    assert set(module.__all__) <= set(dir(module))  # tab completion lists them before they load
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_attributes_are_the_objects_of_their_modules() -> None:
    from dynalens.models.names import resid_post
    from dynalens.probes.logit_lens import LogitLens

    assert dl.probes.LogitLens is LogitLens
    assert dl.names.resid_post is resid_post and dl.models.names is dl.names  # a submodule, by attribute
    assert "names" in dir(dl.models) and "logit_lens" in dir(dl.probes)
    from dynalens.kernels import selective_scan
    import dynalens.kernels.selective_scan  # noqa: F401 - the module of the same name, imported after

    assert callable(selective_scan) and dl.kernels.selective_scan is selective_scan


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'dynalens.probes' has no attribute 'NoSuchAnalysis'"):
        dl.probes.NoSuchAnalysis  # noqa: B018
    with pytest.raises(ImportError, match="NoSuchAnalysis"):
        from dynalens.probes import NoSuchAnalysis  # noqa: F401


def test_type_checking_imports_reads_only_that_block() -> None:
    source = (
        "from typing import TYPE_CHECKING\nfrom a import eager\n"
        "if TYPE_CHECKING:\n    from a.b import X, Y as Z\n    from a import c\n"
    )
    assert _lazy.type_checking_imports(source) == {"X": ("a.b", "X"), "Z": ("a.b", "Y"), "c": ("a", "c")}
    with pytest.raises(ImportError, match="from package.module import name"):
        _lazy.type_checking_imports("if TYPE_CHECKING:\n    import torch\n")


def test_a_saved_result_loads_in_a_process_that_imported_only_dynalens(tmp_path: Path, tiny_rnn) -> None:
    """``Result.load`` finds the class a file names although its module loads on first use."""
    path = tmp_path / "norms.safetensors"
    dl.probes.ResidualNorms()(tiny_rnn, [[1, 2, 3]]).save(path)
    code = "import sys, dynalens as dl\nprint(type(dl.probes.Result.load(sys.argv[1])).__name__)"
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.split() == ["ResidualNormsResult"], done.stderr[-3000:]


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")], ids=["default", "user_off"])
def test_import_turns_on_torch_huge_pages_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import os, dynalens\nprint(os.environ['THP_MEM_ALLOC_ENABLE'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [expected]
