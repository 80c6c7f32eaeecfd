"""Pieces every page draws with: the page frame, panels, cards, the token strip, error boxes, selection marks.

A page is ``page(name, ...panels)``: a status line ``"{name}-status"`` (a
spinner while its first callback runs) above the panels; a panel is a card
with a message line above one :class:`Figure`, the line showing hints and
errors. A figure with nothing to draw is hidden and a short text says what to
do instead (never an empty plot frame); a drawn figure offers its data (CSV,
the Result's ``to_frame()``) and its Result file (``Result.save``) for
download. A long callback shows its progress in a :class:`ProgressBar`.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dash
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate
from dynalens.dashboard import backend
from dynalens.dashboard.prefill import clientside_twin
from dynalens.dashboard.backend import (
    DashboardError,
    NotCached,
    Progress,
    model_and_prompts,
    read_progress,
    results_cache,
    user_message,
)
from dynalens.models.prompts import Prompts

log = logging.getLogger("dynalens.dashboard")

SPINNER = {"type": "dot", "delay_show": 300, "color": "#2563eb"}
"""How ``dcc.Loading`` spinners look: shown once a callback runs longer than 0.3 s."""


def page(name: str, *children: Any) -> html.Div:
    """A page's body: the status line ``f"{name}-status"`` (with a spinner) above ``children``."""
    status = dcc.Loading(html.Div(id=status_id(name), className="status"), **SPINNER)
    return html.Div([status, *children], className=name)


def status_id(page_name: str) -> str:
    """The id of a page's status line (the pills of :func:`status_row`)."""
    return f"{page_name}-status"


def panel(
    title: str, figure: Figure, height: int = 420, controls: Sequence[Any] = (), progress: ProgressBar | None = None
) -> html.Section:
    """A card with a message line (id ``message_id(figure.id)``) and ``progress``'s bar above ``figure``."""
    bar = [] if progress is None else [progress.layout()]
    return card(title, message_line(figure.id), *bar, figure.layout(height=height), controls=controls)


def message_line(graph_id: str) -> html.Div:
    """The (empty) message line above the graph ``graph_id``."""
    return html.Div(id=message_id(graph_id), className="panel-message")


def message_id(graph_id: str) -> str:
    """The id of the message line above a panel's graph: hints and errors go there."""
    return f"{graph_id}-message"


def choice(id: str, options: Mapping[str, str], value: str) -> dcc.RadioItems:
    """Inline radio buttons ``{value: label}`` for a card's controls."""
    return dcc.RadioItems(
        id=id,
        options=[{"label": label, "value": v} for v, label in options.items()],
        value=value,
        inline=True,
        className="inline-check",
    )


def labelled(label: str, control: Any, label_id: str | None = None) -> html.Div:
    """``control`` with a short label on its left (``label_id`` lets a callback rename it)."""
    span = html.Span(label, className="control-label", **({"id": label_id} if label_id else {}))
    return html.Div([span, control], className="inline-control")


def requested(request: Mapping[str, Any] | None) -> tuple[Any, Prompts]:
    """The model and the prompt (one-prompt :class:`Prompts`) of the header's request; no update before the first one."""
    if not request:
        raise PreventUpdate
    return model_and_prompts(request)


def card(title: str, *children: Any, controls: Sequence[Any] = (), class_name: str = "") -> html.Section:
    """A titled panel; ``controls`` sit on the right of the title."""
    return html.Section(
        className=f"card {class_name}".strip(),
        children=[
            html.Div([html.H2(title), html.Div(list(controls), className="card-controls")],
                     className="card-head"),
            *children,
        ],
    )


