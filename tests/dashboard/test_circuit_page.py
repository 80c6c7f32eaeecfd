"""The Circuit page in headless Chromium: AttributionGraph's graph drawn by layer and token position."""

from __future__ import annotations

import json

import pytest
import torch
from dash.testing.wait import until
from dynalens.circuits.graph_layout import layout_graph
from dynalens.dashboard.app import create_app

import dynalens as dl

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

NODES = """
const plot = document.querySelector('#circuit-graph .js-plotly-plot');
const trace = plot && plot._fullData && plot._fullData.find(t => t.name === 'nodes');
return trace ? {ids: Array.from(trace.customdata), x: Array.from(trace.x), y: Array.from(trace.y),
                text: Array.from(trace.text), title: plot.layout.title.text,
                ticks: Array.from(plot._fullLayout.yaxis.ticktext)} : null;
"""


def _nodes(dash_duo) -> dict | None:
    """The node trace as plotly.js holds it: ids, positions, labels; the title and the row labels."""
    return dash_duo.driver.execute_script(NODES)


def test_circuit_page_draws_the_graph_by_layer_and_position(dash_duo, tmp_path, screenshot, record_progress):
    dash_duo.driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path / "cache"))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/circuit")
    from dynalens.dashboard.pages.circuit import DEFAULT_EDGES, KEEP, default_pair  # pages register with an app

    model = dl.load("attn2l-induction")
    clean, corrupt, correct, wrong = default_pair(model)
    ids = lambda text: torch.tensor([[int(t) for t in text.split()]])
    metric = dl.circuits.logit_diff_metric(int(correct), int(wrong))
    result = dl.circuits.AttributionGraph(ids(corrupt), metric, threshold=KEEP, k=10)(model, ids(clean))
    expected = layout_graph(result.graph, result.column_tokens(), max_edges=DEFAULT_EDGES)

    dash_duo.wait_for_contains_text("#circuit-message", "Logit difference", timeout=120)
    assert result.graph.graph["clean_metric"] > result.graph.graph["corrupt_metric"] + 1  # the model copies
    until(lambda: _nodes(dash_duo), timeout=60, msg="the graph was never drawn")
    drawn = _nodes(dash_duo)
    assert drawn["ids"] == [n.id for n in expected.nodes] and drawn["text"] == [n.label for n in expected.nodes]
    assert drawn["x"] == pytest.approx([n.x for n in expected.nodes])
    assert f"{len(expected.edges)} strongest of {expected.n_edges} edges" in drawn["title"] or (
        expected.threshold == 0 and f"all {expected.n_edges} edges" in drawn["title"])
    # rows follow the residual stream: embedding, each layer's heads, logits; every node labelled
    layer_of = {n.id: (-1 if n.kind == "embed" else n.layer) for n in expected.nodes}
    for (a, ya), (b, yb) in zip(zip(drawn["ids"], drawn["y"]), zip(drawn["ids"][1:], drawn["y"][1:])):
        assert ya <= yb and (layer_of[a] < layer_of[b] or (layer_of[a] == layer_of[b] and ya == yb))
    assert drawn["ticks"][0] == "embed" and drawn["ticks"][-1] == "logits"
    assert all(text for text in drawn["text"]) and "logits" in drawn["text"]
    assert any(text.startswith("embed '") for text in drawn["text"])
    screenshot("circuit-attn2l")

    strongest = max((n for n in expected.nodes if n.kind == "head"), key=lambda n: abs(n.effect))
    dash_duo.driver.execute_script(
        "const plot = document.querySelector('#circuit-graph .js-plotly-plot');"
        "const trace = plot._fullData.findIndex(t => t.name === 'nodes');"
        "const i = plot._fullData[trace].customdata.indexOf(arguments[0]);"
        "plot.emit('plotly_click', {points: [{curveNumber: trace, pointNumber: i, pointIndex: i,"
        "  customdata: arguments[0], text: plot._fullData[trace].text[i], x: 0, y: 0}]});",
        strongest.id,
    )
    dash_duo.wait_for_contains_text("#circuit-node", f"{strongest.id} (attribution", timeout=60)
    top = result.top_tokens(strongest.id)
    first_row = dash_duo.find_elements("#circuit-top-tokens tbody tr")[0].text
    assert repr(top["token"][0]) in first_row and f"{top['logit'][0]:.2f}" in first_row

    dash_duo.find_element("#circuit-export-json").click()  # the drawn graph, node-link JSON
    until(lambda: (tmp_path / "attribution_graph.json").is_file(), timeout=30, msg="no JSON download")
    exported = json.loads((tmp_path / "attribution_graph.json").read_text())
    assert [n["id"] for n in exported["nodes"]] == [n.id for n in expected.nodes]
    assert [n["label"] for n in exported["nodes"]] == [n.label for n in expected.nodes]
    assert len(exported["edges"]) == len(expected.edges)
    dash_duo.find_element("#circuit-export-svg").click()  # the picture, through plotly's image export
    until(lambda: (tmp_path / "attribution_graph.svg").is_file(), timeout=30, msg="no SVG download")
    svg = (tmp_path / "attribution_graph.svg").read_text().replace("&#39;", "'").replace("&#x27;", "'")
    assert svg.startswith("<svg") and all(f">{n.label}<" in svg for n in expected.nodes)

    progress = record_progress("circuit-progress")
    dash_duo.find_element("#circuit-build").click()  # the same pair again: built again, bar shown, then hidden
    shown = progress.shown_then_hidden()
    assert shown and all(s["label"].startswith(("Starting", "Attribution graph: clean and corrupt")) for s in shown)
    assert "Logit difference" in dash_duo.find_element("#circuit-message").text

    dash_duo.find_element("#circuit-corrupt").send_keys(" 3")  # one token longer than the clean prompt
    dash_duo.find_element("#circuit-build").click()
    dash_duo.wait_for_contains_text("#circuit-message", "same length", timeout=60)
    assert dash_duo.find_element("#circuit-message .error-box")
    assert not dash_duo.find_element("#circuit-progress").is_displayed()
    assert dash_duo.get_logs() in ([], None)


