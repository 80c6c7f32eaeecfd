"""``dl.load`` and ``dl.list_models``: every accepted form, and clear errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dynalens as dl
from dynalens.models import smollm2 as smollm2_builtin
from dynalens.models import zoo
from dynalens.models.io import atomic_dir, write_json
from dynalens.models.transformer import HookedTransformerBridge
from tests.tolerances import assert_close

PROMPT = "The capital of France is"


@pytest.mark.xdist_group("smollm2")
def test_builtin_name_loads_smollm2_from_the_cache(smollm2):
    assert isinstance(smollm2, HookedTransformerBridge)
    assert (smollm2_builtin.cached_folder() / "model.safetensors").is_file()
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    n = sum(p.numel() for p in smollm2.original_model.parameters())
    assert n == smollm2_builtin.N_PARAMETERS


@pytest.mark.xdist_group("smollm2")
def test_gguf_file_loads_the_same_model(smollm2):
    model = dl.load(smollm2_builtin.gguf_path())
    tokens = smollm2.to_tokens(PROMPT)
    assert torch.equal(model.to_tokens(PROMPT), tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), smollm2(tokens), rtol=0, atol=0)


def test_hf_folder_loads_with_hf_logits(tiny_llama_dir):
    model = dl.load(str(tiny_llama_dir))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        assert_close(model(tokens), hf(tokens).logits)  # the Bridge's forward and HF's


def test_zoo_name_loads_its_folder(tiny_llama_dir, monkeypatch):
    entry = zoo.ZooEntry("tiny", "transformer", "none", "a test entry", tiny_llama_dir)
    monkeypatch.setitem(zoo.ZOO, "tiny", entry)
    assert isinstance(dl.load("tiny"), HookedTransformerBridge)
    assert ("tiny", "transformer", "a test entry") in [
        (r.name, r.architecture, r.description) for r in dl.list_models()
    ]


@pytest.mark.parametrize(
    "model_type, module, cls", [("mamba", "mamba", "HookedMamba"), ("dynalens-rnn", "rnn", "HookedRNN")]
)
def test_folder_dispatches_on_model_type(tmp_path, monkeypatch, model_type, module, cls):
    write_json(tmp_path / "config.json", {"model_type": model_type})
    (tmp_path / "model.safetensors").touch()
    calls = []
    fake = types.ModuleType(f"dynalens.models.{module}")
    loaded = types.SimpleNamespace(cfg=types.SimpleNamespace())
    fake_cls = type(cls, (), {"from_pretrained": classmethod(lambda c, f, **kw: calls.append((f, kw)) or loaded)})
    setattr(fake, cls, fake_cls)
    monkeypatch.setitem(sys.modules, f"dynalens.models.{module}", fake)
    assert dl.load(tmp_path, dtype=torch.float64) is loaded
    assert calls == [(tmp_path, {"dtype": torch.float64})]
    assert loaded.cfg.model_name == str(tmp_path)


def test_list_models_starts_with_smollm2_and_lists_the_zoo():
    rows = dl.list_models()
    assert (rows[0].name, rows[0].architecture, rows[0].parameters) == (
        "smollm2-135m", "transformer", 134_515_008,
    )
    assert [r.name for r in rows[1:]] == list(zoo.ZOO)
    assert {r.architecture for r in rows} <= {"transformer", "mamba", "mamba2", "hybrid", "rnn"}


def test_missing_zoo_module_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "dynalens.models.zoo", None)
    assert [r.name for r in dl.list_models()] == ["smollm2-135m"]


def test_unknown_name_lists_builtin_names_closest_first():
    with pytest.raises(ValueError, match=r"closest first\): smollm2-135m, ") as err:
        dl.load("smollm2-13m")
    assert all(name in str(err.value) for name in zoo.ZOO)


def test_folder_without_config_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        dl.load(tmp_path)


def test_missing_gguf_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="not a built-in name, nor a model folder, nor a .gguf"):
        dl.load(tmp_path / "absent.gguf")


def test_smollm2_cache_is_built_once_with_a_message(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYNALENS_CACHE", str(tmp_path))
    calls = []

    def fake_dequantise(path, dtype):
        calls.append((path, dtype))
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(
            tiny_llama_dir
        )

    monkeypatch.setattr("dynalens.models.transformer.hf_from_gguf", fake_dequantise)  # smollm2 imports it on use
    folder = smollm2_builtin.cached_folder()
    assert folder == tmp_path / "smollm2-135m"
    assert calls == [(smollm2_builtin.gguf_path(), torch.float32)]
    assert "dequantising SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err
    assert smollm2_builtin.cached_folder() == folder and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary left
    assert isinstance(dl.load("smollm2-135m"), HookedTransformerBridge)


def test_cache_folder_keeps_the_first_writer(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target, replace=False) as first:
        (first / "who").write_text("first")
    with atomic_dir(target, replace=False) as second:
        (second / "who").write_text("second")
    assert (target / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_load_waits_for_a_build_on_the_meta_device_in_another_thread(tiny_llama_dir):
    """torch's default device is one global: a load during another thread's meta build would land on meta."""
    import threading

    from dynalens.models.building import on_meta

    holding, release, loaded = threading.Event(), threading.Event(), {}

    def build_on_meta() -> None:
        with on_meta():
            holding.set()
            release.wait(timeout=60)

    builder = threading.Thread(target=build_on_meta)
    builder.start()
    holding.wait(timeout=60)
    loader = threading.Thread(target=lambda: loaded.setdefault("model", dl.load(tiny_llama_dir)))
    loader.start()
    loader.join(timeout=1.0)
    assert loader.is_alive()  # it waits for the build
    release.set()
    builder.join()
    loader.join(timeout=120)
    assert torch.get_default_device() == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded["model"].parameters())
