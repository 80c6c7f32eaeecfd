"""The dashboard's view in its URL: ``/<page>?model=...&checkpoint=...&compare=...&prompt=...&<control id>=<value>``.

The shell's request (the model, its checkpoint, the models compared with it,
the prompt) and each page's declared selections (the ``value`` of its
controls, by component id) are written into the query string whenever they
change, with ``history.replaceState`` (``assets/url_state.js``): nothing
navigates and the back button is not flooded. A reload or a pasted link
reads them back: the header's controls and the request from
:func:`view_of`, a page's controls through :func:`restore` when the page's
layout is built (Dash passes the query string to ``layout(**query)``).

>>> search_of({"name": "mamba-ar", "checkpoint": None, "compare": ["lstm-hmm"], "prompt": "1 2 3"})
'?model=mamba-ar&compare=lstm-hmm&prompt=1+2+3'
>>> view_of('?model=mamba-ar&compare=lstm-hmm&prompt=1+2+3')
{'name': 'mamba-ar', 'checkpoint': None, 'compare': ['lstm-hmm'], 'prompt': '1 2 3'}
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode

MODEL, CHECKPOINT, COMPARE, PROMPT = "model", "checkpoint", "compare", "prompt"
"""The query keys of the shell's request; every other key is a page control's id."""
HIDDEN_CLASS = "page-hidden"
"""The class of a page's box while another page shows (``router``)."""


def search_of(request: Mapping[str, Any] | None) -> str:
    """The query string (with its ``?``) naming a request's model, checkpoint, compared models and prompt."""
    if not request:
        return ""
    pairs: list[tuple[str, str]] = [(MODEL, request["name"])]
    if request.get("checkpoint") is not None:
        pairs.append((CHECKPOINT, str(request["checkpoint"])))
    pairs += [(COMPARE, str(other)) for other in request.get("compare") or []]
    pairs.append((PROMPT, request.get("prompt") or ""))
    return "?" + urlencode(pairs)


def parse(search: str | None) -> dict[str, list[str]]:
    """Every key of a query string (``?`` optional) with all of its values, blank ones kept."""
    return parse_qs((search or "").removeprefix("?"), keep_blank_values=True)


def view_of(search: str | None) -> dict[str, Any] | None:
    """The request a query string names: ``{"name", "checkpoint", "compare", "prompt"}``; None without a model.

    A checkpoint that is not an integer step is dropped (the model itself is shown);
    a missing prompt is ``None`` (keep the one in the prompt box).
    """
    query = parse(search)
    name = (query.get(MODEL) or [""])[0].strip()
    if not name:
        return None
    step = (query.get(CHECKPOINT) or [""])[0].strip()
    return {
        "name": name,
        "checkpoint": int(step) if step.isdigit() else None,
        "compare": [c for c in query.get(COMPARE, []) if c.strip()],
        "prompt": (query.get(PROMPT) or [None])[0],
    }


def encode(value: Any) -> str:
    """A control's value as one query value: a string as is, anything else as JSON (what ``url_state.js`` writes)."""
    return value if isinstance(value, str) else json.dumps(value)


def decode(text: str, default: Any) -> Any:
    """A query value back as a control's value, of the type of ``default`` (the control's own when unreadable)."""
    if isinstance(default, str):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return default
    if default is not None and not isinstance(value, type(default)):
        return default
    return value


def restore(layout: Any, query: Mapping[str, Any], selections: Mapping[str, Any]) -> Any:
    """``layout`` with the ``value`` of each control named in ``selections`` (id → default) taken from ``query``.

    ``query`` is what Dash passes to a page's ``layout(**query)``: one string per
    key (a list when the key repeats: the last one wins).
    """
    chosen = {}
    for id, default in selections.items():
        text = query.get(id)
        if text is not None:
            chosen[id] = decode(text[-1] if isinstance(text, list) else text, default)
    if chosen:
        for component in walk(layout):
            if getattr(component, "id", None) in chosen:
                component.value = chosen[component.id]
    return layout


def walk(component: Any) -> Iterator[Any]:
    """``component`` and every component below it."""
    yield component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children]:
        if hasattr(child, "to_plotly_json"):
            yield from walk(child)


WRITE_REQUEST = """
function(request) {
    if (!request) { return null; }
    return window.dynalensUrl.write({
        model: request.name,
        checkpoint: request.checkpoint === null || request.checkpoint === undefined ? null : String(request.checkpoint),
        compare: request.compare || [],
        prompt: request.prompt || ''
    });
}
"""
"""Client-side callback: the request's keys into the URL (the same keys as :func:`search_of`)."""


def write_selections(ids: list[str]) -> str:
    """Client-side callback source: the values of the controls ``ids`` (its first inputs, in order) into the URL.

    Its last input is the class of the box holding the page (``router.box_id``):
    the page writes its selections when it shows again, and not while hidden.
    """
    return (
        "function(...values) {"
        f" const ids = {json.dumps(ids)};"
        f" if (String(values[ids.length] || '').split(' ').includes({json.dumps(HIDDEN_CLASS)})) {{"
        " return window.dash_clientside.no_update; }"
        " const entries = {};"
        " ids.forEach((id, i) => { entries[id] = window.dynalensUrl.encode(values[i]); });"
        " return window.dynalensUrl.write(entries); }"
    )