def test_default_pairs_follow_the_model(smollm2, tmp_path):
    create_app(default_model="attn2l-induction", cache_dir=tmp_path)
    from dynalens.dashboard.pages.circuit import default_pair  # pages register once an app exists

    model = dl.load("attn2l-induction")
    clean, corrupt, correct, wrong = default_pair(model)
    clean_ids, corrupt_ids = clean.split(), corrupt.split()
    half = len(clean_ids) // 2  # BOS x_1..x_L x_1..x_{L-1}: x_L comes next
    assert len(clean_ids) == len(corrupt_ids) and clean_ids[half + 1 :] == corrupt_ids[half + 1 :]
    assert clean_ids[1:half] == clean_ids[half + 1 :] and corrupt_ids[1:half] != clean_ids[1:half]
    assert correct == clean_ids[half] and wrong not in clean_ids
    text_clean, text_corrupt, _, _ = default_pair(smollm2)
    assert smollm2.to_tokens(text_clean).shape == smollm2.to_tokens(text_corrupt).shape


@pytest.mark.slow
def test_smollm2_ioi_graph_is_drawn_readably(dash_duo, tmp_path, screenshot):
    """SmolLM2's IOI graph (about 180 nodes, 1270 edges above 1%): 60 labelled edges on rows of layers."""
    dash_duo.start_server(create_app(default_model="smollm2-135m", cache_dir=tmp_path / "cache"))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/circuit")
    dash_duo.wait_for_contains_text("#circuit-message", "Logit difference", timeout=600)
    until(lambda: _nodes(dash_duo), timeout=60, msg="the graph was never drawn")
    drawn = _nodes(dash_duo)
    assert "60 strongest of" in drawn["title"] and len(drawn["ids"]) <= 60
    assert "embed 'John'" in drawn["text"] and "logits" in drawn["text"]  # the corrupted token's embedding
    assert drawn["ticks"][0] == "embed" and drawn["ticks"][-1] == "logits"
    height = dash_duo.driver.execute_script("return document.documentElement.scrollHeight;")
    dash_duo.driver.set_window_size(1440, min(int(height), 2400))
    screenshot("circuit-smollm2-ioi")
