"""Circuit: the attribution graph between heads and MLPs for a clean/corrupt prompt pair.

The graph is the Result of the :class:`~dynalens.circuits.AttributionGraph`
experiment (edge attribution patching, one backward pass) under the logit
difference of two tokens at the last position
(:func:`dynalens.circuits.logit_diff_metric`), through the results cache,
drawn with dash-cytoscape: node size by the node's own attribution, edge width
and colour by the edge's attribution (blue helps the clean answer, red hurts
it), pruned by the slider. Clicking a node lists the tokens its output
promotes, which the Result holds per node (no further pass). The defaults
follow the model: an IOI pair for a model with a tokenizer, a repeated-sequence
pair for the synthetic-task zoo models. While the graph is built, a progress
bar counts its two forward passes (the backward pass is the last unit).
"""

from __future__ import annotations

from typing import Any

import dash
import dash_cytoscape as cyto
import networkx as nx
from dash import Input, Output, State, callback, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.dashboard import backend
from dynalens.dashboard.backend import DashboardError
from dynalens.dashboard.components import (
    SPINNER,
    ProgressBar,
    card,
    hint,
    labelled,
    page,
    show_errors,
    status_id,
    status_row,
)
from dynalens.dashboard.layout import REQUEST

import dynalens as dl

dash.register_page(__name__, path="/circuit", name="Circuit", title="dynalens · Circuit", order=7)

# Component ids of this page.
CLEAN = "circuit-clean"
CORRUPT = "circuit-corrupt"
CORRECT = "circuit-correct"
WRONG = "circuit-wrong"
BUILD = "circuit-build"
THRESHOLD = "circuit-threshold"
GRAPH = "circuit-graph"
GRAPH_DATA = "circuit-graph-data"
DEFAULTS_FOR = "circuit-defaults-for"
MESSAGE = "circuit-message"
NODE = "circuit-node"

PROGRESS = ProgressBar("circuit")

HALF_LEN = 16
"""Repeat length of the default repeated-sequence pair (shorter when the model's context is)."""

KEEP = 0.01
"""Edges below this fraction of the largest |weight| are dropped before the graph reaches the browser."""

TOP_TOKENS = 10
"""Promoted tokens listed for a clicked node."""

IOI = (
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the store, Mary gave a drink to",
    " Mary",
    " John",
)
"""The default pair for models with a tokenizer: indirect object identification."""


def layout(**_: Any) -> html.Div:
    """The page (Dash calls it on every visit)."""
    text = {"type": "text", "debounce": True, "className": "text-input"}
    controls = html.Div(
        className="circuit-controls",
        children=[
            labelled("Clean", dcc.Input(id=CLEAN, **text)),
            labelled("Corrupt", dcc.Input(id=CORRUPT, **text)),
            labelled("Answer", dcc.Input(id=CORRECT, **text)),
            labelled("vs", dcc.Input(id=WRONG, **text)),
            html.Button("Build graph", id=BUILD, className="primary-button", n_clicks=0),
        ],
    )
    slider = labelled(
        "Prune below", dcc.Slider(id=THRESHOLD, min=KEEP, max=0.5, step=0.01, value=0.1,
                                  marks={KEEP: "1%", 0.1: "10%", 0.25: "25%", 0.5: "50%"}),
    )  # fmt: skip
    stylesheet = [
        {"selector": "node", "style": {
            "label": "data(label)", "width": "data(size)", "height": "data(size)", "background-color": "data(color)",
            "font-size": 10, "text-valign": "center", "color": "#111827"}},
        {"selector": "edge", "style": {
            "width": "data(width)", "line-color": "data(color)", "target-arrow-color": "data(color)",
            "target-arrow-shape": "triangle", "curve-style": "bezier", "opacity": 0.7}},
        {"selector": ":selected", "style": {"border-width": 3, "border-color": "#111827"}},
    ]  # fmt: skip
    return page(
        "circuit",
        card(
            "Attribution graph", controls, slider, html.Div(id=MESSAGE), PROGRESS.layout(),
            dcc.Loading(cyto.Cytoscape(id=GRAPH, elements=[], layout={"name": "preset"}, stylesheet=stylesheet,
                                       style={"height": "560px", "width": "100%"}), **SPINNER),
        ),  # fmt: skip
        card("Node", html.Div(hint("Click a node to see the tokens its output promotes."), id=NODE)),
        dcc.Store(id=GRAPH_DATA),
        dcc.Store(id=DEFAULTS_FOR),
    )


