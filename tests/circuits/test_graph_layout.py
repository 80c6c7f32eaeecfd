"""The attribution graph's per-position attributions, and its layer × token-position layout."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from dynalens.circuits import AttributionGraph, prune
from dynalens.circuits.graph_layout import graph_figure, layout_graph, split_embedding, strongest
from dynalens.probes.figures import token_labels

CORRUPTED = 3
"""The one position where the corrupt prompts differ from the clean ones."""


@pytest.fixture(scope="module")
def result(tiny_llama):
    tokens = torch.randint(100, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    corrupt = tokens.clone()
    corrupt[:, CORRUPTED] = 5
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 42]
    return AttributionGraph(corrupt, metric)(tiny_llama, tokens)


def test_positions_split_effects_and_embedding_edges(result):
    graph = result.graph
    for name, data in graph.nodes(data=True):
        assert len(data["positions"]) == 12
        assert sum(data["positions"]) == pytest.approx(data["effect"], rel=1e-4, abs=1e-6)
        if data["kind"] != "logits":  # nothing before the corrupted token differs between the runs
            assert all(v == 0.0 for v in data["positions"][:CORRUPTED]), name
    assert graph.nodes["logits"]["positions"][-1] == graph.nodes["logits"]["effect"]
    for _, receiver, edge in graph.out_edges("embed", data=True):
        assert sum(edge["positions"]) == pytest.approx(edge["weight"], rel=1e-4, abs=1e-7)
        # only the corrupted token's embedding differs: every other position's part is exactly zero
        assert [p for p, v in enumerate(edge["positions"]) if v != 0.0] in ([], [CORRUPTED]), receiver
    assert not any("positions" in d for u, _, d in graph.edges(data=True) if u != "embed")


def test_split_embedding_keeps_the_weights(result):
    split = split_embedding(result.graph)
    assert "embed" not in split and set(n for n in split if n.startswith("embed")) == {f"embed@{CORRUPTED}"}
    zero = 0  # an edge the metric cannot see (a last-layer MLP at the corrupted token) has no part anywhere
    for _, receiver, weight in result.graph.out_edges("embed", data="weight"):
        if weight == 0.0:
            zero += 1
            assert not split.has_edge(f"embed@{CORRUPTED}", receiver)
        else:
            assert split.edges[f"embed@{CORRUPTED}", receiver]["weight"] == pytest.approx(weight, rel=1e-4, abs=1e-7)
    assert zero < result.graph.out_degree("embed")
    assert split.number_of_edges() == result.graph.number_of_edges() - zero


def test_layout_rows_follow_layers_and_columns_follow_positions(result):
    tokens = result.column_tokens(0)
    placed = layout_graph(result.graph, tokens, max_edges=None)
    order = {"embed": -1.0, "mlp": 0.5, "head": 0.0, "logits": 0.0}
    key = lambda n: n.layer + order[n.kind] if n.kind != "embed" else -1.0
    for a in placed.nodes:
        for b in placed.nodes:
            if key(a) < key(b):
                assert a.y < b.y, (a.id, b.id)
            if key(a) == key(b):
                assert a.y == b.y
    by_id = {n.id: n for n in placed.nodes}
    assert by_id["logits"].y == max(n.y for n in placed.nodes) and by_id["logits"].column == 11
    assert by_id[f"embed@{CORRUPTED}"].label == f"embed {tokens[CORRUPTED].strip()!r}"
    assert by_id["L1.mlp"].label == "MLP 1" and by_id["L0H2"].label == "L0H2"
    assert len({(n.x, n.y) for n in placed.nodes}) == len(placed.nodes)  # no two nodes on one spot
    for node in placed.nodes:
        if node.kind not in ("logits", "embed"):
            assert node.column == max(range(12), key=lambda c: abs(node.positions[c]))
        centres = [x for x, _ in placed.columns]  # a node sits between its neighbours' column centres
        assert node.column == 0 or centres[node.column - 1] < node.x
        assert node.column == 11 or node.x < centres[node.column + 1]
    assert [label for _, label in placed.rows] == ["embed", "L0", "L0 MLP", "L1", "L1 MLP", "logits"]
    assert [x for x, _ in placed.columns] == sorted(x for x, _ in placed.columns)


def test_layout_keeps_the_strongest_edges(result):
    split = split_embedding(result.graph)
    weights = sorted((abs(w) for _, _, w in split.edges(data="weight")), reverse=True)
    placed = layout_graph(result.graph, result.column_tokens(0), max_edges=10)
    assert len(placed.edges) == 10 and placed.n_edges == len(weights)
    assert sorted((abs(w) for _, _, w in placed.edges), reverse=True) == pytest.approx(weights[:10])
    assert placed.threshold == pytest.approx(weights[10] / weights[0])
    assert set(n.id for n in placed.nodes) == set(prune(split, placed.threshold).nodes)
    assert strongest(split, None) == 0.0 and strongest(split, len(weights)) == 0.0
    with pytest.raises(ValueError, match="max_edges must be a positive integer"):
        strongest(split, 0)
    by_threshold = layout_graph(result.graph, result.column_tokens(0), threshold=placed.threshold)
    assert set(by_threshold.edges) == set(placed.edges)


def test_node_link_export_and_figure(result):
    placed = layout_graph(result.graph, result.column_tokens(0), max_edges=12)
    data = json.loads(json.dumps(placed.to_node_link()))
    back = nx.node_link_graph(data, directed=True, edges="edges")
    assert set(back.nodes) == {n.id for n in placed.nodes} and back.number_of_edges() == len(placed.edges)
    for node in placed.nodes:
        assert back.nodes[node.id]["label"] == node.label and back.nodes[node.id]["x"] == node.x
    fig = graph_figure(placed, title="test")
    nodes = next(t for t in fig.data if t.name == "nodes")
    assert list(nodes.customdata) == [n.id for n in placed.nodes] and list(nodes.y) == [n.y for n in placed.nodes]
    assert "promotes:" in nodes.hovertext[[n.kind for n in placed.nodes].index("head")]
    drawn = sum((len(t.x) // 3 for t in fig.data if t.name in ("edges +", "edges -")), 0)
    assert drawn == len(placed.edges)
    assert list(fig.layout.xaxis.ticktext) == token_labels(result.column_tokens(0))
    assert result.figure(max_edges=12).layout.title.text.startswith("Attribution graph (12 of")
