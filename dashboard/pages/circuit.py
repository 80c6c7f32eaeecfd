"""Circuit: the attribution graph between heads and MLPs for a clean/corrupt prompt pair.

The graph is the Result of the :class:`~dynalens.circuits.AttributionGraph`
experiment (edge attribution patching, one backward pass) under the logit
difference of two tokens at the last position
(:func:`dynalens.circuits.logit_diff_metric`), through the results cache,
drawn as layer (rows) × token position (columns) by
:mod:`dynalens.circuits.graph_layout`: labelled nodes (``L12H3``, ``MLP 7``,
``embed 'Mary'``, ``logits``) sized and coloured by their attribution, edges
by theirs (red helps the clean answer, blue hurts it), only the strongest
edges (the slider; the title names the threshold). Hovering a node shows its
effect, where it writes and the tokens its output promotes; clicking it lists
them. The drawn graph exports as node-link JSON and as PNG or SVG; the Result
as CSV (its edges) or as its file. The defaults follow the model: an IOI pair
for a model with a tokenizer, a repeated-sequence pair for the synthetic-task
zoo models. While the graph is built, a progress bar counts its two forward
passes (the backward pass is the last unit).
"""

from __future__ import annotations

import json
from typing import Any

import dash
import networkx as nx
from dash import Input, Output, State, callback, clientside_callback, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.circuits.graph_layout import GraphLayout, graph_figure, layout_graph
from dynalens.dashboard import backend
from dynalens.dashboard.backend import DashboardError
from dynalens.dashboard.components import (
    Figure,
    ProgressBar,
    card,
    hint,
    labelled,
    page,
    placeholder_figure,
    show_errors,
    status_id,
    status_row,
)
from dynalens.dashboard.prefill import PageCallbacks

import dynalens as dl

dash.register_page(__name__, path="/circuit", name="Circuit", title="dynalens · Circuit", order=7)

# Component ids of this page.
CLEAN = "circuit-clean"
CORRUPT = "circuit-corrupt"
CORRECT = "circuit-correct"
WRONG = "circuit-wrong"
BUILD = "circuit-build"
EDGES = "circuit-edges"
GRAPH = "circuit-graph"
GRAPH_DATA = "circuit-graph-data"
DEFAULTS_FOR = "circuit-defaults-for"
MESSAGE = "circuit-message"
NODE = "circuit-node"
EXPORT_JSON, EXPORT_PNG, EXPORT_SVG = "circuit-export-json", "circuit-export-png", "circuit-export-svg"
JSON_DOWNLOAD = "circuit-json-download"

PROGRESS = ProgressBar("circuit")

GRAPH_FIGURE = Figure(GRAPH, "The attribution graph appears here: give a clean and a corrupt prompt of the same "
                             "length and the two answer tokens, then press Build graph (it needs a transformer).")

HALF_LEN = 16
"""Repeat length of the default repeated-sequence pair (shorter when the model's context is)."""

KEEP = 0.01
"""Edges below this fraction of the largest |weight| are dropped before the graph reaches the browser."""

TOP_TOKENS = 10
"""Promoted tokens kept per node (the hover shows five, a click lists them all)."""

MAX_EDGES, DEFAULT_EDGES = 300, 60
"""The most edges the slider draws, and how many it draws first (a 30-layer model's graph stays readable)."""

IOI = (
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the store, Mary gave a drink to",
    " Mary",
    " John",
)
"""The default pair for models with a tokenizer: indirect object identification."""

_EMPTY = placeholder_figure()

PAGE = PageCallbacks(__name__)