class Figure:
    """One figure of a page: the graph, the text shown instead while it has nothing to draw, its downloads.

    Create it at a page module's top level (Dash runs page modules for every
    app, so each app gets its callbacks), put :meth:`layout` in the page (or
    use :func:`panel`), and let the callback that draws the figure also
    return :meth:`offer` of the Result behind it into :attr:`source`::

        MAP = Figure("activations-map", "Press Analyse to map the prompt's activations.")

        @callback(Output(MAP.id, "figure"), MAP.source, ..., Input(REQUEST, "data"))
        def draw(request):
            results = backend.page_results(...)
            return results["massive_activations"].figure(), MAP.offer(results.key("massive_activations"), ...)

    While the figure holds no trace, the graph is hidden (``visibility:
    hidden``, so plotly still measures its width) and the box shows ``empty``
    (unless the panel's message line says why); the buttons *CSV* and
    *Result* send the offered Result's ``to_frame()`` and its saved file,
    read back from the results cache.
    """

    def __init__(self, id: str, empty: str) -> None:
        self.id, self.empty = id, empty
        self.box_id, self.source_id, self.download_id = (f"{id}-{part}" for part in ("box", "source", "download"))
        self.csv_id, self.result_id, self.note_id = (f"{id}-{part}" for part in ("csv", "result", "download-note"))
        clientside_twin(
            "fig => (fig && fig.data && fig.data.length) ? 'figure-box' : 'figure-box empty'",
            lambda fig: "figure-box" if _traces(fig) else "figure-box empty",
            [Output(self.box_id, "className")], Input(self.id, "figure"),
        )  # fmt: skip
        clientside_twin(
            "source => [!source, !(source && source.csv)]",
            lambda source: (not source, not (source and source.get("csv"))),
            [Output(self.result_id, "disabled"), Output(self.csv_id, "disabled")], Input(self.source_id, "data"),
        )  # fmt: skip
        dash.callback(
            Output(self.download_id, "data"),
            Output(self.note_id, "children"),
            Input(self.csv_id, "n_clicks"),
            Input(self.result_id, "n_clicks"),
            State(self.source_id, "data"),
            prevent_initial_call=True,
        )(self._download)

    def layout(self, height: int | None = 420) -> html.Div:
        """The graph (hidden while empty, ``empty`` shown instead), its download buttons and their store.

        ``height`` in pixels; None: the figure's own.
        """
        buttons = html.Div(
            className="downloads",
            children=[
                html.Button("CSV", id=self.csv_id, className="download-button", disabled=True, n_clicks=0,
                            title="Download the figure's data (the Result's to_frame()) as CSV"),
                html.Button("Result", id=self.result_id, className="download-button", disabled=True, n_clicks=0,
                            title="Download the Result file (safetensors; dl.probes.Result.load reads it)"),
                html.Span(id=self.note_id, className="hint"),
                dcc.Download(id=self.download_id),
                dcc.Store(id=self.source_id),
            ],
        )  # fmt: skip
        return html.Div([
            html.Div(
                [html.Div(self.empty, className="empty-note"), graph(self.id, height=height)],
                id=self.box_id, className="figure-box empty",
            ),
            buttons,
        ])  # fmt: skip

    @property
    def source(self) -> Output:
        """The ``Output`` a drawing callback fills with :meth:`offer` (None: nothing to download)."""
        return Output(self.source_id, "data")

    @staticmethod
    def offer(key: str, name: str, csv: bool = True, frame: Sequence[Mapping[str, Any]] | None = None) -> dict:
        """What :attr:`source` holds: the results-cache ``key`` of the object drawn, its file ``name``.

        ``csv``: whether the object has a ``to_frame()``; ``frame``: the
        figure's rows to send as CSV instead (an object without ``to_frame``).
        """
        return {"key": key, "name": name, "csv": csv or frame is not None, "frame": frame}

    def _download(self, _csv: int, _result: int, source: dict | None) -> tuple[Any, Any]:
        if not source:
            raise PreventUpdate
        cache = results_cache()
        if source["key"] not in cache:
            return dash.no_update, "No longer cached: analyse again to download."
        if dash.ctx.triggered_id == self.csv_id:
            frame = pd.DataFrame(source["frame"]) if source.get("frame") is not None else None
            frame = cache.load(source["key"]).to_frame() if frame is None else frame
            return dcc.send_data_frame(frame.to_csv, f"{source['name']}.csv", index=False), None
        return dcc.send_file(str(cache.path(source["key"])), filename=f"{source['name']}.safetensors"), None


def _traces(figure: Any) -> int:
    """How many traces a figure (a ``go.Figure`` or its dict) holds."""
    data = figure.get("data") if isinstance(figure, dict) else getattr(figure, "data", None)
    return len(data or [])


def graph(id: str, height: int | None = 420) -> dcc.Loading:
    """A graph with a spinner (see ``SPINNER``) ``height`` pixels high (None: the figure's); its modebar saves SVG."""
    return dcc.Loading(
        dcc.Graph(
            id=id,
            figure=placeholder_figure(),
            config={"displaylogo": False, "displayModeBar": "hover",
                    "toImageButtonOptions": {"format": "svg"}},
            style={} if height is None else {"height": f"{height}px"},
        ),
        **SPINNER,
    )


