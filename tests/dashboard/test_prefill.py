"""A page's layout arrives drawn from the results cache, and only from it (``dashboard/prefill.py``)."""

from __future__ import annotations

import numpy as np
import pytest

import dynalens as dl
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app
from dynalens.dashboard import url_state
from dynalens.dashboard.prefill import request_of
from tests.tolerances import assert_close

MODEL, PROMPT = "attn2l-induction", "0 5 9 1 5 7 12 2"


def by_id(layout) -> dict:
    """The components of a layout that have a (string) id."""
    return {c.id: c for c in url_state.walk(layout) if isinstance(getattr(c, "id", None), str)}


@pytest.fixture
def heads_page(tmp_path):
    """The Heads page module of a fresh app (its callbacks registered), inside a request of that app."""
    app = create_app(cache_dir=tmp_path)
    app.server.test_client().get("/")  # Dash imports the pages on the first request
    from dynalens.dashboard.pages import heads

    with app.server.test_request_context():
        yield heads


def test_a_layout_is_drawn_once_its_results_are_cached(heads_page):
    heads = heads_page
    query = {"model": MODEL, "prompt": PROMPT, heads.KIND: "prev_token"}
    backend.load_model(MODEL)
    empty = heads.layout(**query)
    held = by_id(empty)
    assert held[heads.PAGE.request_id].data is None  # HeadScores not cached: the callbacks will draw
    assert held[f"{heads.GRID}-box"].className == "figure-box empty"

    request = request_of(query)
    heads.scores_panel(request, "prev_token", "key")  # what the page's callbacks compute and cache
    heads.pattern_panel(request, None)

    drawn = by_id(heads.layout(**query))
    assert drawn[heads.PAGE.request_id].data["prompt"] == PROMPT
    assert drawn[heads.PAGE.drawn_id].data == drawn[heads.PAGE.request_id].data
    grid = drawn[heads.GRID].figure
    assert "prev-token" in grid.layout.title.text  # the kind the URL names
    model = dl.load(MODEL)
    expected = dl.circuits.HeadScores()(model, heads.workload(backend.load_model(MODEL))).prev_token
    assert_close(np.asarray(grid.data[0].z, dtype=float), expected.double().numpy().reshape(np.shape(grid.data[0].z)))
    assert drawn[f"{heads.GRID}-box"].className == "figure-box"  # the client-side twins' values
    assert drawn[f"{heads.GRID}-csv"].disabled is False and drawn[f"{heads.GRID}-result"].disabled is False
    assert "Top prev-token head" in str(drawn[f"{heads.GRID}-message"].children)


def test_cached_only_raises_instead_of_loading_or_computing(heads_page, tmp_path):
    with backend.cached_only(), pytest.raises(backend.NotCached):
        backend.load_model(str(tmp_path / "a-model-not-loaded"))
    model = backend.load_model(MODEL)
    prompts = backend.encode_prompt(model, PROMPT)
    with backend.cached_only(), pytest.raises(backend.NotCached):
        backend.page_results(MODEL, model, prompts, [dl.probes.ResidualNorms()])
    computed = backend.page_results(MODEL, model, prompts, [dl.probes.ResidualNorms()])
    with backend.cached_only():
        again = backend.page_results(MODEL, model, prompts, [dl.probes.ResidualNorms()])
    assert computed.computed == ["residual_norms"] and again.computed == []
    assert_close(again["residual_norms"].norms, computed["residual_norms"].norms)
