"""The shell every page shares: top bar with navigation, model picker, prompt box, compare and checkpoint controls.

Pages read the user's request from the ``REQUEST`` store, which :func:`register`'s
callback fills when the user presses *Analyse*, drags the checkpoint slider,
changes the compared models, or opens a URL (and once on load, with the defaults)::

    {"model": name_or_path_to_load, "name": picked_model, "checkpoint": step_or_None,
     "compare": [name_or_path, ...], "prompt": text, "run": n}

``model`` is what the pages load: the picked model itself, or the folder of
its checkpoint ``checkpoint`` when the slider is off its last position
("final"). The request (and each page's selections, see ``url_state``) is kept
in the URL, so a reload or a pasted link shows the same view.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dash
from dash import Input, Output, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

import dynalens
from dynalens.dashboard import router, url_state
from dynalens.dashboard.router import LOCATION
from dynalens.probes.emergence import checkpoint_series

# Component ids the pages may read.
MODEL_NAME = "model-name"
MODEL_PATH = "model-path"
PROMPT = "prompt"
ANALYSE = "analyse"
REQUEST = "request"
NAV = "nav"
COMPARE = "compare-models"
CHECKPOINT = "checkpoint"
CHECKPOINT_BOX = "checkpoint-box"
COMPARE_NOTE = "compare-note"
URL_WRITTEN = "url-written"

MAX_COMPARED = 2
"""Models shown beside the header's one: three columns at most."""

DEFAULT_PROMPT = (
    "The Eiffel Tower is in Paris. The Colosseum is in Rome. The Eiffel Tower is in"
)

_HIDDEN, _SHOWN = {"display": "none"}, {"display": "flex"}


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
    """The top bar: brand, one link per registered page, the model, compare, checkpoint and prompt controls."""
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
                    html.Nav(id=NAV, className="nav", children=nav_links()),
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
                            dcc.Dropdown(
                                id=COMPARE,
                                multi=True,
                                placeholder=f"compare with… (up to {MAX_COMPARED} models or checkpoints)",
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
            html.Div(
                id=CHECKPOINT_BOX,
                className="control checkpoint-control",
                style=_HIDDEN,
                children=[
                    html.Label("Checkpoint (training step)", htmlFor=CHECKPOINT),
                    html.Div(
                        dcc.Slider(id=CHECKPOINT, min=0, max=0, step=1, value=0, marks={},
                                   updatemode="drag", included=False, allow_direct_input=False),
                        style={"flex": "1"},
                    ),
                ],
            ),
        ],
    )


def nav_links(request: Mapping[str, Any] | None = None) -> list[dcc.Link]:
    """One link per page in ``dash.page_registry`` (id ``nav_id(module)``); each keeps ``request`` in its URL."""
    search = url_state.search_of(request)
    return [dcc.Link(page["name"], id=nav_id(module), href=page["relative_path"] + search, className="nav-link")
            for module, page in dash.page_registry.items()]  # fmt: skip


def nav_id(module: str) -> str:
    """The id of the top bar's link to the page of ``module``."""
    return f"nav-{module.rsplit('.', 1)[-1]}"


def compare_notes() -> dict[str, str]:
    """What each page without a side-by-side view says while models are compared, by its path."""
    panels = ", ".join(p["name"] for p in dash.page_registry.values() if p.get("main_panel"))
    return {
        page["relative_path"]: f"The {page['name']} page has no side-by-side view (its panels are not one analysis "
                               f"figure); the compared models are shown side by side on {panels}."
        for page in dash.page_registry.values() if not page.get("main_panel")
    }  # fmt: skip


def shell(default_model: str) -> html.Div:
    """The whole app layout: header, the compare note, the current page, the request store."""
    return html.Div(
        className="app",
        children=[
            header(default_model),
            html.Main([html.Div(id=COMPARE_NOTE, className="hint", style=_HIDDEN), router.boxes()], className="page"),
            dcc.Store(id=REQUEST, storage_type="memory"),
            dcc.Store(id=URL_WRITTEN),
        ],
    )


# ------------------------------------------------------------------ requests
def series_of(name: str) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints of a zoo model or training run; empty for any other model."""
    try:
        return checkpoint_series(name)
    except (FileNotFoundError, KeyError, OSError):
        return []


def make_request(name: str, checkpoint: int | None, compare: list[str], prompt: str, run: int) -> dict[str, Any]:
    """The request for ``name`` at ``checkpoint`` (a step; None or an unknown step: the model itself)."""
    folder = dict(series_of(name)).get(checkpoint) if checkpoint is not None else None
    return {
        "model": str(folder) if folder is not None else name,
        "name": name,
        "checkpoint": checkpoint if folder is not None else None,
        "compare": [c for c in compare if c and c != name][:MAX_COMPARED],
        "prompt": prompt,
        "run": run,
    }


def model_label(name_or_path: str) -> str:
    """A short name: ``"attn2l-induction @ step 17"`` for a checkpoint folder, else the name or path as given."""
    path = Path(name_or_path)
    if path.parent.name == "checkpoints" and path.name.startswith("step_") and path.name[5:].isdigit():
        return f"{path.parent.parent.name} @ step {int(path.name[5:])}"
    return name_or_path


def compare_options(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the compare dropdown offers: every built model, the checkpoints of the request's model, what it holds."""
    values = [row.name for row in dynalens.list_models() if row.parameters is not None]
    values += [str(folder) for _, folder in series_of(request["name"])]
    values += [c for c in request.get("compare", []) if c not in values]
    return [{"label": model_label(v), "value": v} for v in values]


