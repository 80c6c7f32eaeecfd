"""The results cache: one computation per request, stored as safetensors, never pickled."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import dynalens as dl
from dynalens.dashboard.cache import ResultsCache, code_version, request_key
from dynalens.models.mamba import HookedMamba
from dynalens.probes.residual import ResidualNorms

TOKENS = [1, 2, 3, 4, 5, 1, 2, 3]


@pytest.fixture(scope="module")
def mamba(tiny_mamba_dir):
    return HookedMamba.from_pretrained(tiny_mamba_dir)


def test_request_key_depends_on_every_part_and_only_on_them():
    base = request_key("name:m", TOKENS, "logit_lens", {"k": 5, "layer": 1})
    assert base == request_key("name:m", list(TOKENS), "logit_lens", {"layer": 1, "k": 5})
    changed = [
        request_key("name:other", TOKENS, "logit_lens", {"k": 5, "layer": 1}),
        request_key("name:m", TOKENS[:-1], "logit_lens", {"k": 5, "layer": 1}),
        request_key("name:m", TOKENS, "residual_norms", {"k": 5, "layer": 1}),
        request_key("name:m", TOKENS, "logit_lens", {"k": 5, "layer": 0}),
    ]
    assert len({base, *changed}) == 5


def test_same_request_is_computed_once_and_loads_back_exactly(tmp_path, mamba):
    cache = ResultsCache(tmp_path)
    tokens = torch.tensor([TOKENS])
    calls = []

    def compute():
        calls.append(1)
        return dl.probes.residual_norms(mamba, tokens)

    first = cache.get_or_compute(ResidualNorms, "path:tiny", TOKENS, "residual_norms", {}, compute)
    again = cache.get_or_compute(ResidualNorms, "path:tiny", TOKENS, "residual_norms", {}, compute)
    assert len(calls) == 1
    assert again is not first
    torch.testing.assert_close(again.norms, first.norms, rtol=0, atol=0)
    assert again.str_tokens == first.str_tokens and again.hook_names == first.hook_names
    # a different parameter is a different entry
    cache.get_or_compute(ResidualNorms, "path:tiny", TOKENS, "residual_norms", {"x": 1}, compute)
    assert len(calls) == 2


def test_entries_are_safetensors_and_nothing_is_left_half_written(tmp_path, mamba):
    cache = ResultsCache(tmp_path)
    tokens = torch.tensor([TOKENS])
    cache.get_or_compute(
        ResidualNorms, "path:tiny", TOKENS, "residual_norms", {},
        lambda: dl.probes.residual_norms(mamba, tokens),
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert files[0].read_bytes()[:1] != b"\x80"  # not a pickle
    with safe_open(str(files[0]), framework="pt") as f:
        assert "norms" in f.keys()
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary folders left


def test_a_failed_computation_stores_nothing(tmp_path):
    cache = ResultsCache(tmp_path)

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_compute(ResidualNorms, "m", TOKENS, "residual_norms", {}, fail)
    assert cache.key(ResidualNorms, "m", TOKENS, "residual_norms", {}) not in cache
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_results_of_other_analysis_code_are_not_read_back(tmp_path):
    import importlib.util
    import sys

    def version_of(source: str, name: str) -> str:
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as for any imported analysis module
        spec.loader.exec_module(module)
        return code_version(module.Norms)

    old = version_of("class Norms:\n    scale = 1\n", "analysis_v1")
    new = version_of("class Norms:\n    scale = 2\n", "analysis_v2")
    assert old != new
    assert old == version_of("class Norms:\n    scale = 1\n", "analysis_v1_again")
    assert ResultsCache.key(ResidualNorms, "m", TOKENS, "a", {}) != request_key("m", TOKENS, "a", {})
