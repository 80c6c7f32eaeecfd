"""The shell every page shares: top bar with navigation, model picker, prompt box.

Pages read the user's request from the ``REQUEST`` store, which the header
fills when the user presses *Analyse* (and once on load, with the defaults):
``{"model": name_or_path, "prompt": text, "run": n}``.
"""

from __future__ import annotations

from typing import Any

import dash
from dash import dcc, html

import dynalens

# Component ids the pages may read.
MODEL_NAME = "model-name"
MODEL_PATH = "model-path"
PROMPT = "prompt"
ANALYSE = "analyse"
REQUEST = "request"
NAV = "nav"

DEFAULT_PROMPT = (
    "The Eiffel Tower is in Paris. The Colosseum is in Rome. The Eiffel Tower is in"
)


def model_options(default_model: str) -> list[dict[str, Any]]:
    """Dropdown options for every model ``dl.list_models()`` names, ``default_model`` first."""
    options = [
        {
            "label": html.Span(
                [html.Span(row.name, className="opt-name"),
                 html.Span(row.size, className="opt-arch")],
                title=f"{row.architecture}: {row.description}",
            ),
            "value": row.name,
            "search": f"{row.name} {row.architecture} {row.description}",
            "disabled": row.parameters is None,  # a zoo model whose weights are not built
        }
        for row in dynalens.list_models()
    ]
    if default_model not in {o["value"] for o in options}:
        options.insert(0, {"label": default_model, "value": default_model, "search": default_model})
    return options


def header(default_model: str) -> html.Header:
    """The top bar: brand, one link per registered page, the model and prompt controls."""
    persist = {"persistence": True, "persistence_type": "session"}
    return html.Header(
        className="topbar",
        children=[
            html.Div(
                className="topbar-row",
                children=[
                    html.Div(
                        [html.Span("dynalens", className="brand"),
                         html.Span(f"v{dynalens.__version__}", className="brand-version")],
                        className="brand-box",
                    ),
                    html.Nav(id=NAV, className="nav", children=nav_links("/")),
                ],
            ),
            html.Div(
                className="controls",
                children=[
                    html.Div(
                        className="control model-control",
                        children=[
                            html.Label("Model", htmlFor=MODEL_NAME),
                            dcc.Dropdown(
                                id=MODEL_NAME,
                                options=model_options(default_model),
                                value=default_model,
                                clearable=False,
                                searchable=True,
                                **persist,
                            ),
                            dcc.Input(
                                id=MODEL_PATH,
                                type="text",
                                placeholder="…or a local folder / .gguf path",
                                debounce=True,
                                className="text-input",
                                **persist,
                            ),
                        ],
                    ),
                    html.Div(
                        className="control prompt-control",
                        children=[
                            html.Label("Prompt", htmlFor=PROMPT),
                            dcc.Textarea(
                                id=PROMPT, value=DEFAULT_PROMPT, className="prompt", **persist
                            ),
                        ],
                    ),
                    html.Button("Analyse", id=ANALYSE, className="primary-button", n_clicks=0),
                ],
            ),
        ],
    )


def nav_links(pathname: str | None) -> list[dcc.Link]:
    """One link per page in ``dash.page_registry``, the current one marked active."""
    return [
        dcc.Link(
            page["name"],
            href=page["relative_path"],
            className="nav-link active" if page["path"] == (pathname or "/") else "nav-link",
        )
        for page in dash.page_registry.values()
    ]


def shell(default_model: str) -> html.Div:
    """The whole app layout: header, the current page, the request store."""
    return html.Div(
        className="app",
        children=[
            header(default_model),
            html.Main(dash.page_container, className="page"),
            dcc.Store(id=REQUEST, storage_type="memory"),
        ],
    )
