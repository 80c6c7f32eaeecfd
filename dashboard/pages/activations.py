"""Activations: massive activations per layer and channel, attention sinks per head, their emergence over training.

Every figure is the ``.figure()`` of a Result: the massive-activation map and
the sink scores come from :func:`analyses` (``MassiveActivations`` and
``ExtremeTokens``), computed with one ``dl.run`` per new prompt (one forward)
through ``backend.page_results``; the emergence is the ``MassiveEmergence``
experiment over a checkpoint series, or the metrics a ``dl.sweep`` store holds
per checkpoint (``sweep_view``, read without recomputing). This page only lays
them out. While the emergence loads and measures each checkpoint, its panel
shows a progress bar (one unit per checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dash
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.dashboard import backend, sweep_view
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
from dynalens.probes.emergence import checkpoint_series

import dynalens as dl

dash.register_page(__name__, path="/activations", name="Activations", title="dynalens · Activations", order=4)

# Component ids of this page.
MAP = "activations-map"
MAP_VIEW = "activations-map-view"
SITE = "activations-site"
SINKS = "activations-sinks"
EMERGENCE = "activations-emergence"
SERIES = "activations-series"

EMERGENCE_PROGRESS = ProgressBar(EMERGENCE)

MAP_FIGURE = Figure(MAP, "The largest activation of every layer and channel appears here once a prompt is analysed.")
SINKS_FIGURE = Figure(SINKS, "Each head's attention on the first token (layer × head) appears here once a prompt "
                             "of two or more tokens is analysed by a model with attention heads.")
EMERGENCE_FIGURE = Figure(EMERGENCE, "The massive-activation ratio over training appears here for a model with a "
                                     "checkpoint series: pick a zoo model or type a training run's folder above.")

_EMPTY = placeholder_figure()

PAGE = PageCallbacks(__name__)

MAIN = MainPanel(
    PAGE, "Massive activations", selections={MAP_VIEW: "map", SITE: "resid", SERIES: ""},
    analysis=lambda model, chosen: dl.probes.MassiveActivations(site=chosen[SITE]),
    figure=lambda found, chosen: found.figure(kind=chosen[MAP_VIEW]),
)


@PAGE.page_layout
@MAIN.page_layout
def layout(**_: Any) -> html.Div:
    """The page for a URL's query (``router`` builds it on the page's first visit)."""
    return page(
        "activations",
        panel(
            "Massive activations", MAP_FIGURE, height=460,
            controls=[
                choice(MAP_VIEW, {"map": "layer × channel", "layers": "top and median per layer"}, "map"),
                choice(SITE, {"resid": "residual stream", "state": "recurrent state"}, "resid"),
            ],
        ),
        html.Div(
            className="grid-2",
            children=[
                panel("Attention sinks (layer × head)", SINKS_FIGURE),
                panel(
                    "Emergence over training", EMERGENCE_FIGURE,
                    controls=[
                        dcc.Input(id=SERIES, type="text", debounce=True, style={"width": "300px"},
                                  placeholder="checkpoints: the model's own, a run folder or a sweep store")
                    ],
                    progress=EMERGENCE_PROGRESS,
                ),
            ],
        ),
    )


def analyses(site: str, n_tokens: int) -> list[Analysis]:
    """The page's analyses of one prompt: massive activations at ``site``; sinks and extreme tokens from 2 tokens."""
    return [dl.probes.MassiveActivations(site=site), *([dl.probes.ExtremeTokens()] if n_tokens >= 2 else [])]


def _results(request: dict, site: str | None) -> tuple[Any, Prompts, backend.PageResults]:
    """The model, the prompt and the Results of :func:`analyses` (one forward for those not cached yet)."""
    model, prompts = requested(request)
    found = analyses(site or "resid", int(prompts.lengths[0]))
    return model, prompts, backend.page_results(request["model"], model, prompts, found)


