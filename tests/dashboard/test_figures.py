"""Every page's figures in headless Chromium: never an empty plot frame, and downloads that equal the library's.

One small transformer (attn2l-induction) and a prompt of token ids visit every
page; each page is saved as ``tests/artifacts/dashboard-page-<name>.png``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from dash.testing.wait import until
from selenium.common.exceptions import StaleElementReferenceException
from dynalens.dashboard.app import create_app
from dynalens.probes.results import Result

import dynalens as dl
from tests.tolerances import assert_close, tolerance

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

MODEL = "attn2l-induction"
PROMPT = "0 5 9 1 5 7 12 2 7 4 5 9"
TIMEOUT = 120

PAGES = {"Explorer": "/", "Activations": "/activations", "Dynamics": "/dynamics", "Heads": "/heads",
         "Circuit": "/circuit", "Steering": "/steering"}  # fmt: skip

SHOWN = ".page-box:not(.page-hidden)"
"""The box of the page shown (visited pages stay mounted, hidden)."""

GRAPHS = f"""
return Array.from(document.querySelectorAll('{SHOWN} .dash-graph')).map(g => {{
  const plot = g.querySelector('.js-plotly-plot');
  const box = g.closest('.figure-box');
  const card = g.closest('.card');
  const message = card && card.querySelector('.panel-message');
  const note = box && box.querySelector('.empty-note');
  return {{id: g.id, traces: plot && plot._fullData ? plot._fullData.length : 0,
          visible: g.checkVisibility({{visibilityProperty: true}}) && g.getBoundingClientRect().height > 0,
          note: note && note.checkVisibility() ? note.innerText : '',
          message: message ? message.innerText : ''}};
}});
"""


def settle(dash_duo) -> None:
    """Wait until no callback is pending."""
    until(lambda: not dash_duo.redux_state_is_loading, timeout=TIMEOUT, msg="callbacks never settled")


def click_nav(dash_duo, path: str) -> None:
    """Click the top bar's link to ``path`` (its query string carries the request; the bar re-renders meanwhile)."""
    selector = f".nav-link[href='{path}'], .nav-link[href^='{path}?']"

    def clicked() -> bool:
        try:
            dash_duo.find_element(selector).click()
        except StaleElementReferenceException:
            return False
        return True

    until(clicked, timeout=TIMEOUT, msg=f"the link to {path} never held still")


def full_page_screenshot(dash_duo, screenshot, name: str) -> None:
    """The whole page (the window made as tall as the document) as ``dashboard-page-<name>.png``."""
    height = dash_duo.driver.execute_script("return document.documentElement.scrollHeight;")
    dash_duo.driver.set_window_size(1440, max(900, min(int(height), 4000)))
    screenshot(f"page-{name}")
    dash_duo.driver.set_window_size(1440, 1100)


def open_app(dash_duo, tmp_path) -> None:
    dash_duo.driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    dash_duo.start_server(create_app(default_model=MODEL, cache_dir=tmp_path / "cache"))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/activations")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()


def test_no_page_shows_an_empty_plot_frame(dash_duo, tmp_path, screenshot):
    """Each page, fresh and once its analyses ran: a shown graph has traces; a hidden one is explained."""
    dash_duo.start_server(create_app(default_model=MODEL, cache_dir=tmp_path / "cache"))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/steering")
    until(lambda: dash_duo.driver.execute_script(GRAPHS), timeout=TIMEOUT, msg="the page never drew its graphs")
    fresh = dash_duo.driver.execute_script(GRAPHS)  # before the default prompt is read (English: no tokenizer)
    assert all(not g["visible"] for g in fresh if not g["traces"])
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()
    seen = {}
    for name, path in PAGES.items():
        click_nav(dash_duo, path)
        dash_duo.wait_for_contains_text(f"{SHOWN} .status", MODEL, timeout=TIMEOUT)
        settle(dash_duo)
        graphs = dash_duo.driver.execute_script(GRAPHS)
        assert graphs, f"{name} has no graph"
        for graph in graphs:
            if graph["visible"]:
                assert graph["traces"] > 0, f"{name}: {graph['id']} shows an empty plot frame"
            else:
                assert graph["note"] or graph["message"], f"{name}: {graph['id']} is hidden with nothing said"
        seen[name] = {g["id"]: g for g in graphs}
        full_page_screenshot(dash_duo, screenshot, name.lower())
    # the panels that do not apply to a transformer say what to pick instead, and draw nothing
    for page, graph, text in [("Dynamics", "dynamics-regimes", "Mamba"), ("Dynamics", "dynamics-phase", "RNN"),
                              ("Steering", "steering-weights", "controller")]:  # fmt: skip
        shown = seen[page][graph]
        assert not shown["visible"] and text in shown["note"] + shown["message"]
    assert all(seen["Activations"][g]["visible"] for g in ("activations-map", "activations-sinks"))
    assert seen["Circuit"]["circuit-graph"]["visible"]
    assert dash_duo.get_logs() in ([], None)


def test_downloads_equal_the_library(dash_duo, tmp_path, wait_title, figure_in):
    """The sinks panel's CSV is ExtremeTokens' to_frame(), its Result file loads back; the heatmap is SinkScores."""
    open_app(dash_duo, tmp_path)
    model, tokens = dl.load(MODEL), torch.tensor([[int(t) for t in PROMPT.split()]])
    expected = dl.probes.ExtremeTokens()(model, tokens)
    fig = wait_title("activations-sinks", "Attention on token 0")
    heatmap = np.array([[np.nan if v is None else v for v in row] for row in fig["traces"][0]["z"]], dtype=float)
    assert_close(heatmap, dl.probes.SinkScores()(model, tokens).mean.double().numpy())
    dash_duo.wait_for_contains_text("#activations-sinks-message", "heads are sinks", timeout=TIMEOUT)
    until(lambda: dash_duo.find_element("#activations-sinks-csv").is_enabled(), timeout=TIMEOUT,
          msg="the sinks' downloads were never offered")  # fmt: skip

    dash_duo.find_element("#activations-sinks-csv").click()
    until(lambda: (tmp_path / "extreme_tokens.csv").is_file(), timeout=30, msg="no CSV download")
    frame = pd.read_csv(tmp_path / "extreme_tokens.csv")
    rtol, atol = tolerance(torch.float32)
    pd.testing.assert_frame_equal(frame, expected.to_frame(), check_dtype=False, rtol=rtol, atol=atol)

    dash_duo.find_element("#activations-sinks-result").click()
    until(lambda: (tmp_path / "extreme_tokens.safetensors").is_file(), timeout=30, msg="no Result download")
    loaded = Result.load(tmp_path / "extreme_tokens.safetensors")
    assert type(loaded) is type(expected) and loaded.model_name == expected.model_name
    assert_close(loaded.sink_scores, expected.sink_scores)
    assert torch.equal(loaded.prompts.tokens, tokens)

    dash_duo.find_element("#activations-map-csv").click()  # every panel offers its own Result
    until(lambda: (tmp_path / "massive_activations.csv").is_file(), timeout=30, msg="no CSV of the map")
    massive = dl.probes.MassiveActivations()(model, tokens).to_frame()
    frame = pd.read_csv(tmp_path / "massive_activations.csv", dtype={"token": str})
    pd.testing.assert_frame_equal(frame, massive, check_dtype=False, rtol=rtol, atol=atol)
    assert dash_duo.get_logs() in ([], None)
