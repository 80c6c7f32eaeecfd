"""The Explorer page in headless Chromium: it draws exactly what dynalens.probes computes, from one forward per prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dash.testing.wait import until

import dynalens as dl
from dynalens.dashboard import backend
from dynalens.dashboard.app import create_app
from dynalens.dashboard.layout import DEFAULT_PROMPT

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]

TIMEOUT = 240  # the first SmolLM2 load of a fresh machine dequantises its GGUF
MAMBA_PROMPT = "3 7 1 9 4 3 7 1 9 4 2 8"


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """One results cache for the module: later tests read what earlier ones computed."""
    return tmp_path_factory.mktemp("dashboard-results")


def z_of(figure: dict) -> np.ndarray:
    """The first trace's ``z`` (NaN where plotly holds none)."""
    return np.array(figure["traces"][0]["z"], dtype=float)


def shapes_x0(dash_duo, graph_id: str) -> list[float]:
    """Left edges of the shapes drawn on a graph (the selected-token outline)."""
    return dash_duo.driver.execute_script(
        """
        const el = document.getElementById(arguments[0]);
        const plot = el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');
        return (plot.layout.shapes || []).map(s => s.x0);
        """,
        graph_id,
    )


def assert_lower_triangle(drawn: np.ndarray, expected: torch.Tensor) -> None:
    """The drawn causal heatmap equals ``expected`` on and below the diagonal."""
    mask = np.tril(np.ones(drawn.shape, dtype=bool))
    np.testing.assert_allclose(drawn[mask], expected.double().numpy()[mask], rtol=1e-5, atol=1e-6)
    assert np.isnan(drawn[~mask]).all()


def choose(dash_duo, dropdown: str, option: str) -> None:
    """Pick ``option`` in a dcc.Dropdown (a script click: the open menu's search box may cover it)."""
    dash_duo.find_element(dropdown).click()
    until(lambda: any(o.text == option for o in dash_duo.find_elements(".dash-dropdown-option")),
          timeout=10, msg=f"{dropdown} has no option {option!r}")
    match = next(o for o in dash_duo.find_elements(".dash-dropdown-option") if o.text == option)
    dash_duo.driver.execute_script("arguments[0].click();", match)


def analyse(dash_duo, *, path: str | None = None, prompt: str | None = None) -> None:
    if path is not None:
        dash_duo.clear_input("#model-path")
        dash_duo.find_element("#model-path").send_keys(path)
    if prompt is not None:
        dash_duo.clear_input("#prompt")
        dash_duo.find_element("#prompt").send_keys(prompt)
    dash_duo.find_element("#analyse").click()


def open_smollm2(dash_duo, results_dir):
    """Serve a fresh app, wait for the default model and prompt; their model and tokens."""
    dash_duo.start_server(create_app(cache_dir=results_dir))
    dash_duo.wait_for_contains_text("#explorer-status", "transformer", timeout=TIMEOUT)
    model = backend.load_model("smollm2-135m")
    return model, model.to_tokens(DEFAULT_PROMPT)


@pytest.fixture
def forwards():
    """The forward passes SmolLM2 makes from now on (a torch hook on ``hook_embed``; one entry per pass)."""
    model = backend.load_model("smollm2-135m")
    seen: list[int] = []
    handle = model.hook_dict[dl.names.EMBED].register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    yield seen
    handle.remove()


