"""Dynamics: token norms across depth, SSM regimes, mixers across architectures, the RNN phase portrait.

Every figure is the ``.figure()`` of a Result: the analyses of the prompt
(:func:`analyses`: ``TokenTrajectories``, ``MixerComparison`` of the chosen
layer, and on an RNN ``TrajectoryPCA``) come from one ``dl.run`` per new prompt
(one forward) through ``backend.page_results``; the weight-only ones
(``MambaRegimes``, ``FixedPoints``) are computed once per model; each compared
model runs its own ``MixerComparison`` on the same token ids, joined with
``MixerComparisonResult.join``. This page only lays them out.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.dashboard import backend
from dynalens.dashboard.compare import MainPanel
from dynalens.dashboard.components import (
    Figure,
    card,
    hint,
    message_line,
    message_id,
    page,
    panel,
    placeholder_figure,
    requested,
    show_errors,
    status_id,
    status_row,
)
from dynalens.dashboard.prefill import PageCallbacks
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.probes.analysis import Analysis

import dynalens as dl

dash.register_page(__name__, path="/dynamics", name="Dynamics", title="dynalens · Dynamics", order=5)

# Component ids of this page.
TRAJECTORIES = "dynamics-trajectories"
REGIMES = "dynamics-regimes"
REGIME_TABLE = "dynamics-regime-table"
MIXERS = "dynamics-mixers"
COMPARE = "dynamics-compare"
MIXER_LAYER = "dynamics-mixer-layer"
PHASE = "dynamics-phase"

_EMPTY = placeholder_figure()

PAGE = PageCallbacks(__name__)

MAIN = MainPanel(
    PAGE, "Token norm trajectories", selections={MIXER_LAYER: 0, COMPARE: ""},
    analysis=lambda model, chosen: dl.probes.TokenTrajectories(),
    figure=lambda found, chosen: found.figure(),
)

TRAJECTORIES_FIGURE = Figure(TRAJECTORIES, "Each token's residual norm across depth appears here once a prompt is "
                                           "analysed.")
REGIMES_FIGURE = Figure(REGIMES, "The token-dynamics regime of each SSM layer appears here for a Mamba, Mamba-2 "
                                 "or hybrid model.")
MIXERS_FIGURE = Figure(MIXERS, "The chosen layer's mixer matrices appear here once a prompt is analysed; name "
                               "more models above to compare them on the same tokens.")
PHASE_FIGURE = Figure(PHASE, "The phase portrait of an RNN's last layer appears here: pick an RNN model "
                             "(lstm-hmm, gru-hmm) and a prompt of two or more tokens.")



@PAGE.page_layout
@MAIN.page_layout
def layout(**_: Any) -> html.Div:
    """The page for a URL's query (``router`` builds it on the page's first visit)."""
    return page(
        "dynamics",
        html.Div(
            className="grid-2",
            children=[
                panel("Token norm trajectories", TRAJECTORIES_FIGURE),
                card("Token-dynamics regime per layer", message_line(REGIMES), html.Div(id=REGIME_TABLE),
                     REGIMES_FIGURE.layout(height=360)),
            ],
        ),
        panel(
            "Mixer matrices across architectures (same prompt)", MIXERS_FIGURE,
            controls=[
                dcc.Input(id=COMPARE, type="text", debounce=True, style={"width": "320px"},
                          placeholder="also compare: model names or paths, comma-separated"),
                dcc.Input(id=MIXER_LAYER, type="number", min=0, step=1, value=0, debounce=True,
                          style={"width": "70px"}),
            ],
        ),
        panel("RNN phase portrait", PHASE_FIGURE, height=460),
    )


def analyses(model: Any, layer: int = 0, n_tokens: int = 2) -> list[Analysis]:
    """The page's analyses of one prompt on ``model``: trajectories, the mixer of ``layer``, and on an RNN
    the phase portrait of its last layer (from 2 tokens: two principal components)."""
    found = [dl.probes.TokenTrajectories(), dl.probes.MixerComparison(layer=layer)]
    if architecture_of(model) == "rnn" and n_tokens >= 2:
        found.append(dl.probes.TrajectoryPCA(layer=model.cfg.n_layers - 1, fixed_points=fixed_points(model)))
    return found


def fixed_points(model: Any) -> Analysis:
    """The fixed points of an RNN's last layer under zero input (weights only)."""
    return dl.probes.FixedPoints(layer=model.cfg.n_layers - 1, n_starts=16)


def _results(request: dict, layer: Any) -> tuple[Any, Prompts, backend.PageResults]:
    """The model, the prompt and the Results of :func:`analyses` (one forward for those not cached yet)."""
    model, prompts = requested(request)
    layer = int(layer) if isinstance(layer, (int, float)) and 0 <= layer < model.cfg.n_layers else 0
    found = analyses(model, layer, int(prompts.lengths[0]))
    return model, prompts, backend.page_results(request["model"], model, prompts, found)


