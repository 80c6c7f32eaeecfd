"""dl.load's errors name the file and say what dynalens accepts."""

from __future__ import annotations

import json

import pytest

import dynalens as dl


def _folder(tmp_path, config: str, weights: dict[str, bytes] | None = None):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    for name, data in (weights or {}).items():
        (folder / name).write_bytes(data)
    return folder


def test_corrupt_config_names_the_file(tmp_path):
    folder = _folder(tmp_path, "{not json")
    with pytest.raises(ValueError, match=r"model/config\.json is not valid JSON"):
        dl.load(folder)


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        dl.load(tmp_path / "empty")


@pytest.mark.parametrize("config, message", [
    ({"model_type": "lamma"}, r"unknown model_type 'lamma'.*closest: llama"),
    ({"hidden_size": 8}, r"has no \"model_type\""),
])  # fmt: skip
def test_unknown_or_missing_model_type(tmp_path, config, message):
    folder = _folder(tmp_path, json.dumps(config))
    with pytest.raises(ValueError, match=message):
        dl.load(folder)


def test_pickled_weights_are_refused_unread(tmp_path):
    folder = _folder(tmp_path, json.dumps({"model_type": "llama"}), {"pytorch_model.bin": b"\x80\x04not read"})
    with pytest.raises(ValueError, match=r"pickled files \(pytorch_model\.bin\).*never unpickles"):
        dl.load(folder)


def test_gguf_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        dl.load(path)
