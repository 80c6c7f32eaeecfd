"""Activations: massive activations per layer and channel, attention sinks per head, their emergence over training.

Every figure is the ``.figure()`` of a result from ``dynalens.probes``
(:class:`~dynalens.probes.massive.MassiveActivations`,
:class:`~dynalens.probes.sinks.ExtremeTokens`,
:class:`~dynalens.probes.emergence.MassiveEmergence`), fetched through the
results cache; this page only lays them out.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html
from dash.exceptions import PreventUpdate

import dynalens as dl
from dynalens.dashboard import backend
from dynalens.dashboard.components import card, graph, hint, placeholder_figure, show_errors, status_row
from dynalens.dashboard.layout import REQUEST
from dynalens.probes.emergence import MassiveEmergence, checkpoint_series
from dynalens.probes.massive import MassiveActivations
from dynalens.probes.sinks import ExtremeTokens

dash.register_page(__name__, path="/activations", name="Activations", title="dynalens · Activations", order=4)

# Component ids of this page.
STATUS = "activations-status"
MAP = "activations-map"
MAP_VIEW = "activations-map-view"
SITE = "activations-site"
MAP_MESSAGE = "activations-map-message"
SINKS = "activations-sinks"
SINKS_MESSAGE = "activations-sinks-message"
EMERGENCE = "activations-emergence"
SERIES = "activations-series"
EMERGENCE_MESSAGE = "activations-emergence-message"

_EMPTY = placeholder_figure()


def layout(**_: Any) -> html.Div:
    """The page (Dash calls it on every visit)."""
    return html.Div(
        className="activations",
        children=[
            dcc.Loading(html.Div(id=STATUS, className="status"), type="dot", delay_show=300, color="#2563eb"),
            card(
                "Massive activations",
                html.Div(id=MAP_MESSAGE),
                graph(MAP, height=460),
                controls=[
                    dcc.RadioItems(
                        id=MAP_VIEW,
                        options=[{"label": "layer × channel", "value": "map"},
                                 {"label": "top and median per layer", "value": "layers"}],
                        value="map", inline=True, className="inline-check",
                    ),
                    dcc.RadioItems(
                        id=SITE,
                        options=[{"label": "residual stream", "value": "resid"},
                                 {"label": "recurrent state", "value": "state"}],
                        value="resid", inline=True, className="inline-check",
                    ),
                ],
            ),  # fmt: skip
            html.Div(
                className="grid-2",
                children=[
                    card("Attention sinks", html.Div(id=SINKS_MESSAGE), graph(SINKS, height=420)),
                    card(
                        "Emergence over training",
                        html.Div(id=EMERGENCE_MESSAGE),
                        graph(EMERGENCE, height=420),
                        controls=[
                            dcc.Input(id=SERIES, type="text", debounce=True, style={"width": "300px"},
                                      placeholder="checkpoints: the model's own, or a run folder")
                        ],
                    ),  # fmt: skip
                ],
            ),
        ],
    )


@callback(
    Output(MAP, "figure"),
    Output(STATUS, "children"),
    Output(MAP_MESSAGE, "children"),
    Input(REQUEST, "data"),
    Input(MAP_VIEW, "value"),
    Input(SITE, "value"),
)
@show_errors(_EMPTY, None)
def massive_panel(request, view, site):
    if not request:
        raise PreventUpdate
    model, tokens = backend.model_and_tokens(request)
    found = backend.cached_result(
        MassiveActivations, request["model"], tokens[0].tolist(), "massive_activations", {"site": site},
        lambda: dl.probes.massive_activations(model, tokens, site=site),
    )  # fmt: skip
    status = status_row(request["model"], found.architecture, len(found.str_tokens), model.cfg.n_layers)
    carriers = found.carriers()
    if carriers.empty:
        text = (f"No massive activation (|h| > {found.min_magnitude:g} and ≥ {found.min_ratio:g}× the median); "
                f"largest ratio to the median: {found.layers()['ratio'].max():.0f}×.")  # fmt: skip
    else:
        where = "; ".join(
            f"token {row.position} {row.token!r}, channel {row.channel} ({row.n_layers} layers, "
            f"up to {row.max_magnitude:.0f})"
            for row in carriers.head(4).itertuples()
        )
        text = f"Massive activations found: {where}."
    return found.figure(kind=view), status, hint(text)


@callback(
    Output(SINKS, "figure"),
    Output(SINKS_MESSAGE, "children"),
    Input(REQUEST, "data"),
)
@show_errors(_EMPTY)
def sinks_panel(request):
    if not request:
        raise PreventUpdate
    model, tokens = backend.model_and_tokens(request)
    if model.cfg.architecture != "transformer":
        return _EMPTY, hint("Attention sinks need attention heads: this model has none. "
                             "Its residual-state peaks show in the panel above.")  # fmt: skip
    if tokens.shape[1] < 2:
        return _EMPTY, hint("Sink scores need at least two tokens.")
    found = backend.cached_result(
        ExtremeTokens, request["model"], tokens[0].tolist(), "extreme_tokens", {},
        lambda: dl.probes.extreme_tokens(model, tokens),
    )
    heads = ", ".join(f"L{layer}H{head}" for layer, head in found.sink_heads()) or "none"
    return found.figure(kind="sinks"), hint(f"Sink heads (score > {found.threshold:g}): {heads}.")


@callback(
    Output(EMERGENCE, "figure"),
    Output(EMERGENCE_MESSAGE, "children"),
    Input(REQUEST, "data"),
    Input(SERIES, "value"),
)
@show_errors(_EMPTY)
def emergence_panel(request, series):
    if not request:
        raise PreventUpdate
    source = (series or "").strip() or request["model"]
    try:
        steps = [step for step, _ in checkpoint_series(source)]
    except (FileNotFoundError, KeyError):
        return _EMPTY, hint(f"{source!r} has no checkpoint series: type the folder of a training run "
                             "(with checkpoints/step_*) or pick a zoo model.")  # fmt: skip
    _, tokens = backend.model_and_tokens(request)
    found = backend.cached_result(
        MassiveEmergence, source, tokens[0].tolist(), "massive_emergence", {"steps": steps},
        lambda: dl.probes.massive_emergence(source, tokens, progress=False),
    )
    best = found.fits().dropna().sort_values("r2", ascending=False)
    text = (f"{len(steps)} checkpoints; best fit {best.iloc[0]['layer']} R² = {best.iloc[0]['r2']:.3f}"
            if len(best) else f"{len(steps)} checkpoints; no layer could be fitted")  # fmt: skip
    return found.figure(), hint(text + ".")