@PAGE.callback(
    Output(TRAJECTORIES, "figure"),
    TRAJECTORIES_FIGURE.source,
    Output(status_id("dynamics"), "children"),
    Output(message_id(TRAJECTORIES), "children"),
    PAGE.request,
    State(MIXER_LAYER, "value"),
)
@show_errors(_EMPTY, None, None)
def trajectories_panel(request, layer):
    model, prompts, results = _results(request, layer)
    found = results["token_trajectories"]
    n = int(prompts.lengths[0])
    status = status_row(request["model"], architecture_of(model), n)
    growing = int((found.growth[0][-n:] > 0).sum())
    text = f"{growing} of {n} tokens grow across depth (slope of log-norm > 0)."
    offer = TRAJECTORIES_FIGURE.offer(results.key("token_trajectories"), "token_trajectories")
    return found.figure(), offer, status, hint(text)


@PAGE.callback(
    Output(REGIMES, "figure"),
    REGIMES_FIGURE.source,
    Output(REGIME_TABLE, "children"),
    Output(message_id(REGIMES), "children"),
    PAGE.request,
)
@show_errors(_EMPTY, None, None)
def regimes_panel(request):
    if not request:
        raise PreventUpdate
    model = backend.load_model(request["model"])
    if architecture_of(model) not in dl.probes.MambaRegimes.architectures:
        return _EMPTY, None, None, hint("The regime criterion reads a selective SSM's B, C and step-size projections: "
                                        "pick a Mamba, Mamba-2 or hybrid model.")  # fmt: skip
    results = backend.page_results(request["model"], model, None, [dl.probes.MambaRegimes()])
    found = results["mamba_regimes"]
    frame = found.to_frame()
    columns = ["layer", "regime", "layer_type", "sym_max", "sym_min", "convergent_channels", "mean_delta0"]
    table = html.Table(
        [html.Tr([html.Th(c) for c in columns])]
        + [html.Tr([html.Td(_cell(row[c])) for c in columns]) for _, row in frame.iterrows()],
        id=f"{REGIME_TABLE}-rows",
    )
    return found.figure(), REGIMES_FIGURE.offer(results.key("mamba_regimes"), "mamba_regimes"), table, None


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@PAGE.callback(
    Output(MIXERS, "figure"),
    MIXERS_FIGURE.source,
    Output(message_id(MIXERS), "children"),
    PAGE.request,
    Input(COMPARE, "value"),
    Input(MIXER_LAYER, "value"),
)
@show_errors(_EMPTY, None)
def mixers_panel(request, compare, layer):
    if not request:
        raise PreventUpdate
    names = [request["model"]] + [n.strip() for n in (compare or "").split(",") if n.strip()]
    models = {name: backend.load_model(name) for name in dict.fromkeys(names)}
    _, prompts = requested(request)
    layer = int(layer or 0)
    shallowest = min(m.cfg.n_layers for m in models.values())
    if not 0 <= layer < shallowest:
        return _EMPTY, None, hint(f"Layer {layer} does not exist in every model: pick 0 to {shallowest - 1}.")
    ids, n = prompts.tokens.cpu(), int(prompts.lengths[0])  # every model reads the same token ids
    compare = dl.probes.MixerComparison(layer=layer)
    each = {  # the header's model: the page's run; each compared model: its own run of the comparison
        name: backend.page_results(name, model, Prompts(model, ids),
                                   analyses(model, layer, n) if name == names[0] else [compare])[compare]
        for name, model in models.items()
    }  # fmt: skip
    key = (request["model"], prompts, "mixer_comparison_join", {"models": [backend.model_id(n) for n in models],
                                                               "layer": layer})  # fmt: skip
    found = backend.cached(*key, lambda: dl.probes.MixerComparisonResult.join(each))
    frame = found.to_frame().groupby("model", sort=False).agg(
        effective_rank=("effective_rank", "mean"), offdiagonal_rank=("offdiagonal_rank", "max"), bound=("bound", "max")
    )
    text = "; ".join(
        f"{name}: mean effective rank {row.effective_rank:.2f}, off-diagonal rank {int(row.offdiagonal_rank)}"
        + ("" if row.bound != row.bound or row.bound is None else f" (state bound {int(row.bound)})")
        for name, row in frame.iterrows()
    )
    return found.figure(), MIXERS_FIGURE.offer(backend.cached_key(*key), f"mixer_comparison_L{layer}"), hint(text + ".")


@PAGE.callback(
    Output(PHASE, "figure"),
    PHASE_FIGURE.source,
    Output(message_id(PHASE), "children"),
    PAGE.request,
    State(MIXER_LAYER, "value"),
)
@show_errors(_EMPTY, None)
def phase_panel(request, mixer_layer):
    model, prompts = requested(request)
    if architecture_of(model) != "rnn":
        return _EMPTY, None, hint("The phase portrait iterates an RNN cell: pick an RNN model (lstm-hmm, gru-hmm).")
    if int(prompts.lengths[0]) < 2:
        return _EMPTY, None, hint("The phase portrait needs at least two tokens: type a longer prompt.")
    layer = model.cfg.n_layers - 1
    points = backend.page_results(request["model"], model, None, [fixed_points(model)])["fixed_points"]
    results = _results(request, mixer_layer)[2]
    found = results["trajectory_pca"]
    stable = int((points.spectral_radius < 1).sum())
    text = (f"Layer {layer}: {len(points.kinds)} fixed/slow point(s) under zero input, {stable} stable "
            f"(Jacobian eigenvalues inside the unit circle); PCs explain {float(found.explained.sum()):.0%}.")
    return found.figure(), PHASE_FIGURE.offer(results.key("trajectory_pca"), "trajectory_pca"), hint(text)
