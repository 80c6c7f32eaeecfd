"""Side by side: a page's main panel for two or three models on the same prompt.

A page declares its main panel once, at its top level, and wraps its layout::

    PAGE = PageCallbacks(__name__)
    MAIN = MainPanel(PAGE, "Head scores", selections={KIND: "induction"},
                     analysis=scores_of, prompts=workload_of, figure=draw_scores)

    @PAGE.page_layout
    @MAIN.page_layout
    def layout(**_): ...

``analysis(model, chosen)`` names the analysis the panel draws,
``prompts(model, chosen)`` the prompts it reads when they are not the
header's prompt (a workload of the page's own, or ``None`` for a weight-only
experiment), ``figure(result, chosen)`` how its Result is drawn; ``chosen``
maps each selection (a control's component id) to its value.

While the header names models to compare with, the page shows a row of
columns above its panels: the header's model first, then each compared one,
each the same analysis on the same typed prompt (read by that model's own
tokenizer), computed through ``backend.page_results`` (so the header model's
column reads the Result the page already computed). A model that the
analysis does not apply to, or that cannot read the prompt, gets the reason
in its column instead of a figure. The selections also live in the URL
(``url_state``): the wrapped layout takes their values from the query string,
and a client-side callback writes them back as they change.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import dash
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.dashboard import backend, router, url_state
from dynalens.dashboard.components import card
from dynalens.dashboard.layout import model_label
from dynalens.dashboard.prefill import PageCallbacks
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.probes.analysis import Analysis
from dynalens.probes.results import Result

log = logging.getLogger("dynalens.dashboard")

Chosen = Mapping[str, Any]
"""A page's selections: control id → its current value."""

HEIGHT = 400
"""Height of one column's graph (px)."""


class MainPanel:
    """A page's main panel as one analysis and one figure function, drawn per model when models are compared.

    Parameters
    ----------
    page : PageCallbacks
        The page's callbacks (its module has called ``dash.register_page``);
        the panel's is one of them.
    title : str
        What the panel shows, e.g. ``"Head scores"``.
    analysis : callable
        ``analysis(model, chosen) -> Analysis``.
    figure : callable
        ``figure(result, chosen) -> go.Figure``.
    prompts : callable, optional
        ``prompts(model, chosen) -> Prompts or None``: what the analysis reads
        (None: weights only); without it, the header's prompt.
    selections : mapping
        Control id → default value: the page's controls whose ``value`` the
        panel reads and the URL keeps (controls the panel does not read may be
        listed too, for the URL).

    Attributes
    ----------
    section_id, body_id, url_id : str
        Ids of the side-by-side card, its columns, and the store its URL writer outputs to.
    """

    def __init__(
        self,
        page: PageCallbacks,
        title: str,
        *,
        analysis: Callable[[Any, Chosen], Analysis],
        figure: Callable[[Result, Chosen], go.Figure],
        prompts: Callable[[Any, Chosen], Prompts | None] | None = None,
        selections: Mapping[str, Any] | None = None,
    ) -> None:
        self.page = page.page
        self.title, self.analysis, self.prompts, self.figure = title, analysis, prompts, figure
        self.selections = dict(selections or {})
        parts = ("", "-body", "-url")
        self.section_id, self.body_id, self.url_id = (f"{self.page}-side-by-side{part}" for part in parts)
        dash.page_registry[page.module]["main_panel"] = title  # the shell's compare note reads it
        ids = list(self.selections)
        page.callback(
            Output(self.section_id, "style"),
            Output(self.body_id, "children"),
            page.request,
            *[Input(id, "value") for id in ids],
        )(lambda request, *values: self.draw(request, dict(zip(ids, values))))
        if ids:  # on a change, or when the page shows again: a page shows the selections its URL names
            dash.clientside_callback(
                url_state.write_selections(ids), Output(self.url_id, "data"), *[Input(id, "value") for id in ids],
                Input(router.box_id(page.module), "className"), prevent_initial_call=True,
            )

    def page_layout(self, layout: Callable[..., Any]) -> Callable[..., html.Div]:
        """Decorate the page's ``layout``: the side-by-side card above it, its selections from the URL's query."""

        @functools.wraps(layout)
        def wrapped(**query: Any) -> html.Div:
            body = url_state.restore(layout(**query), query, self.selections)
            section = card(f"Side by side: {self.title}", html.Div(id=self.body_id, className="compare-row"),
                           class_name="compare")  # fmt: skip
            return html.Div([html.Div(section, id=self.section_id, style=_HIDDEN), dcc.Store(id=self.url_id), body])

        return wrapped

    def draw(self, request: Mapping[str, Any] | None, chosen: Chosen) -> tuple[dict[str, str], list[html.Div]]:
        """The card's style and its columns: shown only while the request compares models."""
        if not request:
            raise PreventUpdate
        if not request.get("compare"):
            return _HIDDEN, []
        chosen = {id: default if chosen.get(id) is None else chosen[id] for id, default in self.selections.items()}
        models = [request["model"], *request["compare"]]
        width = {"display": "grid", "gridTemplateColumns": f"repeat({len(models)}, minmax(0, 1fr))", "gap": "16px"}
        columns = [self.column(i, name, request["prompt"], chosen) for i, name in enumerate(models)]
        return _SHOWN, [html.Div(columns, style=width)]

    def result(self, name_or_path: str, prompt: str, chosen: Chosen) -> tuple[Any, Result]:
        """The model ``name_or_path`` and its Result of the panel's analysis (on ``prompt`` unless it has its own).

        Raises the analysis' own error (AnalysisError) when it does not apply to
        the model, before any prompt is read.
        """
        model = backend.load_model(name_or_path)
        analysis = self.analysis(model, chosen)
        analysis.check(model)
        prompts = backend.encode_prompt(model, prompt) if self.prompts is None else self.prompts(model, chosen)
        return model, backend.page_results(name_or_path, model, prompts, [analysis])[analysis]

    def column(self, index: int, name_or_path: str, prompt: str, chosen: Chosen) -> html.Div:
        """One model's column: its name and architecture over the panel's figure, or over the reason it has none."""
        head = [html.Span(model_label(name_or_path), className="pill pill-model")]
        try:
            model, result = self.result(name_or_path, prompt, chosen)
            head.append(html.Span(architecture_of(model), className=f"pill pill-{architecture_of(model)}"))
            body = dcc.Graph(
                id=graph_id(self.page, index), figure=self.figure(result, chosen),
                config={"displaylogo": False, "displayModeBar": "hover"}, style={"height": f"{HEIGHT}px"},
            )  # fmt: skip
        except backend.NotCached:
            raise
        except Exception as exc:  # the column says why; the other columns still draw
            if not isinstance(exc, backend.DashboardError):
                log.exception("side-by-side %s of %s failed", self.title, name_or_path)
            body = html.Div(backend.user_message(exc), id=message_id(self.page, index), className="hint compare-reason")
        return html.Div([html.Div(head, className="status-row"), body], className="compare-column")


def graph_id(page: str, index: int) -> str:
    """The id of column ``index``'s graph on ``page`` (0 is the header's model)."""
    return f"{page}-side-by-side-graph-{index}"


def message_id(page: str, index: int) -> str:
    """The id of the reason shown in column ``index`` on ``page`` when it has no figure."""
    return f"{page}-side-by-side-reason-{index}"


_HIDDEN, _SHOWN = {"display": "none"}, {"display": "block"}
