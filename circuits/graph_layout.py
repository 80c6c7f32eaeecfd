"""The attribution graph laid out as layer × token position, as attribution-graph viewers draw it.

:func:`layout_graph` places every node of an
:class:`~dynalens.circuits.AttributionGraphResult` graph where its computation
happens: a row per layer (the embedding at the bottom, a layer's heads, then
its MLP, the logits on top) and a column per token position (the position
where the node writes most of its effect; the logits at the last token). The
embedding becomes one node per token (``embed 'Mary'``), with the edges out of
it split by position. Nodes that share a row and a column sit side by side, so
a column is as wide as its most crowded cell. The graph is pruned to its
strongest edges first (:func:`~dynalens.circuits.prune` at the threshold that
keeps ``max_edges``), which keeps a 30-layer model's graph readable.
:func:`graph_figure` draws a layout with plotly: node labels (``L12H3``,
``MLP 7``, ``embed 'Mary'``, ``logits``), node colour and size by effect,
edge colour and width by signed weight, and hover text with the node's
effect, where it writes and the tokens its output promotes.

Examples
--------
>>> graph = dl.circuits.AttributionGraph(corrupt, metric)(model, clean)         # doctest: +SKIP
>>> placed = layout_graph(graph.graph, graph.str_tokens(), max_edges=60)        # doctest: +SKIP
>>> graph_figure(placed, title="IOI").show()                                    # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import plotly.graph_objects as go

from dynalens.circuits.patching import prune
from dynalens.probes.figures import TEMPLATE, token_label

POSITIVE, NEGATIVE, NEUTRAL = "#c0392b", "#2e6db4", "#6b7280"
"""Colours of a positive (helps the clean answer) and a negative weight or effect, and of the logits."""

ROW_HEIGHT, MIN_HEIGHT = 40, 420
"""Pixels per row of the figure (plus room for the title and the token labels), and the least height."""

WIDTH_LEVELS = 6
"""Edge widths are drawn in this many steps of ``|weight|`` (one plotly trace per step and sign)."""


@dataclass(frozen=True)
class PlacedNode:
    """A node of the drawn graph.

    Attributes
    ----------
    id
        The node's name in the graph (``embed@{position}`` for the embedding of one token).
    label
        What the picture shows: ``L12H3``, ``MLP 7``, ``embed 'Mary'``, ``logits``.
    kind
        ``embed``, ``head``, ``mlp`` or ``logits``.
    layer
        The layer (-1 for the embedding, ``n_layers`` for the logits).
    row, column
        The row (layer order: embedding 0, then each layer's heads and MLP) and
        the token position (a column of the left-padded batch).
    x, y
        Where the node is drawn.
    effect
        The node's attribution (for ``embed 'Mary'``: that token's share).
    positions
        ``effect`` per column.
    top_tokens
        ``[token_id, token, logit]`` rows: the tokens its output promotes at the last position.
    """

    id: str
    label: str
    kind: str
    layer: int
    row: int
    column: int
    x: float
    y: float
    effect: float
    positions: tuple[float, ...]
    top_tokens: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True)
class GraphLayout:
    """An attribution graph placed on the layer × token-position grid.

    Attributes
    ----------
    nodes
        The placed nodes, by row then x.
    edges
        ``(sender id, receiver id, weight)`` of every drawn edge, strongest first.
    rows
        ``(y, label)`` of each row that holds a node, bottom up.
    columns
        ``(x, token label)`` of each token position, left to right.
    threshold
        The pruning threshold: edges of ``|weight| <= threshold · max |weight|`` are not drawn.
    n_edges
        Edges of the graph before pruning (the embedding split by token).
    width
        The x extent of the grid (from 0).
    """

    nodes: tuple[PlacedNode, ...]
    edges: tuple[tuple[str, str, float], ...]
    rows: tuple[tuple[float, str], ...]
    columns: tuple[tuple[float, str], ...]
    threshold: float
    n_edges: int
    width: float

    def node(self, id: str) -> PlacedNode:
        """The placed node ``id`` (``KeyError`` naming the ids when there is none)."""
        for node in self.nodes:
            if node.id == id:
                return node
        raise KeyError(f"no node {id!r} in the drawn graph: ids are {', '.join(n.id for n in self.nodes[:5])}, ...")

    def to_node_link(self) -> dict[str, Any]:
        """The drawn graph as node-link JSON (networkx' form), every node with its label and place."""
        graph = nx.DiGraph(threshold=self.threshold, n_edges=self.n_edges)
        for node in self.nodes:
            graph.add_node(node.id, **{k: v for k, v in node.__dict__.items() if k != "id"})
        for sender, receiver, weight in self.edges:
            graph.add_edge(sender, receiver, weight=weight)
        return nx.node_link_data(graph, edges="edges")


def split_embedding(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of ``graph`` with ``embed`` replaced by one node ``embed@{p}`` per token position.

    Each carries the embedding's effect at ``p`` and the edges out of ``embed``
    at ``p`` (their ``positions``); positions without any weight get no node.
    A graph without per-position weights (or without ``embed``) is copied as is.
    """
    split = graph.copy()
    if "embed" not in graph or not all("positions" in d for _, _, d in graph.out_edges("embed", data=True)):
        return split
    data = graph.nodes["embed"]
    split.remove_node("embed")
    effects = data.get("positions") or []
    for _, receiver, edge in graph.out_edges("embed", data=True):
        for position, weight in enumerate(edge["positions"]):
            if weight == 0.0:
                continue
            node = f"embed@{position}"
            if node not in split:
                effect = effects[position] if position < len(effects) else 0.0
                positions = [0.0] * len(edge["positions"])
                positions[position] = effect
                split.add_node(node, **{**data, "effect": effect, "positions": positions})
            split.add_edge(node, receiver, weight=weight)
    return split


def strongest(graph: nx.DiGraph, max_edges: int | None) -> float:
    """The pruning threshold (fraction of the largest ``|weight|``) that keeps the ``max_edges`` strongest edges.

    0 keeps every edge (``max_edges`` None, or at least the number of edges);
    ties at the cut are dropped together, so fewer may be kept.
    """
    if max_edges is not None and (isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1):
        raise ValueError(f"max_edges must be a positive integer or None (every edge), got {max_edges!r}")
    weights = sorted((abs(w) for _, _, w in graph.edges(data="weight")), reverse=True)
    if max_edges is None or len(weights) <= max_edges or not weights[0]:
        return 0.0
    return weights[max_edges] / weights[0]


def layout_graph(
    graph: nx.DiGraph, str_tokens: Sequence[str], max_edges: int | None = 60, threshold: float | None = None
) -> GraphLayout:
    """Place ``graph`` (an :class:`~dynalens.circuits.AttributionGraphResult`'s) on the layer × position grid.

    Parameters
    ----------
    graph
        The attribution graph: nodes with ``kind``, ``layer``, ``head``,
        ``effect``, ``positions``, ``top_tokens``; edges with ``weight``.
    str_tokens
        ``[pos]``: the label of each column (the prompt's tokens in the
        left-padded layout; ``""`` for padding).
    max_edges
        Draw the strongest ``max_edges`` edges (None: every edge).
    threshold
        Instead of ``max_edges``: drop edges of ``|weight| <= threshold · max |weight|``.

    Returns
    -------
    GraphLayout
        Nodes with their row, column and ``(x, y)``; edges; the row and column labels; the threshold used.

    Raises
    ------
    ValueError
        When a node's ``positions`` are longer than ``str_tokens``.
    """
    split = split_embedding(graph)
    cut = strongest(split, max_edges) if threshold is None else threshold
    kept = prune(split, cut)
    n_columns = len(str_tokens)
    order, cells = {}, defaultdict(list)
    for name, data in kept.nodes(data=True):
        positions = list(data.get("positions") or [])
        if len(positions) > n_columns:
            raise ValueError(f"node {name!r} has {len(positions)} positions but there are {n_columns} token labels")
        column = n_columns - 1 if data["kind"] == "logits" or not positions else int(np.abs(positions).argmax())
        order[name] = _order(data)
        cells[order[name], column].append(name)
    rows = sorted(set(order.values()))
    row_of = {o: i for i, o in enumerate(rows)}
    widths = [max([len(names) for (_, col), names in cells.items() if col == c] or [1]) for c in range(n_columns)]
    starts = np.concatenate([[0.0], np.cumsum(widths)[:-1]])
    placed = []
    for (o, column), names in cells.items():
        names = sorted(names, key=lambda n: (kept.nodes[n].get("head") or 0, n))
        offset = starts[column] + (widths[column] - len(names)) / 2 + 0.5
        for i, name in enumerate(names):
            data = kept.nodes[name]
            placed.append(PlacedNode(
                id=name, label=_label(name, data, str_tokens), kind=data["kind"], layer=data["layer"],
                row=row_of[o], column=column, x=float(offset + i), y=float(row_of[o]), effect=float(data["effect"]),
                positions=tuple(float(p) for p in data.get("positions") or ()),
                top_tokens=tuple(tuple(row) for row in data.get("top_tokens") or ()),
            ))  # fmt: skip
    placed.sort(key=lambda n: (n.row, n.x))
    edges = sorted(((u, v, float(w)) for u, v, w in kept.edges(data="weight")), key=lambda e: -abs(e[2]))
    return GraphLayout(
        nodes=tuple(placed), edges=tuple(edges),
        rows=tuple((float(row_of[o]), _row_label(o, kept)) for o in rows),
        columns=tuple((float(starts[c] + widths[c] / 2), token_label(t)) for c, t in enumerate(str_tokens)),
        threshold=cut, n_edges=split.number_of_edges(), width=float(sum(widths)),
    )  # fmt: skip


def _order(data: dict[str, Any]) -> float:
    """The row key of a node: embedding -1, a layer's heads ``l``, its MLP ``l + 0.5``, the logits ``n_layers``."""
    return {"embed": -1.0, "mlp": data["layer"] + 0.5}.get(data["kind"], float(data["layer"]))


def _label(name: str, data: dict[str, Any], str_tokens: Sequence[str]) -> str:
    kind = data["kind"]
    if kind == "mlp":
        return f"MLP {data['layer']}"
    if kind == "embed" and "@" in name:
        return f"embed {str_tokens[int(name.split('@')[1])].strip()!r}"
    return name


def _row_label(order: float, graph: nx.DiGraph) -> str:
    if order < 0:
        return "embed"
    layer = int(order)
    if any(d["kind"] == "logits" and d["layer"] == layer for _, d in graph.nodes(data=True)):
        return "logits"
    return f"L{layer} MLP" if order != layer else f"L{layer}"


def graph_figure(placed: GraphLayout, title: str = "Attribution graph") -> go.Figure:
    """The layout drawn with plotly: edges by signed weight, labelled nodes by effect, hover with promoted tokens.

    Traces: one per edge sign and width step (named ``edges +`` / ``edges -``),
    ``edge hover`` (a point at each edge's middle) and ``nodes`` (one point per
    node, ``customdata`` its id).
    """
    at = {node.id: node for node in placed.nodes}
    largest = max((abs(w) for _, _, w in placed.edges), default=0.0) or 1.0
    fig = go.Figure()
    buckets: dict[tuple[bool, int], list[tuple[str, str]]] = defaultdict(list)
    for sender, receiver, weight in placed.edges:
        level = min(WIDTH_LEVELS - 1, int(abs(weight) / largest * WIDTH_LEVELS))
        buckets[weight > 0, level].append((sender, receiver))
    for (positive, level), pairs in sorted(buckets.items()):
        xs, ys = [], []
        for sender, receiver in pairs:
            xs += [at[sender].x, at[receiver].x, None]
            ys += [at[sender].y, at[receiver].y, None]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", name="edges +" if positive else "edges -", hoverinfo="skip",
            showlegend=False, line={"width": 0.6 + 1.6 * level, "color": POSITIVE if positive else NEGATIVE},
            opacity=0.35 + 0.1 * level,
        ))  # fmt: skip
    label = lambda id: html.escape(at[id].label, quote=False)
    fig.add_trace(go.Scatter(
        x=[(at[u].x + at[v].x) / 2 for u, v, _ in placed.edges], y=[(at[u].y + at[v].y) / 2 for u, v, _ in placed.edges],
        mode="markers", name="edge hover", marker={"size": 6, "opacity": 0}, showlegend=False, hoverinfo="text",
        hovertext=[f"{label(u)} → {label(v)}<br>weight {w:+.3g}" for u, v, w in placed.edges],
    ))  # fmt: skip
    effects = [abs(n.effect) for n in placed.nodes if n.kind != "logits"]
    top = max(effects, default=0.0) or 1.0
    fig.add_trace(go.Scatter(
        x=[n.x for n in placed.nodes], y=[n.y for n in placed.nodes], mode="markers+text", name="nodes",
        text=[label(n.id) for n in placed.nodes], textfont={"size": 10},
        textposition=_text_positions(placed.nodes),
        customdata=[n.id for n in placed.nodes], hoverinfo="text",
        hovertext=[_hover(n, placed.columns) for n in placed.nodes], showlegend=False,
        marker={
            "size": [22 if n.kind == "logits" else 8 + 16 * abs(n.effect) / top for n in placed.nodes],
            "color": [NEUTRAL if n.kind == "logits" else POSITIVE if n.effect > 0 else NEGATIVE for n in placed.nodes],
            "line": {"width": 1, "color": "white"},
        },
    ))  # fmt: skip
    fig.update_layout(
        template=TEMPLATE, title=title, hovermode="closest", dragmode="pan",
        height=max(MIN_HEIGHT, ROW_HEIGHT * len(placed.rows) + 170),
        margin={"l": 80, "r": 20, "t": 60, "b": 90},
        xaxis={"tickvals": [x for x, _ in placed.columns], "ticktext": [t for _, t in placed.columns],
               "title": "token position", "range": [-0.2, placed.width + 0.2], "showgrid": True,
               "gridcolor": "#f1f3f5"},
        yaxis={"tickvals": [y for y, _ in placed.rows], "ticktext": [t for _, t in placed.rows], "title": "layer",
               "range": [-0.7, len(placed.rows) - 0.1], "showgrid": True, "gridcolor": "#f1f3f5", "tickangle": 0},
    )  # fmt: skip
    return fig


def _text_positions(nodes: Sequence[PlacedNode]) -> list[str]:
    """Label above the node, or below where the previous node of its row sits one step to the left."""
    found, last = [], {}
    for node in nodes:  # by row, then x
        before = last.get(node.row)
        below = before is not None and node.x - before[0] < 1.5 and before[1] == "top center"
        found.append("bottom center" if below else "top center")
        last[node.row] = (node.x, found[-1])
    return found


def _hover(node: PlacedNode, columns: Sequence[tuple[float, str]]) -> str:
    """The node's label, effect, the columns it writes at most and (from the last position) its promoted tokens."""
    lines = [f"<b>{html.escape(node.label, quote=False)}</b>", f"effect {node.effect:+.3g}"]
    where = sorted(((abs(v), c, v) for c, v in enumerate(node.positions) if v), reverse=True)[:3]
    if where and node.kind != "logits":
        lines.append("writes at " + ", ".join(f"{columns[c][1]} ({v:+.2g})" for _, c, v in where))
    if node.top_tokens and (node.kind != "embed" or node.column == len(columns) - 1):
        tokens = ", ".join(f"{token_label(str(row[1]))} {row[2]:.1f}" for row in node.top_tokens[:5])
        lines.append(("logits: " if node.kind == "logits" else "promotes: ") + tokens)
    return "<br>".join(lines)
