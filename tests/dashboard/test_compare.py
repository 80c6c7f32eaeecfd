"""The side-by-side view in headless Chromium: each column draws what dynalens computes for its model."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import torch
from dash.testing.wait import until
from dynalens.dashboard.app import create_app
from dynalens.models.mamba import HookedMamba, MambaConfig

import dynalens as dl

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

PROMPT = "0 5 9 1 5 7 12 2 7 4 5 9"
TIMEOUT = 120


def as_array(rows: list) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def workload(model) -> "dl.Prompts":
    """The Heads page's workload: repeated random tokens, 20 per repeat or fewer for a short context."""
    half_len = min(20, ((model.cfg.n_ctx or 41) - 1) // 2)
    return dl.Prompts(model, dl.circuits.repeated_tokens(model, half_len=half_len))


@pytest.fixture(scope="module")
def small_mamba_dir(tmp_path_factory) -> Path:
    """A random 2-layer HookedMamba with 16 SSM channels (its head scores are quick to compute twice)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("small-mamba")
    HookedMamba(MambaConfig(d_model=8, n_layers=2, d_vocab=32, d_state=4)).save_pretrained(folder)
    return folder


def test_heads_side_by_side_transformer_mamba_and_an_rnn(dash_duo, tmp_path, small_mamba_dir, wait_title, screenshot):
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path))
    query = urlencode([("model", "attn2l-induction"), ("compare", str(small_mamba_dir)), ("compare", "lstm-hmm"),
                       ("prompt", PROMPT)])  # fmt: skip
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/heads?{query}")

    expected = {}
    for column, source in enumerate(["attn2l-induction", small_mamba_dir]):
        model = dl.load(source)
        expected[column] = dl.circuits.HeadScores()(model, workload(model))
        fig = wait_title(f"heads-side-by-side-graph-{column}", "induction scores", timeout=TIMEOUT)
        np.testing.assert_allclose(as_array(fig["traces"][0]["z"]), expected[column].induction.double().numpy(),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip
    # The RNN has no heads: its column gives the analysis' own reason, not an empty frame.
    reason = "HeadScores needs attention patterns"
    dash_duo.wait_for_contains_text("#heads-side-by-side-reason-2", reason, timeout=TIMEOUT)
    assert "rnn" in dash_duo.find_element("#heads-side-by-side-reason-2").text
    assert not dash_duo.find_elements("#heads-side-by-side-graph-2")
    # The page's own grid (the header's model) equals the first column.
    page = wait_title("heads-grid", "induction scores", timeout=TIMEOUT)
    first = wait_title("heads-side-by-side-graph-0", "induction scores")
    np.testing.assert_allclose(as_array(page["traces"][0]["z"]), as_array(first["traces"][0]["z"]), rtol=0, atol=0)

    dash_duo.find_elements("#heads-kind input")[1].click()  # prev-token: every column follows the page's selection
    fig = wait_title("heads-side-by-side-graph-1", "prev-token scores", timeout=TIMEOUT)
    np.testing.assert_allclose(as_array(fig["traces"][0]["z"]), expected[1].prev_token.double().numpy(),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    screenshot("compare-heads")
    assert dash_duo.get_logs() in ([], None)


def test_two_checkpoints_side_by_side_and_a_page_without_one(dash_duo, tmp_path, wait_title):
    early = dl.models.zoo.checkpoints("attn2l-induction")[2][1]
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path))
    query = urlencode([("model", "attn2l-induction"), ("compare", str(early)), ("prompt", PROMPT)])
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/dynamics?{query}")
    tokens = [[int(t) for t in PROMPT.split()]]
    for column, source in enumerate(["attn2l-induction", early]):
        fig = wait_title(f"dynamics-side-by-side-graph-{column}", "Token norm trajectories", timeout=TIMEOUT)
        expected = dl.probes.TokenTrajectories()(dl.load(source), tokens).norms[0]
        for p, trace in enumerate(fig["traces"]):
            np.testing.assert_allclose(trace["y"], expected[p].numpy(), rtol=1e-5)
    assert "step 2" in dash_duo.find_element("#dynamics-side-by-side").text
    dash_duo.find_element("a.nav-link[href^='/circuit']").click()
    dash_duo.wait_for_contains_text("#compare-note", "no side-by-side view", timeout=TIMEOUT)
    until(lambda: "compare=" in dash_duo.driver.current_url, timeout=10, msg="the link dropped the compared model")


def test_checkpoint_slider_shows_that_checkpoints_result(dash_duo, tmp_path, wait_title):
    from selenium.webdriver.common.keys import Keys

    series = dl.models.zoo.checkpoints("attn2l-induction")
    dash_duo.start_server(create_app(default_model="attn2l-induction", cache_dir=tmp_path))
    query = urlencode({"model": "attn2l-induction", "prompt": PROMPT})
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/heads?{query}")
    final = wait_title("heads-grid", "induction scores", timeout=TIMEOUT)
    handle = dash_duo.find_element("#checkpoint-box [role='slider']")
    assert int(handle.get_attribute("aria-valuenow")) == len(series)  # the model itself ("final")
    handle.send_keys(Keys.HOME)  # the first checkpoint: no induction head yet
    for index in (0, 14):
        step, folder = series[index]
        expected = dl.circuits.HeadScores()(dl.load(folder), workload(dl.load(folder))).induction.double().numpy()
        until(lambda: f"checkpoint={step}" in dash_duo.driver.current_url, timeout=TIMEOUT,
              msg=f"the URL never named checkpoint {step}")  # fmt: skip
        shown = lambda: as_array(wait_title("heads-grid", "induction scores")["traces"][0]["z"])  # noqa: E731
        until(lambda: np.allclose(shown(), expected, rtol=1e-5, atol=1e-7), timeout=TIMEOUT,
              msg=f"the grid never showed step {step}")  # fmt: skip
        handle.send_keys(*[Keys.ARROW_RIGHT] * 14)
    assert not np.allclose(as_array(final["traces"][0]["z"]), expected, atol=1e-3)  # the checkpoints differ
    handle.send_keys(Keys.END)
    until(lambda: "checkpoint=" not in dash_duo.driver.current_url, timeout=TIMEOUT, msg="END never showed the model")
