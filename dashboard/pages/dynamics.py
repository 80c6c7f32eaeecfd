"""Dynamics: token norms across depth, Mamba regimes, mixers across architectures, the RNN phase portrait.

Every figure is the ``.figure()`` of a result from ``dynalens.probes``
(:class:`~dynalens.probes.token_dynamics.TokenTrajectories`,
:class:`~dynalens.probes.token_dynamics.MambaRegimes`,
:class:`~dynalens.probes.mixers.MixerComparison`,
:class:`~dynalens.probes.fixed_points.TrajectoryPCA`), fetched through the
results cache; this page only lays them out.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.dashboard import backend
from dynalens.dashboard.components import (
    card,
    graph,
    hint,
    message_id,
    page,
    panel,
    placeholder_figure,
    requested,
    show_errors,
    status_id,
    status_row,
)
from dynalens.dashboard.layout import REQUEST
from dynalens.probes.fixed_points import FixedPoints, TrajectoryPCA
from dynalens.probes.mixers import MixerComparison
from dynalens.probes.token_dynamics import MambaRegimes, TokenTrajectories

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


def layout(**_: Any) -> html.Div:
    """The page (Dash calls it on every visit)."""
    return page(
        "dynamics",
        html.Div(
            className="grid-2",
            children=[
                panel("Token norm trajectories", TRAJECTORIES),
                card("Token-dynamics regime per layer", html.Div(id=REGIME_TABLE), graph(REGIMES, height=360)),
            ],
        ),
        panel(
            "Mixer matrices across architectures (same prompt)", MIXERS,
            controls=[
                dcc.Input(id=COMPARE, type="text", debounce=True, style={"width": "320px"},
                          placeholder="also compare: model names or paths, comma-separated"),
                dcc.Input(id=MIXER_LAYER, type="number", min=0, step=1, value=0, debounce=True,
                          style={"width": "70px"}),
            ],
        ),
        panel("RNN phase portrait", PHASE, height=460),
    )


@callback(
    Output(TRAJECTORIES, "figure"),
    Output(status_id("dynamics"), "children"),
    Output(message_id(TRAJECTORIES), "children"),
    Input(REQUEST, "data"),
)
@show_errors(_EMPTY, None)
def trajectories_panel(request):
    model, tokens = requested(request)
    found = backend.cached_result(
        TokenTrajectories, request["model"], tokens[0].tolist(), "token_trajectories", {},
        lambda: dl.probes.token_trajectories(model, tokens),
    )
    status = status_row(request["model"], found.architecture, len(found.str_tokens))
    growing = int((found.growth > 0).sum())
    text = f"{growing} of {len(found.str_tokens)} tokens grow across depth (slope of log-norm > 0)."
    return found.figure(), status, hint(text)


@callback(
    Output(REGIMES, "figure"),
    Output(REGIME_TABLE, "children"),
    Input(REQUEST, "data"),
)
@show_errors(_EMPTY)
def regimes_panel(request):
    if not request:
        raise PreventUpdate
    model = backend.load_model(request["model"])
    if model.cfg.architecture != "mamba":
        return _EMPTY, hint("The regime criterion reads a selective SSM's x_proj: pick a Mamba model.")
    found = backend.cached_result(
        MambaRegimes, request["model"], [], "mamba_regimes", {}, lambda: dl.probes.mamba_regimes(model)
    )
    frame = found.to_frame()
    columns = ["layer", "regime", "sym_max", "sym_min", "convergent_channels", "mean_delta0"]
    table = html.Table(
        [html.Tr([html.Th(c) for c in columns])]
        + [html.Tr([html.Td(_cell(row[c])) for c in columns]) for _, row in frame.iterrows()],
        id=f"{REGIME_TABLE}-rows",
    )
    return found.figure(), table


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@callback(
    Output(MIXERS, "figure"),
    Output(message_id(MIXERS), "children"),
    Input(REQUEST, "data"),
    Input(COMPARE, "value"),
    Input(MIXER_LAYER, "value"),
)
@show_errors(_EMPTY)
def mixers_panel(request, compare, layer):
    if not request:
        raise PreventUpdate
    names = [request["model"]] + [n.strip() for n in (compare or "").split(",") if n.strip()]
    models = {name: backend.load_model(name) for name in dict.fromkeys(names)}
    _, tokens = requested(request)
    layer = int(layer or 0)
    shallowest = min(m.cfg.n_layers for m in models.values())
    if not 0 <= layer < shallowest:
        return _EMPTY, hint(f"Layer {layer} does not exist in every model: pick 0 to {shallowest - 1}.")
    found = backend.cached_result(
        MixerComparison, request["model"], tokens[0].tolist(), "compare_mixers",
        {"models": list(models), "layer": layer},
        lambda: dl.probes.compare_mixers(models, tokens, layer),
    )  # fmt: skip
    frame = found.to_frame().groupby("model", sort=False).agg(
        effective_rank=("effective_rank", "mean"), offdiagonal_rank=("offdiagonal_rank", "max"), bound=("bound", "max")
    )
    text = "; ".join(
        f"{name}: mean effective rank {row.effective_rank:.2f}, off-diagonal rank {int(row.offdiagonal_rank)}"
        + ("" if row.bound != row.bound or row.bound is None else f" (state bound {int(row.bound)})")
        for name, row in frame.iterrows()
    )
    return found.figure(), hint(text + ".")


@callback(
    Output(PHASE, "figure"),
    Output(message_id(PHASE), "children"),
    Input(REQUEST, "data"),
)
@show_errors(_EMPTY)
def phase_panel(request):
    model, tokens = requested(request)
    if model.cfg.architecture != "rnn":
        return _EMPTY, hint("The phase portrait iterates an RNN cell: pick an RNN model (lstm-hmm, gru-hmm).")
    if tokens.shape[1] < 2:
        return _EMPTY, hint("The phase portrait needs at least two tokens.")
    layer = model.cfg.n_layers - 1
    points = backend.cached_result(
        FixedPoints, request["model"], [], "find_fixed_points", {"layer": layer},
        lambda: dl.probes.find_fixed_points(model, layer, n_starts=16),
    )
    found = backend.cached_result(
        TrajectoryPCA, request["model"], tokens[0].tolist(), "trajectory_pca", {"layer": layer},
        lambda: dl.probes.trajectory_pca(model, tokens, layer, fixed_points=points),
    )
    stable = int((points.spectral_radius < 1).sum())
    text = (f"Layer {layer}: {len(points.kinds)} fixed/slow point(s) under zero input, {stable} stable "
            f"(Jacobian eigenvalues inside the unit circle); PCs explain {float(found.explained.sum()):.0%}.")
    return found.figure(), hint(text)
