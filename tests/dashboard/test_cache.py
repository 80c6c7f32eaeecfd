"""The results cache and the pages' one run: keys cover model, prompts, parameters and code; one forward per page."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import flask
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from safetensors import safe_open
from torch import Tensor

from dynalens.dashboard import backend
from dynalens.dashboard.cache import (
    ResultsCache,
    analysis_key,
    code_version,
    library_folders,
    plain_params,
    request_key,
    source_digest,
)
from dynalens.models import names
from dynalens.models.mamba import HookedMamba
from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import Analysis, run
from dynalens.probes.results import Result, Saved
from tests.tolerances import assert_close

TOKENS = [1, 2, 3, 4, 5, 1, 2, 3]


# --------------------------------------------------- two small analyses to cache
@dataclass(kw_only=True, eq=False)
class CacheTestNormsResult(Result):
    norms: Tensor  # [layer + 1, batch, pos]

    def top(self, k: int = 10) -> pd.DataFrame:
        return self.to_frame().nlargest(k, "norm")

    def to_frame(self) -> pd.DataFrame:
        return pd.concat([self.position_frame(norm=n).assign(layer=i) for i, n in enumerate(self.norms)])

    def figure(self, **options) -> go.Figure:
        return go.Figure(go.Heatmap(z=self.norms[:, 0].numpy()))


class CacheTestNorms(Analysis):
    """Scaled residual-stream norms (``scale`` is a parameter that changes the result)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def hooks(self, model) -> list[str]:
        return names.resid_stream(model.cfg.n_layers)

    def _compute(self, cache, prompts) -> CacheTestNormsResult:
        norms = torch.stack([cache[n].norm(dim=-1) for n in self.hooks(cache.model)]) * self.scale
        return CacheTestNormsResult(**self.provenance(cache.model, prompts), norms=norms.cpu())


@dataclass(kw_only=True, eq=False)
class CacheTestLastLogitResult(Result):
    values: Tensor  # [batch, pos]

    def top(self, k: int = 10) -> pd.DataFrame:
        return self.to_frame().nlargest(k, "value")

    def to_frame(self) -> pd.DataFrame:
        return self.position_frame(value=self.values)

    def figure(self, **options) -> go.Figure:
        return go.Figure(go.Bar(y=self.values[0].numpy()))


class CacheTestLastLogit(Analysis):
    """The final normalised stream's first channel (another hook than the norms)."""

    def hooks(self, model) -> list[str]:
        return [names.FINAL_NORMALIZED]

    def _compute(self, cache, prompts) -> CacheTestLastLogitResult:
        return CacheTestLastLogitResult(
            **self.provenance(cache.model, prompts), values=cache[names.FINAL_NORMALIZED][..., 0].cpu()
        )


class CacheTestHeadsOnly(CacheTestLastLogit):
    architectures = ("transformer",)
    requirement = "attention heads"


@pytest.fixture(scope="module")
def mamba(tiny_mamba_dir):
    return HookedMamba.from_pretrained(tiny_mamba_dir)


@pytest.fixture
def forwards(mamba):
    """A list that gets one entry per forward pass of ``mamba`` (a torch hook on ``hook_embed``)."""
    seen: list[int] = []
    handle = mamba.hook_dict[names.EMBED].register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    yield seen
    handle.remove()


@pytest.fixture
def app_cache(tmp_path):
    """A Flask app context holding a results cache, as ``create_app`` sets it up."""
    app = flask.Flask("test")
    app.config[backend.CACHE_CONFIG_KEY] = ResultsCache(tmp_path / "results")
    with app.app_context():
        yield app.config[backend.CACHE_CONFIG_KEY]


# ---------------------------------------------------------------------- keys
def test_request_key_depends_on_every_part_and_only_on_them():
    base = request_key("name:m", "p1", "mod.LogitLens", {"k": 5, "layer": 1}, version="1")
    assert base == request_key("name:m", "p1", "mod.LogitLens", {"layer": 1, "k": 5}, version="1")
    changed = [
        request_key("name:other", "p1", "mod.LogitLens", {"k": 5, "layer": 1}, version="1"),
        request_key("name:m", "p2", "mod.LogitLens", {"k": 5, "layer": 1}, version="1"),
        request_key("name:m", None, "mod.LogitLens", {"k": 5, "layer": 1}, version="1"),
        request_key("name:m", "p1", "mod.ResidualNorms", {"k": 5, "layer": 1}, version="1"),
        request_key("name:m", "p1", "mod.LogitLens", {"k": 5, "layer": 0}, version="1"),
        request_key("name:m", "p1", "mod.LogitLens", {"k": 5, "layer": 1}, version="2"),
    ]
    assert len({base, *changed}) == 7
    assert request_key("name:m", "p1", "a", {}) == request_key("name:m", "p1", "a", {}, version=code_version())


