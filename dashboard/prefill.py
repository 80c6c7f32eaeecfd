"""A page's callbacks on the header's request, also run when its layout is built: a page built for an analysed
prompt arrives drawn, in one request.

The router (``router.py``) builds a page on its first visit: a request for
the layout and then, once the browser has drawn it, every callback of the
page. With the prompt already analysed, the second
round trip and the drawing of placeholder figures in between are the bulk of
the wait. :class:`PageCallbacks` spares both: the callbacks that read the
header's request are registered through :meth:`PageCallbacks.callback`, and
the page's layout, built for the request that its URL names (the navigation
links carry it, ``url_state``), is filled with their outputs by running them
under ``backend.cached_only()``, so the layout arrives drawn when nothing
needs computing::

    PAGE = PageCallbacks(__name__)

    @PAGE.callback(Output(MAP, "figure"), PAGE.request, Input(VIEW, "value"))
    def massive_panel(request, view): ...

    @PAGE.page_layout
    def layout(**query): ...

Each callback's first input is :attr:`PageCallbacks.request`, the page's copy
of the header's request, which a client-side callback refreshes whenever the
header's request changes while the page is shown (Analyse runs again even on
the same prompt) and when the page shows again while the request names
another view than its copy (a hidden page computes nothing). A
layout drawn for a request holds it already, with a marker saying so: the
first refresh that finds the same view (``layout.same_view``) only clears the
marker, so nothing runs when the page appears. A layout that was not drawn
(a model to load, a Result not cached, a plain URL) starts with an empty
copy, and its callbacks run as soon as the request is copied (one round of
requests). One callback that cannot answer from what is at hand leaves the
whole layout to the callbacks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import dash
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from dynalens.dashboard import backend, router, url_state
from dynalens.dashboard.layout import REQUEST, make_request
from dynalens.dashboard.router import LOCATION

Dependency = Output | Input | State

HAND_OVER = """
function(request, pathname, drawn, held) {
    const skip = window.dash_clientside.no_update;
    if (!request || !SHOWN) { return [skip, skip]; }
    const view = r => JSON.stringify([r.model, r.name, r.checkpoint, r.compare, r.prompt]);
    if (drawn && view(drawn) === view(request)) { return [skip, null]; }
    const triggered = (window.dash_clientside.callback_context.triggered || []).map(t => t.prop_id);
    const shownAgain = triggered.length > 0 && triggered.every(id => id.endsWith('.pathname'));
    if (shownAgain && held && view(held) === view(request)) { return [skip, skip]; }
    return [request, drawn ? null : skip];
}
"""
"""Client-side: the header's request into the page's copy while the page is shown (``SHOWN``: ``router.is_shown``):
whenever it changes, and when the page shows again holding another view; except once when the layout was drawn
for the same view (the marker is cleared then)."""


class PageCallbacks:
    """The callbacks of one page that read the header's request, and the layout that runs them first.

    Parameters
    ----------
    module : str
        The page module's ``__name__`` (it has called ``dash.register_page``).

    Attributes
    ----------
    page : str
        The page's short name (the module's last part).
    request_id, drawn_id : str
        Ids of the page's copy of the request (what its callbacks read) and of
        the marker naming the request its layout was drawn for.
    """

    def __init__(self, module: str) -> None:
        self.module, self.page = module, module.rsplit(".", 1)[-1]
        self.request_id, self.drawn_id = f"{self.page}-request", f"{self.page}-drawn"
        self._callbacks: list[tuple[Callable[..., Any], list[Dependency]]] = []
        if module not in dash.page_registry:
            raise ValueError(f"{module} makes its PageCallbacks before calling dash.register_page")
        dash.clientside_callback(
            HAND_OVER.replace("SHOWN", router.is_shown(module)),
            Output(self.request_id, "data"), Output(self.drawn_id, "data"),
            Input(REQUEST, "data"), Input(LOCATION, "pathname"),
            State(self.drawn_id, "data"), State(self.request_id, "data"),
        )  # fmt: skip

    @property
    def request(self) -> Input:
        """The first ``Input`` of every callback registered here: the header's request, as this page reads it."""
        return Input(self.request_id, "data")

    def callback(self, *dependencies: Dependency, progress: Any = None) -> Callable[[Callable], Callable]:
        """``dash.callback`` (``progress``: ``ProgressBar.callback``, a long callback), run by the layout too.

        ``dependencies``: Outputs, then :attr:`request`, then other Inputs and
        States. The callback does not run when the page is drawn (its layout
        did, or the request store starts it).
        """
        inputs = [d for d in dependencies if not isinstance(d, Output)]
        if not inputs or (inputs[0].component_id, inputs[0].component_property) != (self.request_id, "data"):
            raise ValueError(f"a callback of {self.page}'s PageCallbacks reads PAGE.request first, got {inputs[:1]}")

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if progress is None:
                dash.callback(*dependencies, prevent_initial_call=True)(fn)
                self._callbacks.append((fn, list(dependencies)))
            else:
                progress.callback(*dependencies, prevent_initial_call=True)(fn)
                self._callbacks.append((fn, [*dependencies, progress.key]))
            return fn

        return decorate

    def page_layout(self, layout: Callable[..., Any]) -> Callable[..., html.Div]:
        """Decorate the page's ``layout(**query)``: filled by the callbacks for the request its query names."""

        @functools.wraps(layout)
        def wrapped(**query: Any) -> html.Div:
            body = layout(**query)
            request = request_of(query)
            drawn = request is not None and self.fill(body, request)
            held = request if drawn else None
            return html.Div([dcc.Store(id=self.request_id, data=held), dcc.Store(id=self.drawn_id, data=held), body])

        return wrapped

    def fill(self, body: Any, request: Mapping[str, Any]) -> bool:
        """Set the outputs of every registered callback in ``body`` from what is at hand; whether all answered.

        Inputs and states are the values ``body`` holds (a control's value
        restored from the URL), the request for :attr:`request`; callbacks run
        in the order they were registered and see the outputs of earlier ones.
        """
        components = {c.id: c for c in url_state.walk(body) if isinstance(getattr(c, "id", None), str)}
        with backend.cached_only():
            for fn, dependencies in self._callbacks:
                outputs = [d for d in dependencies if isinstance(d, Output)]
                values = [request if d.component_id == self.request_id
                          else getattr(components.get(d.component_id), d.component_property, None)
                          for d in dependencies if not isinstance(d, Output)]  # fmt: skip
                try:
                    answer = fn(*values)
                except (backend.NotCached, PreventUpdate):
                    return False
                _set(components, outputs, answer)
        return True