def placeholder_figure() -> go.Figure:
    """An empty figure without axes (a panel with nothing to draw yet)."""
    return go.Figure(layout={
        "xaxis": {"visible": False},
        "yaxis": {"visible": False},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "margin": {"l": 0, "r": 0, "t": 0, "b": 0},
    })


def error_box(message: str) -> html.Div:
    """A readable error message (never a traceback)."""
    return html.Div([html.Strong("Error  "), html.Span(message)], className="error-box",
                    role="alert")


def token_strip(tokens: Sequence[str], selected: int, id_type: str) -> list[html.Button]:
    """One button per token (pattern-matching ids ``{"type": id_type, "index": i}``).

    Whitespace is made visible (``·`` for spaces, ``↵`` for newlines) so that
    tokens that differ only by a leading space can be told apart.
    """
    return [
        html.Button(
            [html.Span(str(i), className="token-index"), html.Span(visible_text(t))],
            id={"type": id_type, "index": i},
            className="token selected" if i == selected else "token",
            title=f"position {i}: {t!r}",
            n_clicks=0,
        )
        for i, t in enumerate(tokens)
    ]


def visible_text(token: str) -> str:
    """``token`` with spaces, tabs and newlines shown."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"


def clicked_column(click_data: dict[str, Any] | None) -> int | None:
    """The column index of a click on a heatmap, whatever its x labels are."""
    if not click_data or not click_data.get("points"):
        return None
    point = click_data["points"][0]
    number = point.get("pointNumber", point.get("pointIndex"))
    if isinstance(number, list) and len(number) == 2:
        return int(number[1])
    x = point.get("x")
    return int(x) if isinstance(x, (int, float)) else None


def show_errors(*fallback: Any) -> Callable[[Callable[..., tuple]], Callable[..., tuple]]:
    """Decorate a callback whose LAST output is a message area.

    On success the callback returns its outputs itself; on any exception the
    outputs become ``(*fallback, error_box(message))`` with one readable line
    (unexpected exceptions are logged with their traceback on the server).
    """

    def decorate(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        @functools.wraps(fn)
        def wrapper(*args: Any) -> tuple:
            try:
                return fn(*args)
            except (PreventUpdate, NotCached):
                raise
            except Exception as exc:
                if not isinstance(exc, DashboardError):
                    log.exception("callback %s failed", fn.__name__)
                return (*fallback, error_box(user_message(exc)))

        return wrapper

    return decorate


class ProgressBar:
    """The progress element of one long callback ``job``: a bar with the fraction done and the current step.

    Hidden until the callback runs; while it runs, the page polls
    :func:`~dynalens.dashboard.backend.read_progress` every ``POLL_MS`` and
    draws what the callback reports, and its *Cancel* button stops the job;
    when it ends (result, error or cancelled) the bar is hidden again. Create
    it at a page module's top level (Dash runs page modules for every app, so
    each app gets the poll callback), put :meth:`layout` in the page, and
    register the callback with :meth:`callback` (it gets :attr:`key` as its
    last argument; a callback that always runs as a job instead takes
    :attr:`key` as its last ``State`` and ``**backend.background(bar)``)::

        BAR = ProgressBar("heads-scores")

        @BAR.callback(Output(...), Input(...))
        def scores(request, key):
            with backend.reporting(key, steps=2) as report:
                report.step("Reading prompts", size=n)
                ...
    """

    POLL_MS = 250
    """How often the page asks for the progress while the work runs."""

    def __init__(self, job: str) -> None:
        self.id = f"{job}-progress"
        self.body_id, self.poll_id, self.key_id, self.cancel_id, self.start_id = (
            f"{self.id}-{part}" for part in ("body", "poll", "key", "cancel", "start")
        )
        dash.callback(
            Output(self.body_id, "children"),
            Input(self.poll_id, "n_intervals"),
            State(self.key_id, "data"),
            prevent_initial_call=True,
        )(lambda _, key: progress_view(read_progress(key)))

    def layout(self) -> html.Div:
        """The hidden bar, its poll and the random key of this page visit (so tabs never share reports)."""
        return html.Div(
            id=self.id, className="progress", style=_HIDDEN,
            children=[
                html.Div([html.Div(progress_view(None), id=self.body_id, className="progress-body"),
                          html.Button("Cancel", id=self.cancel_id, className="cancel-button", n_clicks=0)],
                         className="progress-row"),
                dcc.Interval(id=self.poll_id, interval=self.POLL_MS, disabled=True),
                dcc.Store(id=self.key_id, data=uuid.uuid4().hex),
                dcc.Store(id=self.start_id),
            ],
        )  # fmt: skip

    def callback(
        self, *dependencies: Output | Input | State, prevent_initial_call: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a long callback: answered at once from what is at hand, else as a background job with this bar.

        ``dependencies`` are the callback's ``Output``, ``Input`` and ``State``
        objects, in that order, as for ``dash.callback`` (and its
        ``prevent_initial_call``); the decorated function gets the bar's key
        after them (report under it with ``backend.reporting``). It is
        registered twice:

        - a plain callback runs it under ``backend.cached_only()``: when the
          model is loaded and the results cache holds every Result it draws
          (a page revisited, a cached prompt), it answers in one request;
        - otherwise (``backend.NotCached``) that callback only writes the
          bar's start store, and the background job listening to it runs the
          function with the same values, showing the bar and its Cancel button.

        A background job always costs a poll (``backend.JOB_POLL_MS``) after
        its first request; the plain callback spares it whenever nothing is
        computed.
        """
        outputs = [d for d in dependencies if isinstance(d, Output)]
        inputs = [d for d in dependencies if isinstance(d, Input)]
        states = [d for d in dependencies if isinstance(d, State)]

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            def at_once(*args: Any) -> list[Any]:
                try:
                    with backend.cached_only():
                        return [*fn(*args), dash.no_update]
                except NotCached:
                    return [*[dash.no_update] * len(outputs), uuid.uuid4().hex]  # the job runs it

            dash.callback(*outputs, Output(self.start_id, "data"), *inputs, *states, self.key,
                          prevent_initial_call=prevent_initial_call)(at_once)  # fmt: skip
            dash.callback(
                *[Output(o.component_id, o.component_property, allow_duplicate=True) for o in outputs],
                Input(self.start_id, "data"),
                *[State(i.component_id, i.component_property) for i in inputs], *states, self.key,
                prevent_initial_call=True, **backend.background(self),
            )(lambda _start, *args: fn(*args))  # fmt: skip
            return fn

        return decorate

    @property
    def key(self) -> State:
        """The ``State`` holding the key to report under (:func:`~dynalens.dashboard.backend.reporting`)."""
        return State(self.key_id, "data")

    @property
    def cancel(self) -> Input:
        """The Cancel button's clicks (the callback's ``cancel=``)."""
        return Input(self.cancel_id, "n_clicks")

    @property
    def running(self) -> list[tuple[Output, Any, Any]]:
        """The callback's ``running=``: show the bar and poll while it runs; hide it, stop and reset it after."""
        return [
            (Output(self.id, "style"), _SHOWN, _HIDDEN),
            (Output(self.poll_id, "disabled"), False, True),
            (Output(self.body_id, "children"), progress_view(None), progress_view(None)),
            (Output(self.cancel_id, "disabled"), False, True),
        ]


_SHOWN, _HIDDEN = {"display": "block"}, {"display": "none"}


def progress_view(progress: Progress | None) -> list[Any]:
    """A ``<progress>`` with ``progress``'s fraction and its label; indeterminate before the first step."""
    if progress is None:
        return [html.Progress(className="progress-bar"), html.Span("Starting…", className="progress-label")]
    return [
        html.Progress(value=f"{progress.value:.4f}", max=str(progress.steps), className="progress-bar"),
        html.Span(f"{progress.label}: {progress.value / progress.steps:.0%}", className="progress-label"),
    ]


def hint(text: str) -> html.Div:
    """A short explanatory line under a panel's title."""
    return html.Div(text, className="hint")


def status_row(model: str, architecture: str, n_tokens: int, n_layers: int | None = None) -> html.Div:
    """The pills naming the model, its architecture, its depth (if given) and the prompt's length."""
    layers = [] if n_layers is None else [html.Span(f"{n_layers} layers", className="pill")]
    return html.Div(
        [html.Span(model, className="pill pill-model"),
         html.Span(architecture, className=f"pill pill-{architecture}"),
         *layers,
         html.Span(f"{n_tokens} tokens", className="pill")],
        className="status-row",
    )  # fmt: skip
