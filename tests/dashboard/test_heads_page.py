"""The Heads page in headless Chromium: it draws what dynalens.circuits and dynalens.probes compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynalens.dashboard.app import create_app

import dynalens as dl
from tests.tolerances import assert_close

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

PROMPT = "0 5 9 1 5 7 12 2 7 4 5 9"


def as_array(rows: list) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def test_heads_page_draws_scores_and_the_top_heads_pattern(dash_duo, tmp_path, screenshot, wait_title, record_progress):
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/heads")
    progress = record_progress("heads-grid-progress")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()
    model = dl.load("attn2l-induction")
    expected = dl.circuits.HeadScores()(model, dl.circuits.repeated_tokens(model, half_len=16))

    fig = wait_title("heads-grid", "induction scores")
    assert_close(as_array(fig["traces"][0]["z"]), expected.induction.double().numpy())
    top = expected.top(1).iloc[0]
    layer, head = int(top["layer"]), int(top["head"])
    assert layer == 1  # the retrained model's induction heads read a layer-0 previous-token head
    message = f"Top induction head: L{layer}H{head} ({top['induction']:.2f})"
    dash_duo.wait_for_contains_text("#heads-grid-message", message, timeout=120)
    shown = progress.shown_then_hidden()
    assert shown and all(s["label"].startswith(("Starting", "Attention patterns of 8 repeated")) for s in shown)

    # Until a cell is clicked, the pattern panel shows the top induction head.
    fig = wait_title("heads-pattern", f"Layer {layer} mixer")
    tokens = torch.tensor([[int(t) for t in PROMPT.split()]])
    pattern = dl.probes.MixerMatrix(layer=layer)(model, tokens).matrix(0)[head]
    z = as_array(fig["traces"][0]["z"])
    assert_close(np.nan_to_num(z), pattern.double().tril().numpy())

    dash_duo.find_elements("#heads-kind input")[2].click()  # copying
    fig = wait_title("heads-grid", "copying scores")
    copying = dl.circuits.CopyingScores()(model).scores
    assert_close(as_array(fig["traces"][0]["z"]), copying.double().numpy())

    # A click on a grid cell shows that head's pattern: the previous-token head of layer 0
    dash_duo.find_elements("#heads-kind input")[1].click()  # prev-token
    wait_title("heads-grid", "prev-token scores")
    previous = int(expected.prev_token[0].argmax())
    dash_duo.driver.execute_script(
        "const plot = document.querySelector('#heads-grid .js-plotly-plot');"
        "plot.emit('plotly_click', {points: [{curveNumber: 0, x: arguments[0], y: 0}]});",
        previous,
    )
    fig = wait_title("heads-pattern", "Layer 0 mixer")
    pattern = dl.probes.MixerMatrix(layer=0)(model, tokens).matrix(0)[previous]
    assert_close(np.nan_to_num(as_array(fig["traces"][0]["z"])), pattern.double().tril().numpy())
    assert dash_duo.get_logs() in ([], None)
    screenshot("heads-attn2l")
