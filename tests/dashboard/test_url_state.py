"""The view in the URL: the query string names the request and the page's selections, and reads back the same."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pytest
from dash import dcc, html
from dash.testing.wait import until
from dynalens.dashboard import layout, url_state
from dynalens.dashboard.app import create_app

import dynalens as dl

PROMPT = "0 5 9 1 5 7 12 2 7 4 5 9"
TIMEOUT = 120


@pytest.mark.parametrize("prompt", ["1 2 3", "a & b = c?\nnext line: «café» 100%", ""])
def test_request_round_trips_through_the_query_string(prompt):
    request = {"name": "/runs/my model", "checkpoint": 17, "compare": ["mamba-ar", "x,y"], "prompt": prompt}
    assert url_state.view_of(url_state.search_of(request)) == request
    plain = {**request, "checkpoint": None, "compare": []}
    assert url_state.view_of(url_state.search_of(plain)) == plain
    assert url_state.view_of("?prompt=only") is None  # no model: the controls' own values
    assert url_state.view_of("?model=m&checkpoint=latest")["checkpoint"] is None


def test_selections_decode_to_their_controls_types():
    for value, default in [("copying", "induction"), (3, 0), (["log"], []), (2, None), ([], ["log"])]:
        assert url_state.decode(url_state.encode(value), default) == value
    assert url_state.decode("not json", 0) == 0
    assert url_state.decode('"text"', 0) == 0  # a string where a number is expected: the control's default
    page = html.Div([dcc.RadioItems(id="kind", options=["a", "b"], value="a"),
                     html.Div(dcc.Input(id="layer", type="number", value=0)), dcc.Input(id="free", value="x")])
    url_state.restore(page, {"kind": "b", "layer": ["1", "4"], "free": "y", "model": "m"}, {"kind": "a", "layer": 0})
    assert page.children[0].value == "b" and page.children[1].children.value == 4
    assert page.children[2].value == "x"  # not a declared selection


def test_a_request_names_its_checkpoints_folder():
    (step, folder), *_ = dl.models.zoo.checkpoints("attn2l-induction")[3:]
    request = layout.make_request("attn2l-induction", step, ["attn2l-induction", "lstm-hmm"], "1 2", 1)
    assert request["model"] == str(folder) and request["checkpoint"] == step
    assert request["compare"] == ["lstm-hmm"]  # the model itself is not compared with itself
    assert layout.make_request("attn2l-induction", 123456, [], "1 2", 1)["model"] == "attn2l-induction"
    assert layout.make_request("/no/such/run", 3, [], "1 2", 1)["checkpoint"] is None  # no checkpoint series
    assert layout.model_label(str(folder)) == f"attn2l-induction @ step {step}"
    value, top, marks, style = layout.slider_of(request)
    assert marks[value] == str(step) and marks[top] == "final" and style["display"] != "none"


def heads_grid(dash_duo, figure_in, title: str) -> np.ndarray:
    until(lambda: title in ((figure_in("heads-grid") or {}).get("title") or ""), timeout=TIMEOUT,
          msg=f"the grid never showed {title!r}")  # fmt: skip
    return np.array([[np.nan if v is None else v for v in row] for row in figure_in("heads-grid")["traces"][0]["z"]])


@pytest.mark.browser
@pytest.mark.xdist_group("browser")
def test_a_pasted_link_shows_the_same_view(dash_duo, tmp_path, figure_in):
    step, folder = dl.models.zoo.checkpoints("attn2l-induction")[15]
    model = dl.load(folder)
    dash_duo.start_server(create_app(default_model="lstm-hmm", cache_dir=tmp_path))  # the URL names another model
    query = {"model": "attn2l-induction", "checkpoint": step, "prompt": PROMPT, "heads-kind": "prev_token"}
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/heads?{urlencode(query)}")

    grid = heads_grid(dash_duo, figure_in, "prev-token scores")
    half_len = min(20, (model.cfg.n_ctx - 1) // 2)
    expected = dl.circuits.HeadScores()(model, dl.circuits.repeated_tokens(model, half_len=half_len))
    np.testing.assert_allclose(grid, expected.prev_token.double().numpy(), rtol=1e-5, atol=1e-7)
    assert dash_duo.find_element("#prompt").get_attribute("value") == PROMPT
    assert "attn2l-induction" in dash_duo.find_element("#model-name").text
    index = int(dash_duo.find_element("#checkpoint-box [role='slider']").get_attribute("aria-valuenow"))
    assert index == 15

    dash_duo.find_elements("#heads-kind input")[2].click()  # copying
    until(lambda: "heads-kind=copying" in dash_duo.driver.current_url, timeout=TIMEOUT,
          msg="the selection never reached the URL")  # fmt: skip
    link = dash_duo.driver.current_url
    grid = heads_grid(dash_duo, figure_in, "copying scores")

    dash_duo.driver.get("about:blank")
    dash_duo.wait_for_page(url=link)  # a reload of the pasted link
    np.testing.assert_allclose(heads_grid(dash_duo, figure_in, "copying scores"), grid, rtol=1e-6)
    np.testing.assert_allclose(grid, dl.circuits.CopyingScores()(model).scores.double().numpy(), rtol=1e-4)
    assert dash_duo.find_elements("#heads-kind input")[2].is_selected()
    assert dash_duo.find_element("#prompt").get_attribute("value") == PROMPT
    assert f"checkpoint={step}" in dash_duo.driver.current_url
    assert "model=attn2l-induction" in dash_duo.driver.current_url
    assert dash_duo.get_logs() in ([], None)