@PAGE.page_layout
def layout(**_: Any) -> html.Div:
    """The page for a URL's query (``router`` builds it on the page's first visit)."""
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
        "Strongest edges", dcc.Slider(id=EDGES, min=10, max=MAX_EDGES, step=10, value=DEFAULT_EDGES,
                                      marks={v: str(v) for v in (10, DEFAULT_EDGES, 150, MAX_EDGES)}),
    )  # fmt: skip
    export = html.Div(
        className="circuit-export",
        children=[
            html.Span("Export the drawn graph", className="control-label"),
            html.Button("JSON", id=EXPORT_JSON, className="download-button", n_clicks=0,
                        title="The drawn nodes (label, place, effect, promoted tokens) and edges, node-link JSON"),
            html.Button("PNG", id=EXPORT_PNG, className="download-button", n_clicks=0),
            html.Button("SVG", id=EXPORT_SVG, className="download-button", n_clicks=0),
            dcc.Download(id=JSON_DOWNLOAD),
        ],
    )  # fmt: skip
    return page(
        "circuit",
        card(
            "Attribution graph (layer × token position)", controls, slider,
            html.Div(id=MESSAGE, className="panel-message"), PROGRESS.layout(), GRAPH_FIGURE.layout(height=None),
            controls=[export],
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


@PAGE.callback(
    Output(CLEAN, "value"),
    Output(CORRUPT, "value"),
    Output(CORRECT, "value"),
    Output(WRONG, "value"),
    Output(DEFAULTS_FOR, "data"),
    PAGE.request,
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
    GRAPH_FIGURE.source,
    Output(status_id("circuit"), "children"),
    Output(MESSAGE, "children"),
    Input(BUILD, "n_clicks"),
    Input(DEFAULTS_FOR, "data"),
    State(PAGE.request_id, "data"),
    State(CLEAN, "value"),
    State(CORRUPT, "value"),
    State(CORRECT, "value"),
    State(WRONG, "value"),
    PROGRESS.key,
    **backend.background(PROGRESS),
)
@show_errors(None, None, None)
def build(_, defaults_for, request, clean, corrupt, correct, wrong, progress_key):
    """The attribution graph of the pair (edges below ``KEEP`` dropped) with its column tokens; its Result's key."""
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
    key = (request["model"], clean_prompts, "attribution_graph", params)
    with backend.reporting(progress_key) as report:
        report.step("Attribution graph: clean and corrupt forward passes, then one backward pass",
                    size=2 * len(clean_prompts) + 1)  # fmt: skip
        found = backend.cached(*key, backend.counting_sequences(model, report, lambda: analysis(model, clean_prompts)))
    status = status_row(request["model"], model.cfg.architecture, n_clean, model.cfg.n_layers)
    graph = found.graph
    text = (f"Logit difference {graph.graph['clean_metric']:.2f} (clean) vs {graph.graph['corrupt_metric']:.2f} "
            f"(corrupt); {graph.number_of_nodes()} nodes and {graph.number_of_edges()} edges above {KEEP:.0%} "
            "of the largest.")  # fmt: skip
    data = {"graph": nx.node_link_data(graph, edges="edges"), "tokens": found.column_tokens(),
            "model": found.model_name}  # fmt: skip
    return data, GRAPH_FIGURE.offer(backend.cached_key(*key), "attribution_graph"), status, hint(text)


def placed_graph(data: dict, max_edges: int | None) -> GraphLayout:
    """The stored graph laid out with its ``max_edges`` strongest edges."""
    graph = nx.node_link_graph(data["graph"], directed=True, edges="edges")
    edges = int(max_edges) if isinstance(max_edges, (int, float)) and max_edges >= 1 else DEFAULT_EDGES
    return layout_graph(graph, data["tokens"], max_edges=edges)


@callback(
    Output(GRAPH, "figure"),
    Input(GRAPH_DATA, "data"),
    Input(EDGES, "value"),
)
def draw(data, max_edges):
    """The stored graph as layer × token position, pruned to the slider's strongest edges."""
    if not data:
        return _EMPTY
    placed = placed_graph(data, max_edges)
    shown = (f"{len(placed.edges)} strongest of {placed.n_edges} edges (|weight| > {placed.threshold:.1%} of the "
             "largest)" if placed.threshold else f"all {placed.n_edges} edges")  # fmt: skip
    title = f"{shown}, {len(placed.nodes)} nodes · {data['model']}"
    return graph_figure(placed, title=title)


@callback(
    Output(JSON_DOWNLOAD, "data"),
    Input(EXPORT_JSON, "n_clicks"),
    State(GRAPH_DATA, "data"),
    State(EDGES, "value"),
    prevent_initial_call=True,
)
def export_json(_, data, max_edges):
    """The drawn graph (nodes with label, place, effect and promoted tokens; edges) as node-link JSON."""
    if not data:
        raise PreventUpdate
    placed = placed_graph(data, max_edges)
    return dcc.send_string(json.dumps(placed.to_node_link(), indent=1), "attribution_graph.json")


for _button, _format in ((EXPORT_PNG, "png"), (EXPORT_SVG, "svg")):
    clientside_callback(
        f"""(n) => {{
            const plot = document.querySelector('#{GRAPH} .js-plotly-plot');
            if (n && plot && window.Plotly) {{
                window.Plotly.downloadImage(plot, {{format: '{_format}', filename: 'attribution_graph',
                                                    width: plot.offsetWidth, height: plot.offsetHeight}});
            }}
            return window.dash_clientside.no_update;
        }}""",
        Output(_button, "title"),
        Input(_button, "n_clicks"),
        prevent_initial_call=True,
    )


@callback(
    Output(NODE, "children"),
    Input(GRAPH, "clickData"),
    State(GRAPH_DATA, "data"),
)
@show_errors()
def node_tokens(click, data):
    """The tokens the clicked node's output promotes at the last clean position (held by the graph)."""
    points = [p for p in (click or {}).get("points", []) if isinstance(p.get("customdata"), str)]
    if not points or not data:
        raise PreventUpdate
    graph = nx.node_link_graph(data["graph"], directed=True, edges="edges")
    name = points[0]["customdata"].split("@")[0]  # one token's embedding: the embedding's tokens
    if name not in graph:
        raise PreventUpdate  # a node of a graph built before
    node = graph.nodes[name]
    rows = [html.Tr([html.Td(repr(token)), html.Td(f"{logit:.2f}")]) for _, token, logit in node["top_tokens"]]
    return html.Div([
        hint(f"{name} (attribution {node['effect']:+.3f}): top promoted tokens at the last position"),
        html.Table([html.Thead(html.Tr([html.Th("token"), html.Th("logit")])), html.Tbody(rows)],
                   className="top-tokens", id="circuit-top-tokens"),
    ])  # fmt: skip
