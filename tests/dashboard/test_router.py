"""Visited pages stay mounted (``dashboard/router.py``): shown again without a rebuild, redrawn in place for a new view."""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlencode

import dash
import pytest
from dash.testing.wait import until

from dynalens.dashboard import router, url_state
from dynalens.dashboard.app import create_app

MODEL, TIMEOUT = "attn2l-induction", 120
FIRST, SECOND = "0 5 9 1 5 7 12 2 7 4 5 9", "3 1 4 1 5 9 2 6"  # 12 and 8 tokens

BOX = "const box = document.getElementById(arguments[0]); return box && box.className;"
STATUS = "const s = document.getElementById(arguments[0]); return s ? s.textContent : null;"
MARK = """
const plot = document.querySelector(`#${arguments[0]} .js-plotly-plot`);
window.__dlMarked = {plot: plot, trace: plot && plot._fullData[0]};
"""
SAME = """
const plot = document.querySelector(`#${arguments[0]} .js-plotly-plot`);
return [plot === window.__dlMarked.plot, plot._fullData[0] === window.__dlMarked.trace];
"""


def test_every_page_has_its_own_component_ids(tmp_path):
    """All visited pages are in the document at once: no id may appear on two pages or in the shell and a page."""
    app = create_app(cache_dir=tmp_path)
    app.server.test_client().get("/")  # Dash imports the pages on the first request
    owner: Counter = Counter(c.id for c in url_state.walk(app.layout) if isinstance(getattr(c, "id", None), str))
    with app.server.test_request_context():
        for page in dash.page_registry.values():
            owner.update({c.id for c in url_state.walk(page["layout"]()) if isinstance(getattr(c, "id", None), str)})
    assert [id for id, n in owner.items() if n > 1] == []
    assert {router.box_id(m) for m in dash.page_registry} <= set(owner)


def shown(dash_duo, module: str) -> None:
    until(lambda: dash_duo.driver.execute_script(BOX, router.box_id(module)) == router.SHOWN, timeout=TIMEOUT,
          msg=f"{module} never showed")  # fmt: skip


def status_says(dash_duo, page: str, text: str) -> None:
    until(lambda: text in (dash_duo.driver.execute_script(STATUS, f"{page}-status") or ""), timeout=TIMEOUT,
          msg=f"{page}'s status never said {text!r}")  # fmt: skip
    until(lambda: not dash_duo.redux_state_is_loading, timeout=TIMEOUT, msg="callbacks never settled")


def follow(dash_duo, path: str) -> None:
    """Click the top bar's link to ``path`` (a client-side page switch)."""
    dash_duo.driver.execute_script(
        "document.querySelector(`a.nav-link[href='${arguments[0]}'], a.nav-link[href^='${arguments[0]}?']`).click();",
        path,
    )


@pytest.mark.browser
@pytest.mark.xdist_group("browser")
def test_a_page_stays_mounted_while_it_shows_the_same_view(dash_duo, tmp_path):
    explorer, activations = "dynalens.dashboard.pages.explorer", "dynalens.dashboard.pages.activations"
    dash_duo.start_server(create_app(default_model=MODEL, cache_dir=tmp_path))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/activations?{urlencode({'model': MODEL, 'prompt': FIRST})}")
    shown(dash_duo, activations)
    status_says(dash_duo, "activations", "12 tokens")

    follow(dash_duo, "/")
    shown(dash_duo, explorer)
    assert dash_duo.driver.execute_script(BOX, router.box_id(activations)) == router.HIDDEN
    status_says(dash_duo, "explorer", "12 tokens")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(SECOND)
    dash_duo.find_element("#analyse").click()
    status_says(dash_duo, "explorer", "8 tokens")
    # the hidden page computed nothing: it still shows the first prompt
    assert "12 tokens" in dash_duo.driver.execute_script(STATUS, "activations-status")
    dash_duo.driver.execute_script(MARK, router.box_id(activations))

    follow(dash_duo, "/activations")  # it shows another view: the same graph redrawn in place for the second prompt
    status_says(dash_duo, "activations", "8 tokens")
    shown(dash_duo, activations)
    assert dash_duo.driver.execute_script(SAME, router.box_id(activations)) == [True, False]
    dash_duo.driver.execute_script(MARK, router.box_id(explorer))
    assert dash_duo.driver.execute_script(BOX, router.box_id(explorer)) == router.HIDDEN
    dash_duo.find_elements("#activations-map-view input")[1].click()  # a selection, written to the URL
    until(lambda: "activations-map-view=layers" in dash_duo.driver.current_url, timeout=TIMEOUT,
          msg="the selection never reached the URL")  # fmt: skip

    follow(dash_duo, "/")  # the same view: the box is shown as it was, the figure not drawn again
    shown(dash_duo, explorer)
    assert dash_duo.driver.execute_script(SAME, router.box_id(explorer)) == [True, True]
    assert dash_duo.driver.title == dash.page_registry[explorer]["title"]
    assert "activations-map-view" not in dash_duo.driver.current_url

    follow(dash_duo, "/activations")  # shown again with its selection, which returns to the URL
    shown(dash_duo, activations)
    assert dash_duo.find_elements("#activations-map-view input")[1].is_selected()
    until(lambda: "activations-map-view=layers" in dash_duo.driver.current_url, timeout=TIMEOUT,
          msg="the shown page's selection never returned to the URL")  # fmt: skip

    dash_duo.driver.get(f"{dash_duo.server_url}/no-such-page")
    until(lambda: dash_duo.driver.execute_script(BOX, router.NOT_FOUND) == router.SHOWN, timeout=TIMEOUT,
          msg="an unknown path never said so")  # fmt: skip
    assert "Page not found" in dash_duo.find_element(f"#{router.NOT_FOUND}").text
    assert dash_duo.get_logs() in ([], None)
