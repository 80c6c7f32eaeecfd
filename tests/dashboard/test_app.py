"""The app without a browser: binding, page registration, readable errors."""

from __future__ import annotations

import dash
import pytest
import torch

from dynalens.cli import build_parser
from dynalens.dashboard import app as app_module
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app, run


@pytest.fixture
def served(monkeypatch):
    """Record what ``run`` asks Dash to serve instead of serving it."""
    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: calls.append(kw))
    monkeypatch.setattr(app_module, "_preload", lambda model: None)
    return calls


def test_run_binds_localhost_unless_told_otherwise(served, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNALENS_CACHE", str(tmp_path))
    run()
    run(host="0.0.0.0", port=9000)
    assert served[0]["host"] == "127.0.0.1" and served[0]["port"] == 8050
    assert served[1]["host"] == "0.0.0.0" and served[1]["port"] == 9000
    assert served[0]["debug"] is False


def test_cli_dashboard_defaults_to_localhost_and_8050():
    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1" and args.port == 8050


def test_pages_register_themselves(tmp_path):
    create_app(cache_dir=tmp_path)
    paths = {page["path"]: page["name"] for page in dash.page_registry.values()}
    assert paths["/"] == "Explorer"


def test_bad_model_path_is_a_readable_error():
    with pytest.raises(backend.DashboardError, match=r"Could not load model '/no/such/folder'"):
        backend.load_model("/no/such/folder")
    with pytest.raises(backend.DashboardError, match="No model chosen"):
        backend.load_model("  ")


def test_prompts_are_checked_with_messages(tiny_mamba_dir):
    model = backend.load_model(str(tiny_mamba_dir))  # no tokenizer: prompts are token ids
    prompts = backend.encode_prompt(model, "3, 1 4\n1 5")
    torch.testing.assert_close(prompts.tokens, torch.tensor([[3, 1, 4, 1, 5]]))
    assert prompts.str_tokens == [["3", "1", "4", "1", "5"]] and not prompts.is_padded
    assert backend.prompts_of(model, [3, 1, 4, 1, 5]).key() == prompts.key()
    with pytest.raises(backend.DashboardError, match="must be token ids"):
        backend.encode_prompt(model, "three one four")
    with pytest.raises(backend.DashboardError, match="out of range"):
        backend.encode_prompt(model, str(model.cfg.d_vocab))
    with pytest.raises(backend.DashboardError, match="empty"):
        backend.encode_prompt(model, "   ")
    too_long = " ".join(["1"] * (backend.MAX_PROMPT_TOKENS + 1))
    with pytest.raises(backend.DashboardError, match=f"at most {backend.MAX_PROMPT_TOKENS} tokens"):
        backend.encode_prompt(model, too_long)


def test_models_are_loaded_once_per_process(tiny_mamba_dir):
    assert backend.load_model(str(tiny_mamba_dir)) is backend.load_model(f" {tiny_mamba_dir} ")


def test_model_id_follows_the_weights_on_disk(tiny_mamba_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_mamba_dir, copy)
    before = backend.model_id(str(copy))
    assert backend.model_id(str(copy)) == before
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert backend.model_id(str(copy)) != before
    assert backend.model_id("smollm2-135m").startswith("name:smollm2-135m:")
    from dynalens.models.zoo import ZOO  # zoo weights are identified by their files, like a local folder

    assert backend.model_id("mamba-ar") == backend.model_id(str(ZOO["mamba-ar"].path))


def test_analyses_of_one_model_never_run_at_once(tmp_path, tiny_mamba_dir):
    """Callbacks run in threads; hooks live on the shared model, so its analyses take turns."""
    import threading

    server = create_app(cache_dir=tmp_path).server
    first_running, second_started = threading.Event(), threading.Event()
    overlapped = []

    def first():
        first_running.set()
        overlapped.append(second_started.wait(timeout=0.5))
        raise RuntimeError("first done")

    def second():
        second_started.set()
        raise RuntimeError("second done")

    def request(compute, tokens):
        with server.app_context():
            with pytest.raises(backend.DashboardError):
                backend.cached(str(tiny_mamba_dir), None, "x", {"tokens": tokens}, compute)

    a = threading.Thread(target=request, args=(first, [1, 2]))
    a.start()
    first_running.wait(timeout=10)
    b = threading.Thread(target=request, args=(second, [3, 4]))
    b.start()
    a.join()
    b.join()
    assert overlapped == [False] and second_started.is_set()
