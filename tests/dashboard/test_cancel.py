"""Cancel in headless Chromium: a long analysis stops, the page says so, and the next request works."""

from __future__ import annotations

import time

import pytest
from dash.testing.wait import until

from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app
from dynalens.models import names

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

MODEL = "attn2l-induction"
SLOW_S = 1.5  # per block of a forward over the head-score workload


@pytest.fixture
def slow_scores():
    """The server's model sleeps ``SLOW_S`` after each block when it reads a batch (the Heads page's workload)."""
    model = backend.load_model(MODEL)  # the model the in-process server uses
    handles = [
        model.hook_dict[names.resid_post(layer)].register_forward_hook(
            lambda module, args, out: time.sleep(SLOW_S) if out.shape[0] > 1 else None
        )
        for layer in range(model.cfg.n_layers)
    ]
    yield handles
    for handle in handles:
        handle.remove()


def test_a_cancelled_analysis_says_so_and_the_next_one_runs(dash_duo, tmp_path, screenshot, wait_title, slow_scores):
    dash_duo.start_server(create_app(default_model=MODEL, cache_dir=tmp_path))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/heads")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys("0 5 9 1 5 7 12 2")
    dash_duo.find_element("#analyse").click()

    cancel = "#heads-grid-progress-cancel"
    until(lambda: dash_duo.find_element("#heads-grid-progress").is_displayed()
          and dash_duo.find_element(cancel).is_enabled(), timeout=120, msg="the job never showed its bar")  # fmt: skip
    time.sleep(0.5)  # into the slow forward (or waiting for the models behind the pattern panel)
    start = time.perf_counter()
    dash_duo.find_element(cancel).click()
    dash_duo.wait_for_contains_text("#heads-grid-message", "Cancelled", timeout=60)
    stopped = time.perf_counter() - start
    until(lambda: not dash_duo.find_element("#heads-grid-progress").is_displayed(), timeout=10,
          msg="the bar stayed after the cancel")  # fmt: skip
    assert stopped < 2 * SLOW_S + 5  # within the block it was in, plus a poll or two
    screenshot("cancelled")

    for handle in slow_scores:  # the next request runs at full speed and finishes
        handle.remove()
    dash_duo.find_element("#analyse").click()
    wait_title("heads-grid", "induction scores")
    dash_duo.wait_for_contains_text("#heads-grid-message", "Top induction head", timeout=120)
    assert "Cancelled" not in dash_duo.find_element("#heads-grid-message").text
