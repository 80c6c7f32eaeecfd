"""The Activations page in headless Chromium: it draws exactly what dynalens.probes computes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dash.testing.wait import until
from selenium.webdriver.common.keys import Keys

import dynalens as dl
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app
from dynalens.models.tasks import BigramBackcopyTask
from dynalens.models.train import build_model, train
from tests.tolerances import assert_close

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

TIMEOUT = 120
TASK = BigramBackcopyTask(d_vocab=16, seq_len=12)
PROMPT = "0 5 9 1 5 7 12 2 7 4"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama trained 40 steps on a small Bigram-Backcopy: final model plus 6 checkpoints."""
    model = build_model("attn-3l", TASK, seed=0, d_model=16, n_layers=2, n_heads=2, d_mlp=32)
    out = tmp_path_factory.mktemp("bbc-run")
    train(model, TASK, 40, lr=3e-3, batch_size=8, warmup=5, out=out, n_checkpoints=6, eval_size=8, progress=False)
    return out


def as_array(rows: list) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def open_page(dash_duo, model: str, cache_dir: Path) -> None:
    dash_duo.start_server(create_app(default_model=model, cache_dir=cache_dir))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/activations")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()


def test_activations_page_draws_the_probes_results(dash_duo, run_dir, tmp_path, screenshot, wait_title):
    served = backend.load_model(str(run_dir))  # the server's copy: count its forward passes
    forwards: list[int] = []
    handle = served.hook_dict[dl.names.EMBED].register_forward_hook(lambda mod, args, out: forwards.append(1))
    open_page(dash_duo, str(run_dir), tmp_path)
    model, tokens = dl.load(run_dir), torch.tensor([[int(t) for t in PROMPT.split()]])

    fig = wait_title("activations-map", "Largest magnitude per channel")
    expected = dl.probes.MassiveActivations()(model, tokens)
    assert_close(as_array(fig["traces"][0]["z"]), np.log10(expected.channel_max[0].double().numpy()))
    dash_duo.wait_for_contains_text("#activations-map-message", "No massive activation", timeout=TIMEOUT)

    fig = wait_title("activations-sinks", "Attention on token 0")
    sinks = dl.probes.ExtremeTokens()(model, tokens).sink_scores[0]  # [layer, head]
    assert_close(as_array(fig["traces"][0]["z"]), sinks.double().numpy())
    handle.remove()
    assert forwards == [1]  # the map and the sinks of a new prompt share one forward

    fig = wait_title("activations-emergence", "Emergence of massive activations")
    emergence = dl.probes.MassiveEmergence(run_dir)(model, tokens)
    markers = [t for t in fig["traces"] if not (t["name"] or "").endswith(")")]  # fits are "... (R²=...)"
    assert [t["name"] for t in markers] == ["embed", "L0", "L1"]
    for row, trace in enumerate(markers):
        assert trace["x"] == emergence.steps.tolist()
        assert_close(trace["y"], emergence.ratios[:, row].numpy())
    dash_duo.wait_for_contains_text("#activations-emergence-message", "6 checkpoints", timeout=TIMEOUT)

    dash_duo.find_elements("#activations-map-view input")[1].click()
    fig = wait_title("activations-map", "Top magnitudes per layer")
    assert_close(fig["traces"][0]["y"], expected.top_values[0, :, 0].numpy())
    assert dash_duo.get_logs() in ([], None)
    screenshot("activations-bbc")


def test_mamba_state_and_messages(dash_duo, tiny_mamba_dir, tmp_path, screenshot, wait_title, figure_in):
    open_page(dash_duo, str(tiny_mamba_dir), tmp_path)
    dash_duo.wait_for_contains_text("#activations-sinks-message", "need attention heads", timeout=TIMEOUT)
    dash_duo.wait_for_contains_text("#activations-emergence-message", "no checkpoint series", timeout=TIMEOUT)
    wait_title("activations-map", "Largest magnitude per channel")
    dash_duo.find_elements("#activations-site input")[1].click()
    fig = wait_title("activations-map", "Largest magnitude per channel")
    model, tokens = dl.load(tiny_mamba_dir), torch.tensor([[int(t) for t in PROMPT.split()]])
    expected = dl.probes.MassiveActivations(site="state")(model, tokens)
    until(lambda: len(figure_in("activations-map")["traces"][0]["z"][0]) == expected.channel_max.shape[2],
          timeout=TIMEOUT, msg="the state map never showed d_inner × d_state channels")  # fmt: skip
    fig = figure_in("activations-map")
    assert_close(as_array(fig["traces"][0]["z"]), np.log10(expected.channel_max[0].double().numpy()))
    screenshot("activations-mamba-state")


def broken_series(tmp_path: Path, broken: int) -> Path:
    """attn3l-bbc's 16 checkpoints twice over (steps 0-15, then 1000-1015) with checkpoint ``broken`` unreadable."""
    from dynalens.probes import checkpoint_series

    run = tmp_path / "broken-run"
    series = [folder for _, folder in checkpoint_series("attn3l-bbc")]
    for i, folder in enumerate(series + series):
        copy = shutil.copytree(folder, run / "checkpoints" / f"step_{1000 * (i // len(series)) + i % len(series):06d}")
        if i == broken:
            (copy / "model.safetensors").write_bytes(b"not safetensors")
    return run


def test_emergence_shows_its_progress_then_the_result_or_the_error(dash_duo, tmp_path, wait_title, record_progress):
    """attn3l-bbc's 16 checkpoints: a bar part-way done appears while they load, then the figure replaces
    it; a series of 32 whose 25th checkpoint is broken ends with the bar hidden and the error in the panel."""
    dash_duo.start_server(create_app(default_model="attn3l-bbc", cache_dir=tmp_path / "cache"))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/activations")
    bar = "activations-emergence-progress"

    def part_way_then_hidden() -> list[dict]:
        shown = progress.shown_then_hidden(TIMEOUT)
        assert not dash_duo.find_element(f"#{bar}").is_displayed()
        return [s for s in shown if s["value"] is not None and 0 < s["value"] < s["max"]]

    progress = record_progress(bar)
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()
    fig = wait_title("activations-emergence", "Emergence of massive activations")
    part_way = part_way_then_hidden()
    assert part_way, f"no part-way progress among {progress.states()}"
    assert any("Checkpoint" in s["label"] and "of 16" in s["label"] for s in part_way)
    emergence = dl.probes.MassiveEmergence("attn3l-bbc")(dl.load("attn3l-bbc"),
                                                         torch.tensor([[int(t) for t in PROMPT.split()]]))
    assert fig["traces"][0]["x"] == emergence.steps.tolist()
    dash_duo.wait_for_contains_text("#activations-emergence-message", "16 checkpoints", timeout=TIMEOUT)

    progress = record_progress(bar)
    dash_duo.find_element("#activations-series").send_keys(str(broken_series(tmp_path, broken=24)) + Keys.ENTER)
    dash_duo.wait_for_element("#activations-emergence-message .error-box", timeout=TIMEOUT)
    assert "massive emergence failed" in dash_duo.find_element("#activations-emergence-message").text
    assert part_way_then_hidden(), f"no part-way progress before the error among {progress.states()}"
    assert "Traceback" not in dash_duo.find_element("body").text
    assert dash_duo.get_logs() in ([], None)
