"""The Dynamics page in headless Chromium: it draws exactly what dynalens.probes computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dash.testing.wait import until
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app
from dynalens.models.rnn import HookedRNN, RNNConfig

import dynalens as dl

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

TIMEOUT = 120
PROMPT = "3 14 15 9 2 6 5 35"


@pytest.fixture(scope="module")
def tiny_lstm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random 1-layer LSTM (no tokenizer) saved as a HookedRNN folder."""
    torch.manual_seed(0)
    model = HookedRNN(RNNConfig(d_model=8, n_layers=1, d_vocab=64, cell="lstm"))
    folder = tmp_path_factory.mktemp("tiny-lstm")
    model.save_pretrained(folder)
    return folder


def open_page(dash_duo, model: str, cache_dir: Path) -> None:
    dash_duo.start_server(create_app(default_model=model, cache_dir=cache_dir))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/dynamics")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()


def tokens() -> torch.Tensor:
    return torch.tensor([[int(t) for t in PROMPT.split()]])


def test_dynamics_page_on_mamba_draws_trajectories_regimes_and_a_mixer_comparison(
    dash_duo, figure_in, wait_title, tiny_mamba_dir, tiny_lstm_dir, tmp_path, screenshot
):
    open_page(dash_duo, str(tiny_mamba_dir), tmp_path)
    model = dl.load(tiny_mamba_dir)

    fig = wait_title("dynamics-trajectories", "Token norm trajectories")
    expected = dl.probes.TokenTrajectories()(model, tokens())
    for p, trace in enumerate(fig["traces"]):
        np.testing.assert_allclose(trace["y"], expected.norms[0, p].numpy(), rtol=1e-5)

    wait_title("dynamics-regimes", "Token-dynamics regime per layer")
    regimes = dl.probes.MambaRegimes()(model).regimes
    rows = dash_duo.find_elements("#dynamics-regime-table-rows tr")[1:]
    assert [row.find_elements("css selector", "td")[1].text for row in rows] == regimes

    wait_title("dynamics-mixers", "Layer 0 mixers")
    dash_duo.wait_for_contains_text("#dynamics-mixers-message", "state bound 8", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#dynamics-phase-message", "pick an RNN", timeout=TIMEOUT)

    dash_duo.find_element("#dynamics-compare").send_keys(str(tiny_lstm_dir) + "\n")
    until(lambda: len((figure_in("dynamics-mixers") or {}).get("traces") or []) == 2, timeout=TIMEOUT,
          msg="the comparison never showed two mixers")  # fmt: skip
    dash_duo.wait_for_contains_text("#dynamics-mixers-message", "state bound 16", timeout=TIMEOUT)  # LSTM: (h, c)
    assert dash_duo.get_logs() in ([], None)
    screenshot("dynamics-mamba")


def test_dynamics_page_on_an_rnn_draws_the_phase_portrait(dash_duo, wait_title, tiny_lstm_dir, tmp_path, screenshot):
    served = backend.load_model(str(tiny_lstm_dir))  # the server's copy: count its forward passes
    forwards: list[int] = []
    handle = served.hook_dict[dl.names.EMBED].register_forward_hook(lambda mod, args, out: forwards.append(1))
    open_page(dash_duo, str(tiny_lstm_dir), tmp_path)
    model = dl.load(tiny_lstm_dir)
    fig = wait_title("dynamics-phase", "Phase portrait")
    wait_title("dynamics-trajectories", "Token norm trajectories")
    wait_title("dynamics-mixers", "Layer 0 mixers")
    handle.remove()
    assert forwards == [1]  # trajectories, the mixer comparison and the phase portrait share one forward
    expected = dl.probes.TrajectoryPCA(layer=0)(model, tokens()).coords[0]  # [pos, component]
    trajectory = fig["traces"][0]
    signs = np.sign(np.array(trajectory["x"]) @ expected[:, 0].double().numpy())
    np.testing.assert_allclose(np.array(trajectory["x"]) * signs, expected[:, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert fig["traces"][1]["name"] == "fixed points"
    dash_duo.wait_for_contains_text("#dynamics-phase-message", "stable", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#dynamics-regimes-message", "pick a Mamba", timeout=TIMEOUT)
    screenshot("dynamics-lstm")