def slider_of(request: Mapping[str, Any]) -> tuple[int, int, dict[int, str], dict[str, str]]:
    """The checkpoint slider for ``request``: value, max, marks (0..n-1 the checkpoints, n the model), style."""
    steps = [step for step, _ in series_of(request["name"])]
    if not steps:
        return 0, 0, {}, _HIDDEN
    marks = {i: str(step) for i, step in enumerate(steps)} | {len(steps): "final"}
    value = steps.index(request["checkpoint"]) if request.get("checkpoint") in steps else len(steps)
    return value, len(steps), marks, _SHOWN


def same_view(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two requests show the same thing (their ``run`` counters aside)."""
    strip = lambda r: {k: v for k, v in (r or {}).items() if k != "run"}  # noqa: E731
    return a is not None and b is not None and strip(a) == strip(b)


def register(app: dash.Dash) -> None:
    """The shell's callbacks: the request (from the controls or the URL), the URL writer, the router, nav links,
    compare note."""
    router.register(app)

    @app.callback(
        Output(REQUEST, "data"),
        Output(MODEL_NAME, "value"),
        Output(MODEL_PATH, "value"),
        Output(PROMPT, "value"),
        Output(COMPARE, "value"),
        Output(COMPARE, "options"),
        Output(CHECKPOINT, "value"),
        Output(CHECKPOINT, "max"),
        Output(CHECKPOINT, "marks"),
        Output(CHECKPOINT_BOX, "style"),
        Input(ANALYSE, "n_clicks"),
        Input(MODEL_PATH, "n_submit"),
        Input(CHECKPOINT, "value"),
        Input(COMPARE, "value"),
        Input(LOCATION, "search"),
        State(MODEL_NAME, "value"),
        State(MODEL_PATH, "value"),
        State(PROMPT, "value"),
        State(MODEL_NAME, "options"),
        State(REQUEST, "data"),
    )
    def request(n_clicks, n_submit, index, compare, search, name, path, prompt, known, previous):
        if search is None:  # the page's location is not known yet: it fires again when it is
            raise PreventUpdate
        run = (n_clicks or 0) + (n_submit or 0)
        typed = (path or "").strip() or (name or "")
        controls = [no_update] * 4  # model name, path, prompt, compare: left as the user set them
        trigger = ctx.triggered_id
        if previous is None or trigger == LOCATION:
            view = url_state.view_of(search)
            if view is None:  # a plain URL: the controls' values
                new = make_request(typed, None, compare or [], prompt or "", run)
            else:
                new = make_request(view["name"], view["checkpoint"], view["compare"],
                                   prompt if view["prompt"] is None else view["prompt"], run)  # fmt: skip
                picked = view["name"] in {o["value"] for o in known or []}
                controls = [view["name"] if picked else no_update, "" if picked else view["name"],
                            new["prompt"], new["compare"]]  # fmt: skip
            if same_view(new, previous):  # a link to another page of the same view
                raise PreventUpdate
        elif trigger == CHECKPOINT:
            steps = [step for step, _ in series_of(previous["name"])]
            step = steps[index] if isinstance(index, int) and 0 <= index < len(steps) else None
            new = make_request(previous["name"], step, previous["compare"], previous["prompt"], run)
        elif trigger == COMPARE:
            new = make_request(previous["name"], previous["checkpoint"], compare or [], previous["prompt"], run)
        else:  # Analyse, or Enter in the path box: the same model keeps its checkpoint
            step = previous["checkpoint"] if typed == previous["name"] else None
            new = make_request(typed, step, compare or [], prompt or "", run)
        return new, *controls, compare_options(new), *slider_of(new)

    app.clientside_callback(url_state.WRITE_REQUEST, Output(URL_WRITTEN, "data"), Input(REQUEST, "data"))

    modules = list(dash.page_registry)

    @app.callback(*[Output(nav_id(m), "href") for m in modules], Input(REQUEST, "data"))
    def keep_request_in_links(request):
        return [link.href for link in nav_links(request)]

    app.clientside_callback(
        _MARK_CURRENT.replace("PATHS", json.dumps([dash.page_registry[m]["relative_path"] for m in modules]))
        .replace("CURRENT_PATH", router.CURRENT_PATH),
        *[Output(nav_id(m), "className") for m in modules], Input(LOCATION, "pathname"),
    )  # fmt: skip
    app.clientside_callback(
        _COMPARE_NOTE.replace("NOTES", json.dumps(compare_notes())).replace("CURRENT_PATH", router.CURRENT_PATH),
        Output(COMPARE_NOTE, "children"), Output(COMPARE_NOTE, "style"),
        Input(LOCATION, "pathname"), Input(REQUEST, "data"),
    )  # fmt: skip


_MARK_CURRENT = """
function(pathname) {
  return PATHS.map(path => path === CURRENT_PATH ? 'nav-link active' : 'nav-link');
}
"""
"""Client-side: the current page's link marked active."""

_COMPARE_NOTE = """
function(pathname, request) {
  const note = (NOTES)[CURRENT_PATH];
  const shown = !!(note && request && request.compare && request.compare.length);
  return [shown ? note : null, {display: shown ? 'block' : 'none'}];
}
"""
"""Client-side: a page that has no side-by-side view says so while models are compared."""