def _set(components: Mapping[str, Any], outputs: list[Output], answer: Any) -> None:
    """Set ``outputs`` (one value, or one per output) in ``components``, and what their client-side twins derive."""
    for output, value in zip(outputs, answer if len(outputs) > 1 else [answer]):
        if value is dash.no_update:
            continue
        setattr(components[output.component_id], output.component_property, value)
        for python, derived in _twins.get((output.component_id, output.component_property), []):
            _set(components, derived, python(value))


_twins: dict[tuple[str, str], list[tuple[Callable[[Any], Any], list[Output]]]] = {}


def clientside_twin(source: str, python: Callable[[Any], Any], outputs: list[Output], source_input: Input) -> None:
    """A client-side callback of one input that does not run when a page appears, and its Python twin.

    Whenever :meth:`PageCallbacks.fill` sets ``source_input`` in a layout it
    sets ``outputs`` to ``python(value)`` (a tuple for several outputs), so a
    layout that arrives drawn is complete without the browser running
    ``source``; an empty layout holds the outputs' values for its empty inputs.
    """
    dash.clientside_callback(source, *outputs, source_input, prevent_initial_call=True)
    _twins.setdefault((source_input.component_id, source_input.component_property), []).append((python, outputs))


def request_of(query: Mapping[str, Any]) -> dict[str, Any] | None:
    """The request a page URL's query names (as ``layout.register``'s callback makes it); None without a
    model or a prompt (the page then waits for the header's request)."""
    pairs = [(key, v) for key, value in query.items() for v in (value if isinstance(value, list) else [value])]
    view = url_state.view_of(urlencode(pairs))
    if view is None or view["prompt"] is None:
        return None
    return make_request(view["name"], view["checkpoint"], view["compare"], view["prompt"], run=None)
