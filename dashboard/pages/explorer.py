"""Explorer: a prompt's tokens, one layer's mixer matrix, residual norms, the logit lens.

Selecting a token (a click on the token strip or on a heatmap column) moves
the logit lens to that position and outlines it in every heatmap. The three
panels are the Results of :func:`analyses` (``ResidualNorms``, ``LogitLens``,
``MixerMatrix``), computed with one ``dl.run`` per new prompt (one forward)
through ``backend.page_results``; this page only draws them. A layer change
computes the new layer's mixer matrix alone.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import ALL, Input, Output, State, callback, ctx, dcc, html
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
from dynalens.dashboard.layout import REQUEST
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

GROUP_NAMES = {"transformer": "Head", "mamba": "Channels", "rnn": "Group"}
"""What one mixer matrix of a layer is, per architecture (the group dropdown's label)."""

_EMPTY = placeholder_figure()

MAIN = MainPanel(
    __name__, "Logit lens (top 1 at every token)",
    selections={LAYER: None, LENS_VIEW: "position", MIXER_LOG: [], RESID_LOG: ["log"]},
    analysis=lambda model, chosen: dl.probes.LogitLens(k=TOP_K),
    figure=lambda lens, chosen: lens.figure(position=None),
)

MIXER_FIGURE = Figure(MIXER, "The chosen layer's mixer matrix appears here once a prompt is analysed.")
LENS_FIGURE = Figure(LENS, "The logit lens at the selected token appears here once a prompt is analysed.")
RESID_FIGURE = Figure(RESID, "The residual-stream norm of every token and layer appears here once a prompt is "
                             "analysed.")



@MAIN.page_layout
def layout(**_: Any) -> html.Div:
    """The page (Dash calls it on every visit)."""
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


def _results(prompt: dict, layer: int) -> backend.PageResults:
    """The Results of :func:`analyses` on the stored prompt (one forward for those not cached yet)."""
    model = backend.load_model(prompt["model"])
    return backend.page_results(prompt["model"], model, backend.prompts_of(model, prompt["tokens"]), analyses(layer))


# ----------------------------------------------------------------- callbacks
@callback(
    Output(PROMPT_STORE, "data"),
    Output(TOKENS, "children"),
    Output(LAYER, "options"),
    Output(LAYER, "value"),
    Output(GROUP_LABEL, "children"),
    Output(STATUS, "children"),
    Input(REQUEST, "data"),
    State(LAYER, "value"),
)
@show_errors(None, [], [], None, "Head")
def prepare(request: dict | None, layer: int | None):
    """Load the model, tokenise the prompt and run the page's analyses; the panels listen to the store."""
    if not request:
        raise PreventUpdate
    model, prompts = backend.model_and_prompts(request)
    n_layers = model.cfg.n_layers
    layer = layer if isinstance(layer, int) and 0 <= layer < n_layers else n_layers - 1
    try:  # the one forward of this prompt; the panels read its Results
        backend.page_results(request["model"], model, prompts, analyses(layer))
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
    options = [{"label": f"layer {i}", "value": i} for i in range(n_layers)]
    strip = token_strip(str_tokens, len(ids) - 1, TOKEN)
    return prompt, strip, options, layer, GROUP_NAMES[architecture], status


@callback(
    Output(POSITION, "data"),
    Input({"type": TOKEN, "index": ALL}, "n_clicks"),
    Input(RESID, "clickData"),
    Input(MIXER, "clickData"),
    Input(LENS, "clickData"),
    Input(PROMPT_STORE, "data"),
    State(LENS_VIEW, "value"),
)
def select_position(_clicks, resid_click, mixer_click, lens_click, prompt, lens_view):
    """The selected token: the last one for a new prompt, else the one last clicked."""
    if not prompt:
        return None
    n = len(prompt["tokens"])
    trigger = ctx.triggered_id
    if f"{PROMPT_STORE}.data" in ctx.triggered_prop_ids or trigger is None:
        return n - 1
    if isinstance(trigger, dict):  # a token button; n_clicks 0 means it was just drawn
        if not ctx.triggered[0]["value"]:
            raise PreventUpdate
        return trigger["index"]
    if trigger == LENS and lens_view != "all":
        raise PreventUpdate  # the per-position view's columns are ranks, not tokens
    column = clicked_column({RESID: resid_click, MIXER: mixer_click, LENS: lens_click}[trigger])
    if column is None or not 0 <= column < n:
        raise PreventUpdate
    return column


@callback(
    Output({"type": TOKEN, "index": ALL}, "className"),
    Input(POSITION, "data"),
    State({"type": TOKEN, "index": ALL}, "id"),
)
def mark_selected_token(position, ids):
    return ["token selected" if i["index"] == position else "token" for i in ids]


@callback(
    Output(RESID, "figure"),
    RESID_FIGURE.source,
    Output(RESID_MESSAGE, "children"),
    Input(PROMPT_STORE, "data"),
    Input(POSITION, "data"),
    Input(RESID_LOG, "value"),
    State(LAYER, "value"),
)
@show_errors(_EMPTY, None)
def residual_panel(prompt, position, log_colour, layer):
    if not prompt or layer is None:
        return _EMPTY, None, None
    results = _results(prompt, layer)
    offer = RESID_FIGURE.offer(results.key("residual_norms"), "residual_norms")
    return results["residual_norms"].figure(log="log" in (log_colour or []), position=position), offer, None


@callback(
    Output(LENS, "figure"),
    LENS_FIGURE.source,
    Output(LENS_MESSAGE, "children"),
    Input(PROMPT_STORE, "data"),
    Input(POSITION, "data"),
    Input(LENS_VIEW, "value"),
    State(LAYER, "value"),
)
@show_errors(_EMPTY, None)
def logit_lens_panel(prompt, position, view, layer):
    if not prompt or position is None or layer is None:
        return _EMPTY, None, None
    results = _results(prompt, layer)
    offer = LENS_FIGURE.offer(results.key("logit_lens"), "logit_lens")
    return results["logit_lens"].figure(position=position if view == "position" else None), offer, None


@callback(
    Output(MIXER, "figure"),
    MIXER_FIGURE.source,
    Output(GROUP, "options"),
    Output(GROUP, "value"),
    Output(MIXER_MESSAGE, "children"),
    Input(PROMPT_STORE, "data"),
    Input(LAYER, "value"),
    Input(GROUP, "value"),
    Input(POSITION, "data"),
    Input(MIXER_LOG, "value"),
)
@show_errors(_EMPTY, None, [], None)
def mixer_panel(prompt, layer, group, position, log_colour):
    if not prompt or layer is None:
        return _EMPTY, None, [], None, None
    results = _results(prompt, layer)
    mixer = results["mixer_matrix"]
    labels = mixer.group_labels
    group = group if isinstance(group, int) and 0 <= group < len(labels) else 0
    options = [{"label": label, "value": i} for i, label in enumerate(labels)]
    figure = mixer.figure(group=group, position=position, log="log" in (log_colour or []))
    return figure, MIXER_FIGURE.offer(results.key("mixer_matrix"), f"mixer_matrix_L{layer}"), options, group, None
