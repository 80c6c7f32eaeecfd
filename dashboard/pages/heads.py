"""Heads: every head's induction, previous-token, copying and sink score; a clicked head's pattern on the prompt.

The score grid is the ``.figure()`` of the ``HeadScores`` Result on repeated
random tokens (the standard workload, one forward), or of the weight-only
``CopyingScores`` (OV circuits, transformers); the pattern is the
``.figure()`` of the ``MixerMatrix`` Result of the clicked head's layer
(channel group on Mamba) on the prompt (:func:`analyses`, one forward per
new prompt and layer). Both come through ``backend.page_results``. While the
scores are computed, a progress bar counts the sequences read.
"""

from __future__ import annotations

import weakref
from typing import Any

import dash
from dash import Input, Output, html
from dynalens.dashboard import backend
from dynalens.dashboard.compare import MainPanel
from dynalens.dashboard.components import (
    Figure,
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
from dynalens.dashboard.prefill import PageCallbacks
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.probes.analysis import Analysis

import dynalens as dl

dash.register_page(__name__, path="/heads", name="Heads", title="dynalens · Heads", order=6)

# Component ids of this page.
GRID = "heads-grid"
KIND = "heads-kind"
PATTERN = "heads-pattern"

HALF_LEN = 20
"""Length of each repeat of the random-token workload (shorter when the model's context is)."""

KINDS = ("induction", "prev_token", "copying", "sink")
"""The scores the grid can show: ``copying`` from ``CopyingScores``, the others from ``HeadScores``."""

SCORES_PROGRESS = ProgressBar(GRID)

GRID_FIGURE = Figure(GRID, "Every head's score (layer × head) appears here once a model with attention heads or "
                           "a materialised mixer (Mamba) is analysed.")
PATTERN_FIGURE = Figure(PATTERN, "A head's pattern on the prompt appears here: click a cell of the score grid.")

_EMPTY = placeholder_figure()

PAGE = PageCallbacks(__name__)

MAIN = MainPanel(
    PAGE, "Head scores", selections={KIND: "induction"},
    analysis=lambda model, chosen: dl.circuits.CopyingScores() if chosen[KIND] == "copying"
    else dl.circuits.HeadScores(),
    prompts=lambda model, chosen: None if chosen[KIND] == "copying" else workload(model),
    figure=lambda scores, chosen: scores.figure() if chosen[KIND] == "copying" else scores.figure(kind=chosen[KIND]),
)  # fmt: skip


@PAGE.page_layout
@MAIN.page_layout
def layout(**_: Any) -> html.Div:
    """The page for a URL's query (``router`` builds it on the page's first visit)."""
    return page(
        "heads",
        html.Div(
            className="grid-2",
            children=[
                panel(
                    "Head scores", GRID_FIGURE, height=520,
                    controls=[choice(KIND, {k: k.replace("_", "-") for k in KINDS}, "induction")],
                    progress=SCORES_PROGRESS,
                ),
                panel("Pattern on the prompt", PATTERN_FIGURE, height=520),
            ],
        ),
    )


def analyses(layer: int) -> list[Analysis]:
    """The page's analyses of the prompt: the mixer matrix of the shown head's layer."""
    return [dl.probes.MixerMatrix(layer=layer)]


def workload(model: Any) -> Prompts:
    """The head-score workload: repeated random tokens (``HALF_LEN`` per repeat, fewer for a short context).

    Drawn once per loaded model (sampling them sorts the vocabulary: tens of ms on SmolLM2) and kept while the
    model is.
    """
    if model not in _workloads:
        half_len = min(HALF_LEN, ((model.cfg.n_ctx or 2 * HALF_LEN + 1) - 1) // 2)
        _workloads[model] = Prompts(model, dl.circuits.repeated_tokens(model, half_len=half_len))
    return _workloads[model]


_workloads: weakref.WeakKeyDictionary[Any, Prompts] = weakref.WeakKeyDictionary()


def _scores(request: dict, model: Any, report: backend.ProgressReport | None = None) -> backend.PageResults:
    """The head scores on the workload (``["head_scores"]``); ``report`` counts the sequences read meanwhile."""
    prompts = workload(model)
    if report is not None:
        n = len(prompts)
        report.step(f"{'Mixer matrices' if architecture_of(model) == 'mamba' else 'Attention patterns'} "
                    f"of {n} repeated sequences", size=n)  # fmt: skip
    return backend.page_results(request["model"], model, prompts, [dl.circuits.HeadScores()], report)


def _copying(request: dict, model: Any) -> backend.PageResults:
    """The OV copying scores (weights only; ``["copying_scores"]``)."""
    return backend.page_results(request["model"], model, None, [dl.circuits.CopyingScores()])


@PAGE.callback(
    Output(GRID, "figure"),
    GRID_FIGURE.source,
    Output(status_id("heads"), "children"),
    Output(message_id(GRID), "children"),
    PAGE.request,
    Input(KIND, "value"),
    progress=SCORES_PROGRESS,
)
@show_errors(_EMPTY, None, None)
def scores_panel(request, kind, progress_key):
    model, prompts = requested(request)
    status = status_row(request["model"], architecture_of(model), int(prompts.lengths[0]), model.cfg.n_layers)
    if architecture_of(model) == "rnn":
        return _EMPTY, None, status, hint("Head scores need attention heads or a materialised mixer (Mamba): "
                                          "pick a transformer or a Mamba model.")  # fmt: skip
    name = "copying_scores" if kind == "copying" else "head_scores"
    with backend.reporting(progress_key) as report:
        if kind == "copying":
            report.step("Copying scores from the OV circuits")
            results = _copying(request, model)
            best = results[name].top(1).iloc[0]
        else:
            results = _scores(request, model, report)
            best = results[name].top(1, by=kind).iloc[0]
    figure = results[name].figure() if kind == "copying" else results[name].figure(kind=kind)
    head = f"L{int(best['layer'])}H{int(best['head'])}"
    text = f"Top {kind.replace('_', '-')} head: {head} ({best[kind]:.2f}). Click a cell."
    return figure, GRID_FIGURE.offer(results.key(name), name), status, hint(text)


@PAGE.callback(
    Output(PATTERN, "figure"),
    PATTERN_FIGURE.source,
    Output(message_id(PATTERN), "children"),
    PAGE.request,
    Input(GRID, "clickData"),
)
@show_errors(_EMPTY, None)
def pattern_panel(request, click):
    model, prompts = requested(request)
    if architecture_of(model) == "rnn":
        return _EMPTY, None, hint("This model has no heads: its mixers show on the Dynamics page.")
    if click and click.get("points"):  # the grid's cells sit at integer x (head) and y (layer)
        layer, head = int(click["points"][0]["y"]), int(click["points"][0]["x"])
    else:  # the top induction head until a cell is clicked
        best = _scores(request, model)["head_scores"].top(1).iloc[0]
        layer, head = int(best["layer"]), int(best["head"])
    results = backend.page_results(request["model"], model, prompts, analyses(layer))
    mixer = results["mixer_matrix"]
    head = min(head, len(mixer.group_labels) - 1)
    offer = PATTERN_FIGURE.offer(results.key("mixer_matrix"), f"mixer_matrix_L{layer}")
    return mixer.figure(group=head), offer, hint(f"L{layer} {mixer.group_labels[head]} on the prompt.")