def test_analysis_key_covers_model_prompts_class_and_parameters(mamba):
    prompts = Prompts(mamba, torch.tensor([TOKENS]))
    key = analysis_key("path:tiny", prompts, CacheTestNorms(scale=2.0))
    assert key == analysis_key("path:tiny", Prompts(mamba, [TOKENS]), CacheTestNorms(scale=2.0))
    others = [
        analysis_key("path:other", prompts, CacheTestNorms(scale=2.0)),
        analysis_key("path:tiny", Prompts(mamba, torch.tensor([TOKENS[:-1]])), CacheTestNorms(scale=2.0)),
        analysis_key("path:tiny", Prompts(mamba, [TOKENS, TOKENS[:3]]), CacheTestNorms(scale=2.0)),
        analysis_key("path:tiny", prompts, CacheTestNorms(scale=3.0)),
        analysis_key("path:tiny", prompts, CacheTestLastLogit()),
        analysis_key("path:tiny", None, CacheTestNorms(scale=2.0)),
    ]
    assert len({key, *others}) == 7


def test_plain_params_identify_tensors_models_and_nested_analyses(mamba, tiny_mamba_dir):
    a, b = torch.arange(6.0), torch.arange(6.0)
    assert plain_params(a) == plain_params(b) != plain_params(b + 1)
    assert plain_params(a) != plain_params(a.reshape(2, 3))
    assert plain_params(float("nan")) == "nan" and plain_params(torch.tensor(2.0))["tensor"] == "torch.float32[]"
    assert plain_params(CacheTestNorms(1.0)) != plain_params(CacheTestNorms(2.0))
    prompts = Prompts(mamba, [TOKENS])
    big = CacheTestNorms()(mamba, prompts)  # a Result as a parameter: its tensors, not their truncated repr
    edited = CacheTestNorms()(mamba, prompts)
    edited.norms[0, 0, 3] += 1
    assert plain_params(big) == plain_params(CacheTestNorms()(mamba, prompts)) != plain_params(edited)
    same = HookedMamba.from_pretrained(tiny_mamba_dir)
    assert plain_params(same) == plain_params(mamba)
    with torch.no_grad():
        same.blocks[0].mixer.D.add_(1.0)
    other = HookedMamba.from_pretrained(tiny_mamba_dir)
    with torch.no_grad():
        other.blocks[0].mixer.D.add_(1.0)
    assert plain_params(other) != plain_params(mamba)


def test_an_edited_helper_changes_the_code_version(tmp_path):
    """The key's code part covers every library source file, not only the result type's module."""
    tree = tmp_path / "lib"
    (tree / "probes").mkdir(parents=True)
    (tree / "probes" / "logit_lens.py").write_text("class LogitLensResult: ...\n")
    (tree / "probes" / "figures.py").write_text("def heatmap(): return 1\n")
    (tree / "circuits" / "data").mkdir(parents=True)
    (tree / "circuits" / "data" / "harmful.jsonl").write_text('{"prompt": "x"}\n')
    before = source_digest([tree / "probes", tree / "circuits"])
    assert before == source_digest([tree / "circuits", tree / "probes"])
    (tree / "probes" / "__pycache__").mkdir()
    (tree / "probes" / "__pycache__" / "figures.cpython-311.pyc").write_bytes(b"\x00compiled")
    (tree / "probes" / "notes.txt").write_text("not code")
    assert source_digest([tree / "probes", tree / "circuits"]) == before
    (tree / "probes" / "figures.py").write_text("def heatmap(): return 2\n")  # a helper, not the result's module
    edited = source_digest([tree / "probes", tree / "circuits"])
    assert edited != before
    (tree / "circuits" / "data" / "harmful.jsonl").write_text('{"prompt": "y"}\n')  # data the analysis reads
    assert source_digest([tree / "probes", tree / "circuits"]) != edited


def test_the_code_version_reads_the_whole_library_but_not_the_dashboard(tmp_path):
    import dynalens

    folders = library_folders()
    files = {p.relative_to(f.parent).as_posix() for f in folders for p in f.rglob("*.py")}
    for helper in ("models/prompts.py", "models/names.py", "probes/analysis.py", "probes/figures.py",
                   "circuits/heads.py", "kernels/selective_scan.py", "dynalens/_version.py"):  # fmt: skip
        assert helper in files
    assert not any(f.name == "dashboard" for f in folders)
    assert code_version().startswith(f"{dynalens.__version__}+")
    copy = Path(shutil.copytree(folders[2], tmp_path / folders[2].name))  # the installed probes
    before = source_digest([copy])
    helper = copy / "figures.py"
    helper.write_text(helper.read_text() + "\n# edited\n")
    assert source_digest([copy]) != before


