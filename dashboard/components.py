"""Pieces every page draws with: cards, the token strip, error boxes, selection marks."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go
from dash import dcc, html
from dash.exceptions import PreventUpdate

from dynalens.dashboard.backend import DashboardError, user_message

log = logging.getLogger("dynalens.dashboard")

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


def graph(id: str, height: int = 420) -> dcc.Loading:
    """A graph with a spinner shown while its callback runs longer than 0.3 s."""
    return dcc.Loading(
        dcc.Graph(
            id=id,
            figure=placeholder_figure(),
            config={"displaylogo": False, "displayModeBar": "hover",
                    "toImageButtonOptions": {"format": "svg"}},
            style={"height": f"{height}px"},
        ),
        type="dot",
        delay_show=300,
        color="#2563eb",
    )


def placeholder_figure() -> go.Figure:
    """An empty figure without axes (a panel with nothing to draw yet)."""
    return go.Figure(layout=dict(
        xaxis={"visible": False},
        yaxis={"visible": False},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        margin={"l": 0, "r": 0, "t": 0, "b": 0},
    ))


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
            except PreventUpdate:
                raise
            except Exception as exc:
                if not isinstance(exc, DashboardError):
                    log.exception("callback %s failed", fn.__name__)
                return (*fallback, error_box(user_message(exc)))

        return wrapper

    return decorate


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
