"""Pages that stay mounted: a page once built is shown again, not rebuilt, and follows the header's request in place.

Dash pages (``dash.page_container``) rebuild a page on every visit: a request
for its layout, then the browser mounts and draws every figure again. Here
each registered page has a box of its own in the shell (:func:`boxes`). A box
keeps the page built in it; while another page shows, it is hidden (out of
the flow, ``visibility: hidden``, its width kept, so its graphs keep their
size and are not redrawn). Following a link to a page already built only
swaps the visible box, in the browser; the first visit asks the server to
build the page for the URL's query, ``layout(**query)`` as Dash pages call it
(``prefill`` draws it from the results cache when it can).

A hidden page computes nothing: its callbacks read the header's request
through :attr:`prefill.PageCallbacks.request`, a copy that only the page shown
receives. A page shown again while the header's request names another view
(model, checkpoint, compared models or prompt) than the one it shows gets the
request then, and its callbacks redraw its figures in place (from the results
cache when the prompt was analysed).
"""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import Input, Output, State, dcc, html, no_update

from dynalens.dashboard import url_state

LOCATION = "url"
"""The ``dcc.Location`` of the pages: its ``pathname`` picks the page, its ``search`` names the view."""
BUILD = "page-build"
"""Store: the page the browser asks the server to build, ``{"module", "search", "at"}``."""
BUILT = "page-built"
"""Store: the modules whose page is built in its box."""
NOT_FOUND = "page-not-found"
SHOWN, HIDDEN = "page-box", f"page-box {url_state.HIDDEN_CLASS}"


def box_id(module: str) -> str:
    """The id of the box that holds the page of ``module`` (its ``dash.page_registry`` key)."""
    return f"page-{module.rsplit('.', 1)[-1]}"


CURRENT_PATH = "((pathname || '/').replace(/(.)\\/+$/, '$1'))"
"""A JavaScript expression: ``pathname`` (a variable in scope) as a registry's ``relative_path``."""


def is_shown(module: str) -> str:
    """A JavaScript expression: whether ``pathname`` (a variable in scope) is the page of ``module``."""
    return f"({json.dumps(dash.page_registry[module]['relative_path'])} === {CURRENT_PATH})"


def boxes() -> html.Div:
    """The shell's part that holds the pages: the URL, one hidden box per page, the 404 box."""
    modules = list(dash.page_registry)
    return html.Div(
        [dcc.Location(id=LOCATION, refresh="callback-nav"), dcc.Store(id=BUILD), dcc.Store(id=BUILT, data=[])]
        + [html.Div(id=box_id(m), className=HIDDEN) for m in modules]
        + [html.Div(html.H2("Page not found: pick a page in the top bar."), id=NOT_FOUND, className=HIDDEN)],
        id="pages",
    )


def register(app: dash.Dash) -> None:
    """The router: show the page of the URL from its box, or have the server build it first."""
    modules = list(dash.page_registry)
    pages = [{"module": m, "path": dash.page_registry[m]["relative_path"], "title": dash.page_registry[m]["title"]}
             for m in modules]  # fmt: skip
    app.clientside_callback(
        _fill(_SHOW, PAGES=pages, SHOWN_CLASS=SHOWN, HIDDEN_CLASS=HIDDEN).replace("CURRENT_PATH", CURRENT_PATH),
        *[Output(box_id(m), "className") for m in modules], Output(NOT_FOUND, "className"), Output(BUILD, "data"),
        Input(LOCATION, "pathname"), State(LOCATION, "search"), State(BUILT, "data"),
    )  # fmt: skip

    @app.callback(
        *[Output(box_id(m), "children") for m in modules],
        *[Output(box_id(m), "className", allow_duplicate=True) for m in modules],
        Output(NOT_FOUND, "className", allow_duplicate=True),
        Output(BUILT, "data"),
        Input(BUILD, "data"),
        State(BUILT, "data"),
        prevent_initial_call=True,
    )
    def build(asked, built):
        """The asked page's layout for its URL's query, shown."""
        module = asked.get("module")
        children, shown = [no_update] * len(modules), [HIDDEN] * len(modules)
        if module not in modules:
            return *children, *shown, SHOWN, no_update
        i = modules.index(module)
        page = dash.page_registry[module]
        query = {key: values[0] if len(values) == 1 else values
                 for key, values in url_state.parse(asked.get("search")).items()}  # fmt: skip
        children[i] = page["layout"](**query) if callable(page["layout"]) else page["layout"]
        shown[i] = SHOWN
        return *children, *shown, HIDDEN, sorted({*(built or []), module})


def _fill(source: str, **values: Any) -> str:
    """``source`` with each name in ``values`` replaced by the value as JSON."""
    for name, value in values.items():
        source = source.replace(name, json.dumps(value))
    return source


_SHOW = """
function(pathname, search, built) {
  const pages = PAGES, skip = window.dash_clientside.no_update, none = pages.map(() => skip);
  if (pathname === null || pathname === undefined) { return [...none, skip, skip]; }
  const page = pages.find(p => p.path === CURRENT_PATH);
  if (page) { document.title = page.title; }
  if (page && (built || []).includes(page.module)) {
    return [...pages.map(p => p === page ? SHOWN_CLASS : HIDDEN_CLASS), HIDDEN_CLASS, skip];
  }
  return [...none, skip, {module: page ? page.module : null, search: search || '', at: Date.now()}];
}
"""
"""Client-side: the boxes' classes (the URL's page shown when it is built), else the page to build."""