# ---------------------------------------------------------------- the cache
def test_same_request_is_computed_once_and_loads_back_exactly(tmp_path, mamba):
    cache = ResultsCache(tmp_path)
    prompts = Prompts(mamba, [TOKENS])
    calls = []

    def compute():
        calls.append(1)
        return CacheTestNorms()(mamba, prompts)

    key = analysis_key("path:tiny", prompts, CacheTestNorms())
    first = cache.get_or_compute(key, compute)
    again = cache.get_or_compute(key, compute)
    assert len(calls) == 1 and again is not first and type(again) is CacheTestNormsResult
    torch.testing.assert_close(again.norms, first.norms, rtol=0, atol=0)
    assert again.prompts.key() == prompts.key() and again.params == {"scale": 1.0}
    cache.get_or_compute(analysis_key("path:tiny", prompts, CacheTestNorms(scale=2.0)), compute)
    assert len(calls) == 2


def test_entries_are_safetensors_and_nothing_is_left_half_written(tmp_path, mamba):
    cache = ResultsCache(tmp_path)
    prompts = Prompts(mamba, [TOKENS])
    cache.get_or_compute("ab" + "0" * 62, lambda: CacheTestNorms()(mamba, prompts))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert files[0].read_bytes()[:1] != b"\x80"  # not a pickle
    with safe_open(str(files[0]), framework="pt") as f:
        assert "norms" in f.keys()
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_a_failed_computation_stores_nothing(tmp_path):
    cache = ResultsCache(tmp_path)

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_compute("cd" + "0" * 62, fail)
    assert "cd" + "0" * 62 not in cache
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with pytest.raises(KeyError):
        cache.load("cd" + "0" * 62)


# ----------------------------------------------------- one run for a page
def test_a_page_pays_one_forward_for_all_its_panels_and_none_when_cached(app_cache, mamba, forwards):
    prompts = backend.encode_prompt(mamba, " ".join(map(str, TOKENS)))
    page = [CacheTestNorms(scale=2.0), CacheTestLastLogit()]
    first = backend.page_results("tiny", mamba, prompts, page)
    assert forwards == [1] and sorted(first.computed) == ["cache_test_last_logit", "cache_test_norms"]
    for analysis in page:  # each panel's Result equals the analysis run alone
        alone = analysis(mamba, prompts)
        drawn = first[analysis.name]
        field = "norms" if isinstance(analysis, CacheTestNorms) else "values"
        assert_close(getattr(drawn, field), getattr(alone, field))
    forwards.clear()

    again = backend.page_results("tiny", mamba, prompts, page)  # another panel's callback: all cached
    assert forwards == [] and again.computed == []
    torch.testing.assert_close(again["cache_test_norms"].norms, first["cache_test_norms"].norms, rtol=0, atol=0)
    torch.testing.assert_close(again[page[1]].values, first[page[1]].values, rtol=0, atol=0)

    changed = backend.page_results("tiny", mamba, prompts, [CacheTestNorms(scale=3.0), CacheTestLastLogit()])
    assert forwards == [1] and changed.computed == ["cache_test_norms"]  # only the new parameter is computed
    torch.testing.assert_close(changed["cache_test_norms"].norms, 1.5 * first["cache_test_norms"].norms)


def test_an_analysis_that_does_not_apply_says_so_and_the_others_run(app_cache, mamba, forwards):
    prompts = backend.encode_prompt(mamba, "3 1 4 1 5")
    found = backend.page_results("tiny", mamba, prompts, [CacheTestNorms(), CacheTestHeadsOnly()])
    assert forwards == [1] and found.applies("cache_test_norms") and not found.applies("cache_test_heads_only")
    assert found["cache_test_norms"].norms.shape == (mamba.cfg.n_layers + 1, 1, 5)
    with pytest.raises(backend.DashboardError, match="needs attention heads.*this model is a mamba"):
        found["cache_test_heads_only"]