def default_pair(model: Any) -> tuple[str, str, str, str]:
    """Clean and corrupt prompts and the two tokens whose logit difference is the metric."""
    if getattr(model, "tokenizer", None) is not None:
        return IOI
    half = min(HALF_LEN, ((model.cfg.n_ctx or 2 * HALF_LEN + 1) - 1) // 2)
    first, other = dl.circuits.repeated_tokens(model, half_len=half, n_sequences=2, seed=0).tolist()
    corrupt = first[:1] + other[1 : half + 1] + first[half + 1 : 2 * half]  # first repeat replaced
    wrong = next(t for t in other[1 : half + 1] if t not in first)
    text = lambda ids: " ".join(map(str, ids))
    return text(first[: 2 * half]), text(corrupt), str(first[2 * half]), str(wrong)


def _model(request: dict | None) -> Any:
    """The header's model; the page has prompts of its own."""
    if not request:
        raise PreventUpdate
    return backend.load_model(request["model"])


def _one_token(model: Any, text: str, what: str) -> int:
    if not text:
        raise DashboardError(f"The {what} token is empty: type one token.")
    ids = backend.encode_prompt(model, text).tokens[0].tolist()
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    ids = [i for i in ids if i != bos] if len(ids) > 1 else ids
    if len(ids) != 1:
        raise DashboardError(f"The {what} token {text!r} is {len(ids)} tokens; the metric compares single tokens.")
    return ids[0]


@callback(
    Output(CLEAN, "value"),
    Output(CORRUPT, "value"),
    Output(CORRECT, "value"),
    Output(WRONG, "value"),
    Output(DEFAULTS_FOR, "data"),
    Input(REQUEST, "data"),
    State(DEFAULTS_FOR, "data"),
)
def defaults(request, defaults_for):
    """Fill in the model's default pair when the chosen model changes."""
    if request and request["model"] == defaults_for:
        raise PreventUpdate
    model = _model(request)
    return (*default_pair(model), request["model"])


@callback(
    Output(GRAPH_DATA, "data"),
    Output(status_id("circuit"), "children"),
    Output(MESSAGE, "children"),
    Input(BUILD, "n_clicks"),
    Input(DEFAULTS_FOR, "data"),
    State(REQUEST, "data"),
    State(CLEAN, "value"),
    State(CORRUPT, "value"),
    State(CORRECT, "value"),
    State(WRONG, "value"),
    PROGRESS.key,
    **backend.background(PROGRESS),
)
@show_errors(None, None)
def build(_, defaults_for, request, clean, corrupt, correct, wrong, progress_key):
    """The attribution graph of the pair, as node-link JSON (edges below ``KEEP`` dropped)."""
    model = _model(request)
    if model.cfg.architecture != "transformer":
        raise DashboardError("The attribution graph needs attention heads: pick a transformer.")
    clean_prompts = backend.encode_prompt(model, clean or "")
    corrupt_prompts = backend.encode_prompt(model, corrupt or "")
    n_clean, n_corrupt = int(clean_prompts.lengths[0]), int(corrupt_prompts.lengths[0])
    if n_clean != n_corrupt:
        raise DashboardError(
            f"The clean prompt is {n_clean} tokens and the corrupt one {n_corrupt}: "
            "patching needs prompts of the same length."
        )
    correct_id, wrong_id = _one_token(model, correct, "answer"), _one_token(model, wrong, "other")
    metric = dl.circuits.logit_diff_metric(correct_id, wrong_id)
    analysis = dl.circuits.AttributionGraph(corrupt_prompts, metric, threshold=KEEP, k=TOP_TOKENS)
    params = {**analysis.get_params(), "metric": ["logit_diff", correct_id, wrong_id, -1]}  # the metric by value
    with backend.reporting(progress_key) as report:
        report.step("Attribution graph: clean and corrupt forward passes, then one backward pass",
                    size=2 * len(clean_prompts) + 1)  # fmt: skip
        found = backend.cached(
            request["model"], clean_prompts, "attribution_graph", params,
            backend.counting_sequences(model, report, lambda: analysis(model, clean_prompts)),
        )  # fmt: skip
    status = status_row(request["model"], model.cfg.architecture, n_clean, model.cfg.n_layers)
    graph = found.graph
    text = (f"Logit difference {graph.graph['clean_metric']:.2f} (clean) vs {graph.graph['corrupt_metric']:.2f} "
            f"(corrupt); {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges above {KEEP:.0%}.")  # fmt: skip
    return nx.node_link_data(graph, edges="edges"), status, hint(text)


def elements(graph: nx.DiGraph, n_heads: int) -> list[dict[str, Any]]:
    """Cytoscape elements: nodes placed by layer (rows) and head (columns), sized and coloured by effect."""
    effects = [abs(e) for n, e in graph.nodes(data="effect") if graph.nodes[n]["kind"] != "logits"] or [1.0]
    weights = [abs(w) for _, _, w in graph.edges(data="weight")] or [1.0]
    top_effect, top_weight = max(max(effects), 1e-12), max(max(weights), 1e-12)
    color = lambda v: "#2563eb" if v >= 0 else "#dc2626"
    found = []
    for name, data in graph.nodes(data=True):
        kind, layer = data["kind"], data["layer"]
        column = {"head": data.get("head") or 0, "mlp": n_heads, "embed": n_heads / 2, "logits": n_heads / 2}[kind]
        row = {"mlp": layer + 0.5}.get(kind, layer)
        size = 46 if kind == "logits" else 14 + 36 * abs(data["effect"]) / top_effect
        found.append({
            "data": {"id": name, "label": name, "size": size, "effect": data["effect"],
                     "color": "#6b7280" if kind == "logits" else color(data["effect"])},
            "position": {"x": 80 * column, "y": -110 * row},
        })  # fmt: skip
    for u, v, w in graph.edges(data="weight"):
        found.append({"data": {"source": u, "target": v, "weight": w, "color": color(w),
                               "width": 0.5 + 7.5 * abs(w) / top_weight}})  # fmt: skip
    return found


@callback(
    Output(GRAPH, "elements"),
    Input(GRAPH_DATA, "data"),
    Input(THRESHOLD, "value"),
    State(REQUEST, "data"),
)
def draw(data, threshold, request):
    """The stored graph pruned at the slider's threshold."""
    if not data:
        return []
    model = _model(request)
    graph = dl.circuits.prune(_graph(data), float(threshold or 0.0))
    return elements(graph, model.cfg.n_heads)


def _graph(data: dict) -> nx.DiGraph:
    """The attribution graph that :func:`build` stored as node-link JSON."""
    return nx.node_link_graph(data, directed=True, edges="edges")


@callback(
    Output(NODE, "children"),
    Input(GRAPH, "tapNodeData"),
    State(GRAPH_DATA, "data"),
)
@show_errors()
def node_tokens(node, data):
    """The tokens the clicked node's output promotes at the last clean position (held by the graph)."""
    if not node or not data:
        raise PreventUpdate
    graph = _graph(data)
    if node["id"] not in graph:
        raise PreventUpdate  # a node of a graph built before
    top = graph.nodes[node["id"]]["top_tokens"]  # [token_id, token, logit] rows, largest first
    rows = [html.Tr([html.Td(repr(token)), html.Td(f"{logit:.2f}")]) for _, token, logit in top]
    return html.Div([
        hint(f"{node['id']} (attribution {node.get('effect', 0.0):+.3f}): top promoted tokens at the last position"),
        html.Table([html.Thead(html.Tr([html.Th("token"), html.Th("logit")])), html.Tbody(rows)],
                   className="top-tokens", id="circuit-top-tokens"),
    ])  # fmt: skip
