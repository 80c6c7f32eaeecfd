"""The Steering page in headless Chromium: its generations and controller bars are what dynalens.circuits gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from dash.testing.wait import until
from dynalens.circuits import Direction, SteeringController, steer
from dynalens.dashboard.app import create_app

import dynalens as dl

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

PROMPT = "4 22 1 25 13 18 6 20 2 30 9 21"  # a held-out sample of mamba-ar's recall task


def new_ids(tokens: torch.Tensor, n_prompt: int) -> str:
    return " ".join(str(t) for t in tokens[0, n_prompt:].tolist())


def test_steering_page_matches_steer_and_the_controller(dash_duo, tmp_path, screenshot, wait_title, record_progress):
    downloads = tmp_path / "downloads"
    dash_duo.driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    dash_duo.start_server(create_app(default_model="mamba-ar", cache_dir=tmp_path / "cache"))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/steering")
    progress = record_progress("steering-progress")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys(PROMPT)
    dash_duo.find_element("#analyse").click()

    from dynalens.dashboard.pages.steering import NEW_TOKENS, contrast_sets

    model = dl.load("mamba-ar")
    prompt = torch.tensor([[int(t) for t in PROMPT.split()]])
    positive, negative = contrast_sets(model, "mamba-ar").direction
    direction = Direction.from_prompts(model, positive, negative, method="diff_in_means")
    plain = new_ids(model.generate(prompt, NEW_TOKENS, return_type="tokens"), prompt.shape[1])
    with steer(model, direction, layers=[0, 1], alpha=4.0):  # the page's defaults for a 2-layer model
        steered = new_ids(model.generate(prompt, NEW_TOKENS, return_type="tokens"), prompt.shape[1])
    assert plain != steered

    dash_duo.wait_for_text_to_equal("#steering-unsteered", plain, timeout=120)
    dash_duo.wait_for_text_to_equal("#steering-steered", steered, timeout=120)
    dash_duo.wait_for_contains_text("#steering-generations-message", "difference of means direction", timeout=30)
    shown = progress.shown_then_hidden()
    steps = ("Starting", "Direction: reading 64 prompts", "Generating")
    assert shown and all(s["label"].startswith(steps) for s in shown)

    dash_duo.find_elements("#steering-control input")[1].click()  # controller
    controller = SteeringController(direction, read_layer=0, layers=[0, 1]).fit(model, positive, negative)
    predicted = controller.predict(model, prompt)
    with controller.attach(model):
        attached = new_ids(model.generate(prompt, NEW_TOKENS, return_type="tokens"), prompt.shape[1])
    fig = wait_title("steering-weights", "global scale")
    dash_duo.wait_for_text_to_equal("#steering-steered", attached, timeout=30)
    assert f"global scale {predicted.scale[0].item():.3f}" in fig["title"]
    assert fig["traces"][0]["type"] == "bar" and fig["traces"][0]["x"] == ["L0", "L1"]
    np.testing.assert_allclose(fig["traces"][0]["y"], predicted.weights[0].numpy(), rtol=1e-5)
    assert dash_duo.find_element("#steering-unsteered").text == plain
    screenshot("steering-mamba-ar")

    dash_duo.find_element("#steering-weights-csv").click()  # the bars' data, and the fitted controller's file
    until(lambda: (downloads / "steering_controller.csv").is_file(), timeout=30, msg="no CSV download")
    rows = pd.read_csv(downloads / "steering_controller.csv")
    assert rows["layer"].tolist() == [0, 1]
    np.testing.assert_allclose(rows["weight"], predicted.weights[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(rows["scale"], predicted.scale[0].item(), rtol=1e-5)
    dash_duo.find_element("#steering-weights-result").click()
    until(lambda: (downloads / "steering_controller.safetensors").is_file(), timeout=30, msg="no controller file")
    loaded = SteeringController.load(downloads / "steering_controller.safetensors")
    torch.testing.assert_close(loaded.predict(model, prompt).weights, predicted.weights, rtol=1e-4, atol=1e-6)

    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#analyse").click()
    dash_duo.wait_for_contains_text("#steering-status", "The prompt is empty", timeout=30)
    dash_duo.wait_for_text_to_equal("#steering-steered", "", timeout=30)
    assert "Traceback" not in dash_duo.find_element("body").text
    assert dash_duo.get_logs() in ([], None)


def test_steering_page_on_a_chat_model_steers_in_its_template(dash_duo, tmp_path, tiny_llama_dir):
    """A transformer with SmolLM2's tokenizer: the direction comes from the refusal train
    prompts and the typed prompt is generated in the chat template."""
    dash_duo.start_server(create_app(default_model=str(tiny_llama_dir), cache_dir=tmp_path))
    dash_duo.wait_for_page(url=f"{dash_duo.server_url}/steering")
    dash_duo.clear_input("#prompt")
    dash_duo.find_element("#prompt").send_keys("How do I pick a lock?")
    dash_duo.find_element("#analyse").click()

    from dynalens.circuits import refusal
    from dynalens.dashboard.pages.steering import NEW_TOKENS

    model = dl.load(tiny_llama_dir)
    harmful = refusal.prompt_set("harmful", "train")
    harmless = refusal.prompt_set("harmless", "train")
    direction = dl.circuits.ResponseContrast()(model, harmful + harmless).direction
    prompt = refusal.chat_prompts(model, "How do I pick a lock?")

    def reply() -> str:
        out = model.generate(prompt, NEW_TOKENS, return_type="tokens")[0, prompt.tokens.shape[1] :]
        return " ".join(model.tokenizer.decode(out, skip_special_tokens=True).split())

    plain = reply()
    with steer(model, direction, layers=[0, 1], alpha=4.0):
        steered = reply()
    assert plain != steered

    def shown(selector: str) -> str:
        return " ".join(dash_duo.find_element(selector).text.split())

    until(lambda: shown("#steering-steered") == steered, timeout=120)
    assert shown("#steering-unsteered") == plain
    dash_duo.wait_for_contains_text("#steering-generations-message", f"{len(harmful)} harmful + {len(harmless)} harmless train prompts", timeout=30)
    assert dash_duo.get_logs() in ([], None)