@PAGE.callback(
    Output(MAP, "figure"),
    MAP_FIGURE.source,
    Output(status_id("activations"), "children"),
    Output(message_id(MAP), "children"),
    PAGE.request,
    Input(MAP_VIEW, "value"),
    Input(SITE, "value"),
)
@show_errors(_EMPTY, None, None)
def massive_panel(request, view, site):
    model, prompts, results = _results(request, site)
    status = status_row(request["model"], architecture_of(model), int(prompts.lengths[0]), model.cfg.n_layers)
    found = results["massive_activations"]
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
    offer = MAP_FIGURE.offer(results.key("massive_activations"), "massive_activations")
    return found.figure(kind=view), offer, status, hint(text)


@PAGE.callback(
    Output(SINKS, "figure"),
    SINKS_FIGURE.source,
    Output(message_id(SINKS), "children"),
    PAGE.request,
    State(SITE, "value"),
)
@show_errors(_EMPTY, None)
def sinks_panel(request, site):
    model, prompts, results = _results(request, site)
    if int(prompts.lengths[0]) < 2:
        return _EMPTY, None, hint("Sink scores need at least two tokens: type a longer prompt.")
    if not results.applies("extreme_tokens"):
        return _EMPTY, None, hint("Attention sinks need attention heads: this model has none. "
                                   "Its residual-state peaks show in the panel above.")  # fmt: skip
    found = results["extreme_tokens"]
    n_heads, n_sinks = found.mean_sink_scores.numel(), len(found.sink_heads())
    text = f"{n_sinks} of {n_heads} heads are sinks (score > {found.threshold:g}); hover a cell for its head."
    offer = SINKS_FIGURE.offer(results.key("extreme_tokens"), "extreme_tokens")
    return found.figure(kind="sinks"), offer, hint(text)


@PAGE.callback(
    Output(EMERGENCE, "figure"),
    EMERGENCE_FIGURE.source,
    Output(message_id(EMERGENCE), "children"),
    PAGE.request,
    Input(SERIES, "value"),
    progress=EMERGENCE_PROGRESS,
)
@show_errors(_EMPTY, None)
def emergence_panel(request, series, progress_key):
    if not request:
        raise PreventUpdate
    source = (series or "").strip() or request.get("name", request["model"])
    if sweep_view.is_store(source):  # a dl.sweep store: its stored metrics, nothing recomputed
        stored = sweep_view.metric_frame(source)
        if stored.empty:
            return _EMPTY, None, hint(f"The sweep store {source!r} has no finished cell with summary metrics yet.")
        text = f"{stored['model'].nunique()} checkpoints from the sweep store, {stored['metric'].nunique()} metrics."
        return sweep_view.figure(stored), None, hint(text)
    try:
        series = checkpoint_series(source)
    except (FileNotFoundError, KeyError):
        return _EMPTY, None, hint(f"{source!r} has no checkpoint series: type the folder of a training run "
                             "(with checkpoints/step_*) or pick a zoo model.")  # fmt: skip
    model, prompts = requested(request)
    steps, checkpoints = [step for step, _ in series], [backend.model_id(str(folder)) for _, folder in series]
    with backend.reporting(progress_key) as report:
        report.step("Massive ratios over the checkpoints", size=len(steps))
        emergence = dl.probes.MassiveEmergence(source, loader=_counting_loads(report, steps))
        params = {k: v for k, v in emergence.get_params().items() if k not in ("loader", "progress")}
        key = (request["model"], prompts, "massive_emergence", {**params, "checkpoints": checkpoints})
        found = backend.cached(*key, lambda: emergence(model, prompts))  # the key names every checkpoint's files
    best = found.fits().dropna().sort_values("r2", ascending=False)
    text = (f"{len(steps)} checkpoints; best fit {best.iloc[0]['layer']} R² = {best.iloc[0]['r2']:.3f}"
            if len(best) else f"{len(steps)} checkpoints; no layer could be fitted")  # fmt: skip
    return found.figure(), EMERGENCE_FIGURE.offer(backend.cached_key(*key), "massive_emergence"), hint(text + ".")


def _counting_loads(report: backend.ProgressReport, steps: list[int]) -> Callable[[Path], Any]:
    """``dl.load`` that counts each checkpoint it is asked for as the previous one done."""
    loaded = iter(range(len(steps)))

    def load(folder: Path) -> Any:
        i = next(loaded)
        report.advance(1 if i else 0, label=f"Checkpoint {i + 1} of {len(steps)} (training step {steps[i]})")
        return dl.load(folder)

    return load