def test_concurrent_callbacks_of_one_page_share_one_forward(app_cache, mamba, forwards):
    """Dash answers a page's callbacks in threads; the first computes, the others wait and read."""
    prompts = backend.encode_prompt(mamba, "7 7 1 2 9")
    page = [CacheTestNorms(), CacheTestLastLogit()]
    app = flask.current_app._get_current_object()
    found, errors = [], []

    def callback():
        try:
            with app.app_context():
                found.append(backend.page_results("tiny", mamba, prompts, page)["cache_test_norms"].norms)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=callback) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and forwards == [1] and len(found) == 4
    for norms in found[1:]:
        torch.testing.assert_close(norms, found[0], rtol=0, atol=0)


def test_a_failing_run_is_one_readable_error_and_stores_nothing(app_cache, mamba):
    class Broken(CacheTestNorms):
        def _compute(self, cache, prompts):
            raise RuntimeError("the norms broke\nsecond line")

    prompts = backend.encode_prompt(mamba, "1 2 3")
    with pytest.raises(backend.DashboardError, match=r"^broken failed: the norms broke$"):
        backend.page_results("tiny", mamba, prompts, [Broken()])
    assert not [p for p in app_cache.root.rglob("*") if p.is_file()]


def test_results_loaded_back_equal_dl_run(app_cache, mamba):
    prompts = Prompts(mamba, [TOKENS, TOKENS[2:]])  # a ragged batch goes through the same way
    backend.page_results("tiny", mamba, prompts, [CacheTestNorms()])
    loaded = backend.page_results("tiny", mamba, prompts, [CacheTestNorms()])["cache_test_norms"]
    direct = run(mamba, prompts, [CacheTestNorms()])["cache_test_norms"]
    assert isinstance(loaded, CacheTestNormsResult) and Saved is not type(loaded)
    assert_close(loaded.norms, direct.norms)


# ------------------------------------------------------------ the size limit
def _entry(cache: ResultsCache, mamba, scale: float) -> tuple[str, int]:
    """Store CacheTestNorms(scale) under its key; the key and the entry's bytes."""
    prompts = Prompts(mamba, [TOKENS])
    key = analysis_key("path:tiny", prompts, CacheTestNorms(scale=scale))
    cache.store(key, CacheTestNorms(scale=scale)(mamba, prompts))
    return key, cache.path(key).stat().st_size


def test_the_least_recently_used_entries_go_first_when_the_cache_is_full(tmp_path, mamba):
    unlimited = ResultsCache(tmp_path, max_bytes=None)
    a, size = _entry(unlimited, mamba, 1.0)
    b, _ = _entry(unlimited, mamba, 2.0)
    c, _ = _entry(unlimited, mamba, 3.0)
    assert unlimited.size() >= 3 * size - 64 and unlimited.evict() == []
    cache = ResultsCache(tmp_path, max_bytes=3 * size + size // 2)  # room for three entries, not four
    unlimited.load(a)  # a was stored first but read last: b is now the least recently used
    d, _ = _entry(cache, mamba, 4.0)
    assert b not in cache and all(key in cache for key in (a, c, d))
    assert cache.size() <= cache.max_bytes
    cache.load(c)
    cache.load(d)
    _entry(cache, mamba, 5.0)  # a is now the oldest use
    assert a not in cache and c in cache and d in cache
    with pytest.raises(KeyError):
        cache.load(a)


def test_an_entry_larger_than_the_limit_is_kept_until_the_next_store(tmp_path, mamba):
    cache = ResultsCache(tmp_path, max_bytes=10)
    first, size = _entry(cache, mamba, 1.0)
    assert size > 10 and first in cache  # the one just stored stays: the page reads it next
    second, _ = _entry(cache, mamba, 2.0)
    assert first not in cache and second in cache
    assert cache.get_or_compute(first, lambda: CacheTestNorms(scale=1.0)(mamba, Prompts(mamba, [TOKENS])))
    assert first in cache and second not in cache


def test_the_order_of_use_survives_a_new_cache_object(tmp_path, mamba):
    """Last use is the file's time: another process (or a restart) evicts in the same order."""
    writer = ResultsCache(tmp_path, max_bytes=None)
    keys = [_entry(writer, mamba, float(s))[0] for s in (1, 2, 3)]
    writer.load(keys[0])
    order = [path.name.removesuffix(".safetensors") for path, _, _ in ResultsCache(tmp_path).entries()]
    assert order == [keys[1], keys[2], keys[0]]


def test_the_size_limit_is_checked():
    with pytest.raises(ValueError, match="max_bytes must be a number of bytes"):
        ResultsCache(max_bytes=-1)
    with pytest.raises(ValueError, match="max_bytes must be a number of bytes"):
        ResultsCache(max_bytes=1.5e9)
