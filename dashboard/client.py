"""Drive a served dashboard's callbacks over HTTP, as a browser tab does (for tests and benchmarks).

A :class:`Tab` loads the page once (Dash signs a token per page load that
background-job handles are bound to), then :meth:`Tab.call` posts one
callback's inputs to ``_dash-update-component`` and, for a background
callback, polls its job until the result is there, like the page's renderer.

>>> tab = Tab("http://127.0.0.1:8050/")                                            # doctest: +SKIP
>>> answer = tab.call("heads-grid.figure", {("request", "data"): {"model": "mamba-ar", "prompt": "1 2 3"}},
...                   {("heads-grid-progress-key", "data"): "tab-1"})              # doctest: +SKIP
>>> answer.outputs["heads-grid"]["figure"], answer.seconds, answer.polls           # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

from dynalens.dashboard.backend import JOB_POLL_MS

_CONFIG = re.compile(r'<script id="_dash-config" type="application/json">(.*?)</script>', re.S)


@dataclass(frozen=True)
class Answer:
    """One callback's answer: ``outputs[id][prop]``, wall seconds from the first request, job polls made."""

    outputs: dict[str, dict[str, Any]]
    seconds: float
    polls: int


class Tab:
    """One page load of the dashboard at ``url``: its signed page token and the app's callbacks.

    Parameters
    ----------
    url : str
        The dashboard's address, e.g. ``"http://127.0.0.1:8050/"``.
    timeout : float
        Seconds one callback may take, polls included, before :class:`TimeoutError`.
    """

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        self.url, self.timeout = url.rstrip("/") + "/", timeout
        self.session = requests.Session()
        page = self.session.get(self.url, timeout=timeout)
        page.raise_for_status()
        found = _CONFIG.search(page.text)
        if found is None:
            raise ValueError(f"{self.url} is not a Dash page (no _dash-config)")
        self.end_id = json.loads(found.group(1))["end_id"]
        self.callbacks = {c["output"]: c for c in self._get("_dash-dependencies")}

    def _get(self, path: str) -> Any:
        answer = self.session.get(self.url + path, timeout=self.timeout)
        answer.raise_for_status()
        return answer.json()

    def call(
        self,
        output: str,
        inputs: Mapping[tuple[str, str], Any],
        state: Mapping[tuple[str, str], Any] | None = None,
    ) -> Answer:
        """Run the callback that writes ``output`` (``"id.prop"``, any one of its outputs), and the one it starts.

        When the answer writes the first input of another server callback whose
        other inputs and states are all known (a long callback that did not
        answer at once starts its background job that way, see
        ``ProgressBar.callback``), that callback runs next, as the renderer
        would; its outputs join the answer.

        Parameters
        ----------
        output : str
            One output of the callback, ``"component-id.property"``.
        inputs, state : mapping
            ``{(component id, property): value}`` for each of the callback's
            inputs and states (the first input is the one that changed).

        Raises
        ------
        KeyError
            When no callback writes ``output``.
        requests.HTTPError
            When the server answers an error (a callback that raised).
        """
        key = next((k for k in self.callbacks if output in _outputs(k)), None)
        if key is None:
            raise KeyError(f"no callback writes {output!r}")
        known = {**dict(state or {}), **inputs}
        start = time.perf_counter()
        outputs, polls = self._post(key, known, next(iter(inputs), None))
        written = {(i, p): v for i, props in outputs.items() for p, v in props.items()}
        follow = self._follow_up(key, written, known)
        if follow is not None:  # the answer started a callback that listens to it (a long callback's job)
            more, polls = self._post(follow, {**known, **written}, None)
            outputs = {**outputs, **more}
        return Answer(outputs, time.perf_counter() - start, polls)

    def _follow_up(self, key: str, written: Mapping[tuple[str, str], Any],
                   known: Mapping[tuple[str, str], Any]) -> str | None:  # fmt: skip
        """The server callback the renderer runs next: its first input is one ``key``'s answer wrote, and
        every other input and state is known."""
        for other, spec in self.callbacks.items():
            if other == key or spec.get("clientside_function") or _first_input(spec) not in written:
                continue
            if all((d["id"], d["property"]) in {**known, **written} for d in [*spec["inputs"], *spec["state"]]):
                return other
        return None

    def _post(self, key: str, values: Mapping[tuple[str, str], Any],
              changed: tuple[str, str] | None) -> tuple[dict, int]:  # fmt: skip
        """Post callback ``key`` (``changed``: the input that changed, else its first) with ``values`` for its
        inputs and states, poll its job if it starts one; its outputs by component id, the polls made."""
        spec = self.callbacks[key]
        outs = [{"id": i, "property": p} for i, p in (o.rsplit(".", 1) for o in _outputs(key))]
        body = {
            "output": key,
            "outputs": outs if key.startswith("..") else outs[0],
            "inputs": [{"id": i["id"], "property": i["property"], "value": values[(i["id"], i["property"])]}
                       for i in spec["inputs"]],
            "changedPropIds": [".".join(changed or _first_input(spec))],
            "state": [{"id": s["id"], "property": s["property"], "value": values[(s["id"], s["property"])]}
                      for s in spec["state"]],
        }  # fmt: skip
        start, params, polls = time.perf_counter(), {"endId": self.end_id}, 0
        while True:
            answer = self.session.post(self.url + "_dash-update-component", params=params, json=body,
                                       timeout=self.timeout)  # fmt: skip
            if answer.status_code == 204:  # PreventUpdate
                return {}, polls
            answer.raise_for_status()
            data = answer.json()
            if "response" in data:
                return data["response"], polls
            if "cacheKey" in data:  # a background job started: poll it with its handles, as the renderer does
                params = {"endId": self.end_id, "cacheKey": data["cacheKey"], "job": data["job"]}
            if time.perf_counter() - start > self.timeout:
                raise TimeoutError(f"{key} gave no answer in {self.timeout} s")
            polls += 1
            time.sleep(JOB_POLL_MS / 1000)


def _first_input(spec: Mapping[str, Any]) -> tuple[str, str]:
    """``(id, property)`` of a callback's first input."""
    return spec["inputs"][0]["id"], spec["inputs"][0]["property"]


def _outputs(key: str) -> list[str]:
    """The ``"id.prop"`` outputs of a callback key (``"a.b"`` or ``"..a.b...c.d.."``)."""
    return key.strip(".").split("...") if key.startswith("..") else [key]
