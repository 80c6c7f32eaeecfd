"""The ``dynalens`` command line, called through ``main([...])``."""

from __future__ import annotations

import sys
import types

import pytest

import dynalens as dl
from dynalens.cli import main


def test_models_prints_a_table_of_every_model(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "architecture", "parameters", "description"]
    assert lines[1].split()[:3] == ["smollm2-135m", "transformer", "134.5M"]
    assert [line.split()[0] for line in lines[1:]] == [r.name for r in dl.list_models()]


def test_hooks_filter_resid_lists_names_with_shapes(capsys, tiny_llama_dir):
    assert main(["hooks", str(tiny_llama_dir), "--filter", "resid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# shapes for batch=1, pos=4"
    rows = [line.split(maxsplit=1) for line in lines[2:]]
    names = [name for name, _ in rows]
    assert names[:3] == ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"]
    assert {"blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"} <= set(names)
    assert all("resid" in name and shape == "[1, 4, 64]" for name, shape in rows)


def test_hooks_with_no_match_fails(capsys, tiny_llama_dir):
    assert main(["hooks", str(tiny_llama_dir), "--filter", "no-such-hook"]) == 1
    assert "no hook name" in capsys.readouterr().err


def _fake_module(monkeypatch, name: str, **attrs) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_dashboard_dispatches_lazily(monkeypatch):
    calls = []
    _fake_module(monkeypatch, "dynalens.dashboard.app", run=lambda **kw: calls.append(kw))
    assert main(["dashboard", "--model", "smollm2-135m", "--port", "8123"]) == 0
    assert main(["dashboard", "--threads", "4", "--cache-bytes", "0"]) == 0
    assert calls == [
        {"model": "smollm2-135m", "host": "127.0.0.1", "port": 8123, "threads": 16},
        {"model": None, "host": "127.0.0.1", "port": 8050, "threads": 4, "cache_bytes": None},  # 0: no limit
    ]


def test_train_passes_its_arguments_through(monkeypatch):
    calls = []
    _fake_module(monkeypatch, "dynalens.models.train", main=lambda argv: calls.append(argv) or 0)
    assert main(["train", "--arch", "lstm", "--task", "hmm"]) == 0
    assert calls == [["--arch", "lstm", "--task", "hmm"]]


def test_version_and_bare_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("dynalens ")
    assert main([]) == 0
    assert "models" in capsys.readouterr().out


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])
