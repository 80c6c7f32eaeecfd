"""The Circuit page in headless Chromium: it draws what dynalens.circuits.AttributionGraph computes."""

from __future__ import annotations

import pytest
import torch
from dash.testing.wait import until
from dynalens.dashboard.app import create_app

import dynalens as dl

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]


def _elements(dash_duo) -> list[dict]:
    """The graph's elements as cytoscape.js holds them (``data`` of each node and edge)."""
    return dash_duo.driver.execute_script(
        "const el = document.getElementById('circuit-graph');"
        "const cy = el && (el._cyreg && el._cyreg.cy);"
        "return cy ? cy.elements().map(e => e.data()) : null;"
    )


def test_circuit_page_draws_the_graph_and_a_nodes_top_tokens(dash_duo, tmp_path, screenshot, record_progress):
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/circuit")
    from dynalens.dashboard.pages.circuit import default_pair  # pages register once an app exists

    model = dl.load("attn2l-induction")
    clean, corrupt, correct, wrong = default_pair(model)
    ids = lambda text: torch.tensor([[int(t) for t in text.split()]])
    metric = dl.circuits.logit_diff_metric(int(correct), int(wrong))
    result = dl.circuits.AttributionGraph(ids(corrupt), metric, k=10)(model, ids(clean))
    expected = result.pruned(0.1).graph

    dash_duo.wait_for_contains_text("#circuit-message", "Logit difference", timeout=120)
    assert expected.graph["clean_metric"] > expected.graph["corrupt_metric"] + 1  # the model copies the answer
    until(lambda: _elements(dash_duo), timeout=60, msg="the graph was never drawn")
    drawn = _elements(dash_duo)
    nodes = {d["id"]: d for d in drawn if "source" not in d}
    edges = {(d["source"], d["target"]): d["weight"] for d in drawn if "source" in d}
    assert set(nodes) == set(expected.nodes) and set(edges) == set(expected.edges)
    for (u, v), w in edges.items():
        assert w == pytest.approx(expected.edges[u, v]["weight"], rel=1e-4, abs=1e-6)
    strongest = max(expected.nodes, key=lambda n: abs(expected.nodes[n]["effect"]) if n != "logits" else 0)
    assert nodes[strongest]["size"] == max(d["size"] for n, d in nodes.items() if n != "logits")

    dash_duo.driver.execute_script(
        "document.getElementById('circuit-graph')._cyreg.cy.getElementById(arguments[0]).emit('tap');", strongest
    )
    dash_duo.wait_for_contains_text("#circuit-node", f"{strongest} (attribution", timeout=60)
    top = result.top_tokens(strongest)
    first_row = dash_duo.find_elements("#circuit-top-tokens tbody tr")[0].text
    assert repr(top["token"][0]) in first_row and f"{top['logit'][0]:.2f}" in first_row
    screenshot("circuit-attn2l")

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