def test_app_starts_and_explorer_renders_for_smollm2(dash_duo, wait_title, results_dir, screenshot, forwards):
    model, tokens = open_smollm2(dash_duo, results_dir)
    dash_duo.wait_for_text_to_equal(".nav-link.active", "Explorer")
    n_layers = model.cfg.n_layers
    assert len(dash_duo.find_elements("#explorer-tokens .token")) == tokens.shape[1]
    # the last token starts selected, and the deepest layer is shown
    selected = dash_duo.find_element("#explorer-tokens .token.selected")
    assert selected.text.split("\n")[0] == str(tokens.shape[1] - 1)
    mixer = wait_title("explorer-mixer", f"Layer {n_layers - 1} mixer", TIMEOUT)
    wait_title("explorer-lens", f"position {tokens.shape[1] - 1}", TIMEOUT)
    resid = wait_title("explorer-resid", "Residual-stream norm", TIMEOUT)
    assert forwards == [1]  # the three panels of a new prompt share one forward

    expected = dl.probes.MixerMatrix(layer=n_layers - 1)(model, tokens)
    assert_lower_triangle(z_of(mixer), expected.matrix(0)[0])
    norms = dl.probes.ResidualNorms()(model, tokens).norms[0].T  # [layer, token]; log colour is on by default
    np.testing.assert_allclose(z_of(resid), np.log10(norms.double().numpy()), rtol=1e-5)
    assert dash_duo.get_logs() in ([], None)
    screenshot("explorer-smollm2")


def test_changing_layer_and_head_updates_the_heatmap(dash_duo, wait_title, results_dir, screenshot):
    model, tokens = open_smollm2(dash_duo, results_dir)
    before = z_of(wait_title("explorer-mixer", f"Layer {model.cfg.n_layers - 1} mixer · head 0", TIMEOUT))

    choose(dash_duo, "#explorer-layer", "layer 2")
    after_layer = z_of(wait_title("explorer-mixer", "Layer 2 mixer · head 0", TIMEOUT))
    layer_2 = dl.probes.MixerMatrix(layer=2)(model, tokens).matrix(0)
    assert_lower_triangle(after_layer, layer_2[0])
    assert not np.allclose(np.nan_to_num(after_layer), np.nan_to_num(before))

    choose(dash_duo, "#explorer-group", "head 5")
    assert_lower_triangle(z_of(wait_title("explorer-mixer", "Layer 2 mixer · head 5", TIMEOUT)), layer_2[5])
    screenshot("explorer-layer-head")


def test_clicking_a_token_selects_it_everywhere(dash_duo, wait_title, results_dir, screenshot):
    model, tokens = open_smollm2(dash_duo, results_dir)
    wait_title("explorer-lens", f"position {tokens.shape[1] - 1}", TIMEOUT)

    dash_duo.find_elements("#explorer-tokens .token")[7].click()
    drawn = wait_title("explorer-lens", "position 7", TIMEOUT)
    assert dash_duo.find_element("#explorer-tokens .token.selected").text.split("\n")[0] == "7"
    lens = dl.probes.LogitLens(k=5)(model, tokens)
    np.testing.assert_allclose(z_of(drawn), lens.top_probs[0, 7].numpy(), rtol=1e-5)  # [layer, rank]
    for graph_id in ("explorer-mixer", "explorer-resid"):  # the selected column is outlined
        until(lambda: shapes_x0(dash_duo, graph_id) == [6.5], timeout=30,
              msg=f"{graph_id} does not outline position 7")
    screenshot("explorer-token-click")


def test_explorer_renders_for_a_mamba_model(dash_duo, wait_title, tiny_mamba_dir, tmp_path, screenshot):
    dash_duo.start_server(create_app(cache_dir=tmp_path))
    analyse(dash_duo, path=str(tiny_mamba_dir), prompt=MAMBA_PROMPT)
    dash_duo.wait_for_contains_text("#explorer-status", "mamba", timeout=TIMEOUT)
    model = backend.load_model(str(tiny_mamba_dir))
    tokens = torch.tensor([[int(t) for t in MAMBA_PROMPT.split()]])
    expected = dl.probes.MixerMatrix(layer=model.cfg.n_layers - 1)(model, tokens)
    first = wait_title("explorer-mixer", expected.group_labels[0], TIMEOUT)
    assert len(dash_duo.find_elements("#explorer-tokens .token")) == tokens.shape[1]
    assert dash_duo.find_element("#explorer-group-label").text == "Channels"
    assert_lower_triangle(z_of(first), expected.matrix(0)[0])

    choose(dash_duo, "#explorer-group", expected.group_labels[1])
    drawn = z_of(wait_title("explorer-mixer", expected.group_labels[1], TIMEOUT))
    assert_lower_triangle(drawn, expected.matrix(0)[1])
    screenshot("explorer-mamba")


