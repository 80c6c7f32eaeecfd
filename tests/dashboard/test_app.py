"""The app without a browser: binding, page registration, readable errors."""

from __future__ import annotations

import dash
import flask
import pytest
import torch

from dynalens.cli import build_parser
from dynalens.dashboard import app as app_module
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app, run
from dynalens.dashboard.cache import DEFAULT_MAX_BYTES
from dynalens.dashboard.jobs import ThreadJobs


@pytest.fixture
def served(monkeypatch):
    """Record what ``run`` asks waitress to serve instead of serving it."""
    calls = []
    monkeypatch.setattr(app_module.waitress, "serve", lambda wsgi, **kw: calls.append({"app": wsgi, **kw}))
    monkeypatch.setattr(app_module, "_preload", lambda model: None)
    return calls


def test_run_serves_with_waitress_on_localhost_unless_told_otherwise(served, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNALENS_CACHE", str(tmp_path))
    run()
    run(host="0.0.0.0", port=9000, threads=3, cache_bytes=1000)
    assert served[0]["host"] == "127.0.0.1" and served[0]["port"] == 8050 and served[0]["threads"] == 16
    assert served[1]["host"] == "0.0.0.0" and served[1]["port"] == 9000 and served[1]["threads"] == 3
    assert isinstance(served[0]["app"], flask.Flask)
    with served[1]["app"].app_context():
        assert backend.results_cache().max_bytes == 1000
    with served[0]["app"].app_context():
        assert backend.results_cache().max_bytes == DEFAULT_MAX_BYTES


def test_cli_dashboard_options(monkeypatch):
    parser = build_parser()
    args = parser.parse_args(["dashboard"])
    assert (args.host, args.port, args.threads, args.cache_bytes) == ("127.0.0.1", 8050, 16, None)
    asked = []
    monkeypatch.setattr(app_module, "run", lambda **kw: asked.append(kw))
    assert args.func(parser.parse_args(["dashboard", "--threads", "4", "--cache-bytes", "0"])) == 0
    assert args.func(parser.parse_args(["dashboard", "--cache-bytes", "5000"])) == 0
    assert args.func(args) == 0
    assert asked[0]["threads"] == 4 and asked[0]["cache_bytes"] is None  # 0: no limit
    assert asked[1]["cache_bytes"] == 5000 and "cache_bytes" not in asked[2]  # the app's default
    for bad, why in ((["--threads", "0"], "at least 1"), (["--cache-bytes", "2GB"], "whole number")):
        with pytest.raises(SystemExit):
            parser.parse_args(["dashboard", *bad])


def test_long_callbacks_run_on_the_thread_job_manager(tmp_path):
    app = create_app(cache_dir=tmp_path)
    assert isinstance(app._background_manager, ThreadJobs)


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
