"""The emergence panel opens a sweep store and draws its stored metrics per checkpoint, loading no model."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pytest
from dash.testing.wait import until
from dynalens.dashboard import sweep_view
from dynalens.dashboard.app import create_app
from dynalens.probes.sweep import sweep

import dynalens as dl

PROMPT = "0 5 9 1 5 7 12 2 7 4 5 9"
CHECKPOINTS = (0, 8, 13, 19)
"""Indices into attn2l-induction's checkpoint series: before, during and after its induction head forms."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An in-process sweep (no Ray): head scores over four checkpoints × two prompt sets."""
    series = dl.models.zoo.checkpoints("attn2l-induction")
    model = dl.load("attn2l-induction")
    prompts = {"short": dl.circuits.repeated_tokens(model, half_len=6, seed=1),
               "long": dl.circuits.repeated_tokens(model, half_len=12, seed=2)}  # fmt: skip
    folder = tmp_path_factory.mktemp("store")
    sweep(dl.circuits.HeadScores(), models=[series[i] for i in CHECKPOINTS], prompts=prompts, store=folder,
          ray=False, progress=False)  # fmt: skip
    return folder, prompts


def test_stored_metrics_are_the_head_scores_of_each_checkpoint(store):
    folder, prompts = store
    frame = sweep_view.metric_frame(folder)
    series = dl.models.zoo.checkpoints("attn2l-induction")
    assert frame["step"].drop_duplicates().tolist() == [series[i][0] for i in CHECKPOINTS]  # training order
    assert set(frame["metric"]) == {"max_induction", "max_prev_token", "max_sink"}
    for index in CHECKPOINTS:
        step, checkpoint = series[index]
        model = dl.load(checkpoint)
        for label, tokens in prompts.items():
            scores = dl.circuits.HeadScores()(model, tokens)
            rows = frame[(frame["step"] == step) & (frame["prompts"] == label)].set_index("metric")["value"]
            assert rows["max_induction"] == pytest.approx(float(scores.induction.max()), rel=1e-5)
            assert rows["max_prev_token"] == pytest.approx(float(scores.prev_token.max()), rel=1e-5)
    final = frame[(frame["step"] == series[CHECKPOINTS[-1]][0]) & (frame["metric"] == "max_induction")]
    first = frame[(frame["step"] == 0) & (frame["metric"] == "max_induction")]
    assert (final["value"].to_numpy() > first["value"].to_numpy() + 0.5).all()  # the induction head emerged
    assert not sweep_view.is_store(series[0][1]) and sweep_view.is_store(folder)


@pytest.mark.browser
@pytest.mark.xdist_group("browser")
def test_emergence_panel_draws_a_sweep_store(dash_duo, tmp_path, store, figure_in, monkeypatch, screenshot):
    folder, _ = store
    loaded = []
    load = dl.load
    monkeypatch.setattr(dl, "load", lambda source, *a, **k: loaded.append(str(source)) or load(source, *a, **k))
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path))
    query = {"model": "attn2l-induction", "prompt": PROMPT, "activations-series": str(folder)}
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/activations?{urlencode(query)}")

    until(lambda: "Sweep store" in ((figure_in("activations-emergence") or {}).get("title") or ""), timeout=120,
          msg="the emergence panel never drew the store")  # fmt: skip
    dash_duo.wait_for_contains_text("#activations-emergence-message", "4 checkpoints from the sweep store", timeout=30)
    expected = sweep_view.metric_frame(folder)
    traces = figure_in("activations-emergence")["traces"]
    assert len(traces) == 3 * 2  # three metrics × two prompt sets
    for trace in traces:
        stored = expected[expected["prompts"] == trace["name"]]
        matches = [part for _, part in stored.groupby("metric") if np.allclose(part["value"], trace["y"], rtol=1e-6)]
        assert len(matches) == 1
        assert trace["x"] == [str(step) for step in matches[0]["step"]]
    assert not any("checkpoints" in source for source in loaded)  # read from the store, nothing recomputed
    dash_duo.driver.execute_script("document.getElementById('activations-emergence').scrollIntoView();")
    screenshot("emergence-store")
