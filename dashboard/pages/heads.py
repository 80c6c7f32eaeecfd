"""Heads: every head's induction, previous-token, copying and sink score; a clicked head's pattern on the prompt.

The score grid is the ``.figure()`` of :class:`~dynalens.circuits.HeadScores`
(on repeated random tokens, the standard workload); the pattern is the
``.figure()`` of :class:`~dynalens.probes.mixer.MixerMatrices` for the clicked
head (channel group on Mamba) on the prompt. Both come through the results cache.
While the scores are computed, a progress bar counts the sequences read.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, html
from dynalens.circuits import HeadScores
from dynalens.circuits.heads import SCORES
from dynalens.dashboard import backend
from dynalens.dashboard.components import (
    ProgressBar,
    choice,
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
from dynalens.probes.mixer import MixerMatrices

import dynalens as dl

dash.register_page(__name__, path="/heads", name="Heads", title="dynalens · Heads", order=6)

# Component ids of this page.
GRID = "heads-grid"
KIND = "heads-kind"
PATTERN = "heads-pattern"

HALF_LEN = 20
"""Length of each repeat of the random-token workload (shorter when the model's context is)."""

SCORES_PROGRESS = ProgressBar(GRID)

_EMPTY = placeholder_figure()


def layout(**_: Any) -> html.Div:
    """The page (Dash calls it on every visit)."""
    return page(
        "heads",
        html.Div(
            className="grid-2",
            children=[
                panel(
                    "Head scores", GRID, height=520,
                    controls=[choice(KIND, {k: k.replace("_", "-") for k in SCORES}, "induction")],
                    progress=SCORES_PROGRESS,
                ),
                panel("Pattern on the prompt", PATTERN, height=520),
            ],
        ),
    )


def _scores(request: dict, model: Any, report: backend.ProgressReport | None = None) -> HeadScores:
    """The head scores on the random-token workload; ``report`` counts the sequences read while they are computed."""
    half_len = min(HALF_LEN, ((model.cfg.n_ctx or 2 * HALF_LEN + 1) - 1) // 2)
    tokens = dl.circuits.repeated_tokens(model, half_len=half_len)
    compute = lambda: dl.circuits.induction_scores(model, tokens)
    if report is not None:
        n = tokens.shape[0]
        if model.cfg.architecture == "mamba":  # one pass per sequence and layer to materialise its mixer
            report.step(f"Mixer matrices of {n} repeated sequences × {model.cfg.n_layers} layers",
                        size=n * model.cfg.n_layers)  # fmt: skip
        else:
            report.step(f"Attention patterns of {n} repeated sequences", size=n)
        compute = backend.counting_sequences(model, report, compute)
    return backend.cached_result(
        HeadScores, request["model"], tokens[0].tolist(), "head_scores", {"n": tokens.shape[0]}, compute
    )


@callback(
    Output(GRID, "figure"),
    Output(status_id("heads"), "children"),
    Output(message_id(GRID), "children"),
    Input(REQUEST, "data"),
    Input(KIND, "value"),
    SCORES_PROGRESS.key,
    running=SCORES_PROGRESS.running,
)
@show_errors(_EMPTY, None)
def scores_panel(request, kind, progress_key):
    model, tokens = requested(request)
    status = status_row(request["model"], model.cfg.architecture, tokens.shape[1], model.cfg.n_layers)
    if model.cfg.architecture == "rnn":
        return _EMPTY, status, hint("Head scores need attention heads or a materialised mixer (Mamba).")
    with backend.reporting(progress_key) as report:
        scores = _scores(request, model, report)
    best = scores.top(1, by=kind).iloc[0]
    text = f"Top {kind.replace('_', '-')} head: L{int(best['layer'])}H{int(best['head'])} ({best[kind]:.2f}). Click a cell."
    return scores.figure(kind=kind), status, hint(text)


@callback(
    Output(PATTERN, "figure"),
    Output(message_id(PATTERN), "children"),
    Input(REQUEST, "data"),
    Input(GRID, "clickData"),
)
@show_errors(_EMPTY)
def pattern_panel(request, click):
    model, tokens = requested(request)
    if model.cfg.architecture == "rnn":
        return _EMPTY, hint("This model has no heads.")
    if click and click.get("points"):
        layer, head = int(click["points"][0]["y"]), int(click["points"][0]["x"])
    else:  # the top induction head until a cell is clicked
        best = _scores(request, model).top(1).iloc[0]
        layer, head = int(best["layer"]), int(best["head"])
    mixer = backend.cached_result(
        MixerMatrices, request["model"], tokens[0].tolist(), "mixer_matrices", {"layer": layer},
        lambda: dl.probes.mixer_matrices(model, tokens, layer=layer),
    )
    head = min(head, mixer.matrices.shape[0] - 1)
    return mixer.figure(group=head), hint(f"L{layer} {mixer.group_labels[head]} on the prompt.")