@pytest.fixture(scope="module")
def tiny_mamba2_dir(tmp_path_factory):
    """A small random HookedMamba2 (8 heads, no tokenizer: prompts are token ids) saved as an HF Mamba-2 folder."""
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    torch.manual_seed(0)
    model = HookedMamba2(Mamba2Config(d_model=32, n_layers=2, d_vocab=64, n_heads=8, d_head=8, d_state=8, n_groups=2))
    folder = tmp_path_factory.mktemp("tiny-mamba2")
    model.save_pretrained(folder)
    return folder


def test_explorer_draws_a_mamba2_mixer_heatmap_equal_to_the_librarys(dash_duo, wait_title, tiny_mamba2_dir, tmp_path,
                                                                     screenshot):  # fmt: skip
    dash_duo.start_server(create_app(cache_dir=tmp_path))
    analyse(dash_duo, path=str(tiny_mamba2_dir), prompt=MAMBA_PROMPT)
    dash_duo.wait_for_contains_text("#explorer-status", "mamba2", timeout=TIMEOUT)
    model = dl.load(tiny_mamba2_dir)  # a fresh load of the folder: the page's numbers, not its objects
    tokens = torch.tensor([[int(t) for t in MAMBA_PROMPT.split()]])
    last = dl.probes.MixerMatrix(layer=model.cfg.n_layers - 1)(model, tokens)
    assert last.group_labels == [f"head {h}" for h in range(8)] and last.signed
    first = wait_title("explorer-mixer", f"Layer {model.cfg.n_layers - 1} mixer · head 0", TIMEOUT)
    assert dash_duo.find_element("#explorer-group-label").text == "Head"
    assert len(dash_duo.find_elements("#explorer-tokens .token")) == tokens.shape[1]
    assert_lower_triangle(z_of(first), last.matrix(0)[0])

    choose(dash_duo, "#explorer-layer", "layer 0")
    choose(dash_duo, "#explorer-group", "head 5")
    drawn = z_of(wait_title("explorer-mixer", "Layer 0 mixer · head 5", TIMEOUT))
    assert_lower_triangle(drawn, dl.probes.MixerMatrix(layer=0)(model, tokens).matrix(0)[5])
    assert dash_duo.get_logs() in ([], None)
    screenshot("explorer-mamba2")


def test_bad_model_path_and_too_long_prompt_show_readable_errors(
    dash_duo, tiny_mamba_dir, tmp_path, screenshot
):
    dash_duo.start_server(create_app(default_model=str(tiny_mamba_dir), cache_dir=tmp_path))
    analyse(dash_duo, path="/no/such/model-folder", prompt=MAMBA_PROMPT)
    dash_duo.wait_for_contains_text(
        "#explorer-status .error-box", "Could not load model '/no/such/model-folder'", timeout=60
    )
    page = dash_duo.driver.page_source
    assert "Traceback" not in page and "File \"" not in page
    screenshot("explorer-bad-path")

    analyse(dash_duo, path="", prompt=" ".join(["5"] * (backend.MAX_PROMPT_TOKENS + 1)))
    dash_duo.wait_for_contains_text(
        "#explorer-status .error-box", f"at most {backend.MAX_PROMPT_TOKENS} tokens", timeout=60
    )
    analyse(dash_duo, prompt="not token ids")
    dash_duo.wait_for_contains_text("#explorer-status .error-box", "token ids", timeout=60)
    screenshot("explorer-bad-prompt")
