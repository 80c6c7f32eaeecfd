"""Explorer: a prompt's tokens, one layer's mixer matrix, residual norms, the logit lens.

Selecting a token (a click on the token strip or on a heatmap column) moves
the logit lens to that position and outlines it in every heatmap. The three
panels are the Results of :func:`analyses` (``ResidualNorms``, ``LogitLens``,
``MixerMatrix``), computed with one ``dl.run`` per new prompt (one forward)
through ``backend.page_results``; this page only draws them. A layer change
computes the new layer's mixer matrix alone.

Each panel reads the header's request itself, so a visit asks for the status,
the token strip and the three panels at once (one round of requests); the
selected token is kept with the prompt it belongs to and is the last token
until one is clicked.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import ALL, Input, Output, State, callback, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

import dynalens as dl
from dynalens.dashboard import backend
from dynalens.dashboard.compare import MainPanel
from dynalens.dashboard.components import (
    Figure,
    card,
    clicked_column,
    labelled,
    placeholder_figure,
    show_errors,
    status_row,
    token_strip,
)
from dynalens.dashboard.prefill import PageCallbacks
from dynalens.models.surface import architecture_of
from dynalens.probes.analysis import Analysis

dash.register_page(__name__, path="/", name="Explorer", title="dynalens · Explorer", order=0)

TOP_K = 5

# Component ids of this page.
STATUS = "explorer-status"
PROMPT_STORE = "explorer-prompt"
POSITION = "explorer-position"
TOKEN = "explorer-token"
TOKENS = "explorer-tokens"
LAYER = "explorer-layer"
GROUP = "explorer-group"
GROUP_LABEL = "explorer-group-label"
MIXER = "explorer-mixer"
MIXER_LOG = "explorer-mixer-log"
MIXER_MESSAGE = "explorer-mixer-message"
RESID = "explorer-resid"
RESID_LOG = "explorer-resid-log"
RESID_MESSAGE = "explorer-resid-message"
LENS = "explorer-lens"
LENS_VIEW = "explorer-lens-view"
LENS_MESSAGE = "explorer-lens-message"

GROUP_NAMES = {"transformer": "Head", "mamba": "Channels", "mamba2": "Head", "hybrid": "Head", "rnn": "Group"}
"""What one mixer matrix of a layer is, per architecture (the group dropdown's label)."""

_EMPTY = placeholder_figure()

PAGE = PageCallbacks(__name__)

MAIN = MainPanel(
    PAGE, "Logit lens (top 1 at every token)",
    selections={LAYER: None, LENS_VIEW: "position", MIXER_LOG: [], RESID_LOG: ["log"]},
    analysis=lambda model, chosen: dl.probes.LogitLens(k=TOP_K),
    figure=lambda lens, chosen: lens.figure(position=None),
)

MIXER_FIGURE = Figure(MIXER, "The chosen layer's mixer matrix appears here once a prompt is analysed.")
LENS_FIGURE = Figure(LENS, "The logit lens at the selected token appears here once a prompt is analysed.")
RESID_FIGURE = Figure(RESID, "The residual-stream norm of every token and layer appears here once a prompt is "
                             "analysed.")



@PAGE.page_layout
@MAIN.page_layout
def layout(**_: Any) -> html.Div:
    """The page for a URL's query (``router`` builds it on the page's first visit)."""
    return html.Div(
        className="explorer",
        children=[
            dcc.Store(id=PROMPT_STORE),
            dcc.Store(id=POSITION),
            dcc.Loading(
                html.Div(id=STATUS, className="status"),
                custom_spinner=html.Div("Loading the model and reading the prompt…",
                                        className="status-progress"),
                delay_show=300,
            ),
            card(
                "Tokens",
                html.Div(id=TOKENS, className="token-strip"),
                controls=[html.Span("click a token to select it everywhere", className="hint")],
            ),
            html.Div(
                className="grid-2",
                children=[
                    card(
                        "Mixer matrix",
                        html.Div(id=MIXER_MESSAGE, className="panel-message"),
                        MIXER_FIGURE.layout(height=460),
                        controls=[
                            labelled("Layer", dcc.Dropdown(id=LAYER, clearable=False,
                                                           className="small-dropdown")),
                            labelled("Head", dcc.Dropdown(id=GROUP, clearable=False,
                                                          className="small-dropdown"),
                                     label_id=GROUP_LABEL),
                            _log_toggle(MIXER_LOG),
                        ],
                    ),
                    card(
                        "Logit lens",
                        html.Div(id=LENS_MESSAGE, className="panel-message"),
                        LENS_FIGURE.layout(height=460),
                        controls=[
                            dcc.RadioItems(
                                id=LENS_VIEW,
                                options=[
                                    {"label": f"top {TOP_K} at selected token", "value": "position"},
                                    {"label": "top 1 at every token", "value": "all"},
                                ],
                                value="position",
                                className="inline-check",
                                inline=True,
                            )
                        ],
                    ),
                ],
            ),
            card(
                "Residual-stream norm",
                html.Div(id=RESID_MESSAGE, className="panel-message"),
                RESID_FIGURE.layout(height=420),
                controls=[_log_toggle(RESID_LOG, on=True)],  # sink tokens dwarf the rest
            ),
        ],
    )


def _log_toggle(id: str, on: bool = False) -> dcc.Checklist:
    return dcc.Checklist(id=id, options=[{"label": " log colour", "value": "log"}],
                         value=["log"] if on else [], className="inline-check")


def analyses(layer: int) -> list[Analysis]:
    """The page's analyses of one prompt: residual norms, the logit lens, ``layer``'s mixer matrix."""
    return [dl.probes.ResidualNorms(), dl.probes.LogitLens(k=TOP_K), dl.probes.MixerMatrix(layer=layer)]


def _layer(model: Any, layer: Any) -> int:
    """The chosen layer when it exists in ``model``, else its last one."""
    n_layers = model.cfg.n_layers
    return layer if isinstance(layer, int) and 0 <= layer < n_layers else n_layers - 1


def _selected(request: dict, position: dict | None, n_tokens: int) -> int:
    """The selected token: the one last clicked on this request's prompt, else the last token."""
    if position and position.get("prompt") == _prompt_of(request) and 0 <= position["index"] < n_tokens:
        return position["index"]
    return n_tokens - 1


def _prompt_of(request: dict) -> dict:
    """What a selected position belongs to: the request's model and prompt."""
    return {"model": request["model"], "prompt": request["prompt"]}


def _panel_inputs(request: dict | None, layer: Any) -> tuple[Any, Any, int, backend.PageResults] | None:
    """The model, prompt, layer and the Results of :func:`analyses` for a panel; None before a request or when
    the model or the prompt cannot be read (the status line shows why)."""
    if not request:
        raise PreventUpdate
    try:
        model, prompts = backend.model_and_prompts(request)
    except backend.DashboardError:
        return None
    layer = _layer(model, layer)
    return model, prompts, layer, backend.page_results(request["model"], model, prompts, analyses(layer))


# ----------------------------------------------------------------- callbacks
# Every panel reads the request itself (no chain through a prompt store), so a
# page visit asks for all of them at once; the first to run pays the forward.
@PAGE.callback(
    Output(PROMPT_STORE, "data"),
    Output(TOKENS, "children"),
    Output(GROUP_LABEL, "children"),
    Output(STATUS, "children"),
    PAGE.request,
    State(LAYER, "value"),
)
@show_errors(None, [], "Head")
def prepare(request: dict | None, layer: int | None):
    """Load the model, tokenise the prompt and run the page's analyses: the token strip and the status."""
    if not request:
        raise PreventUpdate
    model, prompts = backend.model_and_prompts(request)
    n_layers = model.cfg.n_layers
    try:  # the one forward of this prompt; the panels read its Results
        backend.page_results(request["model"], model, prompts, analyses(_layer(model, layer)))
    except backend.DashboardError:
        pass  # each panel shows the error where its figure would be
    ids, str_tokens, architecture = prompts.tokens[0].tolist(), prompts.str_tokens[0], architecture_of(model)
    prompt = {
        "model": request["model"],
        "tokens": ids,
        "str_tokens": str_tokens,
        "architecture": architecture,
        "n_layers": n_layers,
        "run": request.get("run"),
    }
    status = status_row(request["model"], architecture, len(ids), n_layers)
    strip = token_strip(str_tokens, len(ids) - 1, TOKEN)
    return prompt, strip, GROUP_NAMES[architecture], status


@callback(
    Output(POSITION, "data"),
    Input({"type": TOKEN, "index": ALL}, "n_clicks"),
    Input(RESID, "clickData"),
    Input(MIXER, "clickData"),
    Input(LENS, "clickData"),
    State(PAGE.request_id, "data"),
    State(PROMPT_STORE, "data"),
    State(LENS_VIEW, "value"),
    prevent_initial_call=True,
)
def select_position(_clicks, resid_click, mixer_click, lens_click, request, prompt, lens_view):
    """The token last clicked (a token button or a heatmap column), with the prompt it belongs to."""
    if not request or not prompt:
        raise PreventUpdate
    trigger = ctx.triggered_id
    if isinstance(trigger, dict):  # a token button; n_clicks 0 means it was just drawn
        if not ctx.triggered[0]["value"]:
            raise PreventUpdate
        column = trigger["index"]
    elif trigger == LENS and lens_view != "all":
        raise PreventUpdate  # the per-position view's columns are ranks, not tokens
    else:
        column = clicked_column({RESID: resid_click, MIXER: mixer_click, LENS: lens_click}.get(trigger))
    if column is None or not 0 <= column < len(prompt["tokens"]):
        raise PreventUpdate
    return {"prompt": _prompt_of(request), "index": column}


@callback(
    Output({"type": TOKEN, "index": ALL}, "className"),
    Input(POSITION, "data"),
    State({"type": TOKEN, "index": ALL}, "id"),
    prevent_initial_call=True,
)
def mark_selected_token(position, ids):
    index = (position or {}).get("index")
    return ["token selected" if i["index"] == index else "token" for i in ids]


@PAGE.callback(
    Output(RESID, "figure"),
    RESID_FIGURE.source,
    Output(RESID_MESSAGE, "children"),
    PAGE.request,
    Input(POSITION, "data"),
    Input(RESID_LOG, "value"),
    State(LAYER, "value"),
)
@show_errors(_EMPTY, None)
def residual_panel(request, position, log_colour, layer):
    found = _panel_inputs(request, layer)
    if found is None:
        return _EMPTY, None, None
    _, prompts, _, results = found
    offer = RESID_FIGURE.offer(results.key("residual_norms"), "residual_norms")
    selected = _selected(request, position, int(prompts.lengths[0]))
    return results["residual_norms"].figure(log="log" in (log_colour or []), position=selected), offer, None


@PAGE.callback(
    Output(LENS, "figure"),
    LENS_FIGURE.source,
    Output(LENS_MESSAGE, "children"),
    PAGE.request,
    Input(POSITION, "data"),
    Input(LENS_VIEW, "value"),
    State(LAYER, "value"),
)
@show_errors(_EMPTY, None)
def logit_lens_panel(request, position, view, layer):
    found = _panel_inputs(request, layer)
    if found is None:
        return _EMPTY, None, None
    _, prompts, _, results = found
    offer = LENS_FIGURE.offer(results.key("logit_lens"), "logit_lens")
    selected = _selected(request, position, int(prompts.lengths[0]))
    return results["logit_lens"].figure(position=selected if view == "position" else None), offer, None


@PAGE.callback(
    Output(MIXER, "figure"),
    MIXER_FIGURE.source,
    Output(LAYER, "options"),
    Output(LAYER, "value"),
    Output(GROUP, "options"),
    Output(GROUP, "value"),
    Output(MIXER_MESSAGE, "children"),
    PAGE.request,
    Input(LAYER, "value"),
    Input(GROUP, "value"),
    Input(POSITION, "data"),
    Input(MIXER_LOG, "value"),
)
@show_errors(_EMPTY, None, no_update, no_update, [], None)
def mixer_panel(request, layer, group, position, log_colour):
    found = _panel_inputs(request, layer)
    if found is None:
        return _EMPTY, None, no_update, no_update, [], None, None
    model, prompts, layer, results = found
    layers = [{"label": f"layer {i}", "value": i} for i in range(model.cfg.n_layers)]
    mixer = results["mixer_matrix"]
    labels = mixer.group_labels
    group = group if isinstance(group, int) and 0 <= group < len(labels) else 0
    options = [{"label": label, "value": i} for i, label in enumerate(labels)]
    selected = _selected(request, position, int(prompts.lengths[0]))
    figure = mixer.figure(group=group, position=selected, log="log" in (log_colour or []))
    offer = MIXER_FIGURE.offer(results.key("mixer_matrix"), f"mixer_matrix_L{layer}")
    return figure, offer, layers, layer, options, group, None
