"""Exact pins where dynalens uses a library's internals; a missing internal fails at start-up naming the pin."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import torch
from llvmlite import binding
from numba.core import cgutils
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from dynalens._pins import PinnedInternalsError, names_attribute, require
from dynalens.kernels import compat_numba
from dynalens.models import compat_torch, compat_transformer_lens

ROOT = Path(__file__).resolve().parents[1]
COMPAT = {compat_transformer_lens: compat_transformer_lens.PIN, compat_torch: compat_torch.PIN,
          compat_numba: compat_numba.PINS}
EXACT = re.compile(r"([A-Za-z0-9_.-]+)==([\w.]+)")


def exact_pins() -> dict[str, str]:
    """``name==version`` requirements of ``pyproject.toml``'s dependencies, by name."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(0) for m in map(EXACT.fullmatch, dependencies) if m}


def test_every_exact_pin_belongs_to_a_compat_module_and_is_installed() -> None:
    pins = exact_pins()
    named = {pin for pins_of_module in COMPAT.values() for pin in EXACT.findall(pins_of_module)}
    assert {f"{name}=={version}" for name, version in named} == set(pins.values())
    for name, pin in pins.items():
        installed = importlib.metadata.version(name).split("+")[0]  # torch's local tag: 2.13.0+cpu
        assert pin == f"{name}=={installed}", f"{pin} in pyproject.toml, {installed} installed"


@pytest.mark.parametrize("module", list(COMPAT), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_the_installed_libraries_have_every_internal(module) -> None:
    module.check()  # also ran on import


@pytest.mark.parametrize(("module", "owner", "name", "expected"), [
    (compat_transformer_lens, GeneralizedComponent, "_register_aliases",
     "dynalens relies on transformer_lens.model_bridge.generalized_components.base.GeneralizedComponent"
     "._register_aliases; pinned transformer-lens==4.3.0 in pyproject.toml, but transformer-lens 4.3.0 is installed"),
    (compat_numba, cgutils, "get_item_pointer2",
     "dynalens relies on numba.core.cgutils.get_item_pointer2; pinned numba==0.68.1 and llvmlite==0.50.0"),
    (compat_torch, torch, "_standard_gamma", "dynalens relies on torch._standard_gamma; pinned torch==2.13.0"),
    (compat_torch, torch._C, "_storage_Use_Count",
     "dynalens relies on torch._C._storage_Use_Count; pinned torch==2.13.0"),
], ids=["transformer_lens", "numba", "torch", "torch_storage"])  # fmt: skip
def test_a_missing_internal_names_itself_and_the_pin(monkeypatch, module, owner, name, expected) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(PinnedInternalsError) as error:
        module.check()
    assert str(error.value).startswith(expected), error.value


def test_an_older_llvm_names_the_llvmlite_pin(monkeypatch) -> None:
    monkeypatch.setattr(binding, "llvm_version_info", (16, 0, 1))
    with pytest.raises(PinnedInternalsError, match=r"llvmlite's LLVM 17 or later; pinned numba==0\.68\.1 and llvmlite"):
        compat_numba.check()


def test_an_instance_attribute_is_found_in_the_methods_that_set_it() -> None:
    class Holder:
        def __init__(self) -> None:
            self._registry = {}

    class Child(Holder):
        pass

    assert names_attribute(Child, "_registry") and not names_attribute(Child, "_cache")


def test_require_names_every_missing_internal_and_an_absent_distribution() -> None:
    require("numpy==1.0", {"numpy.present": True})
    with pytest.raises(PinnedInternalsError, match=r"relies on a\.b, c\.d; pinned no-such-dist==1\.0 in pyproject\.toml, "
                                                   r"but no-such-dist is not installed as a distribution"):
        require("no-such-dist==1.0", {"a.b": False, "c.d": False, "e.f": True})
