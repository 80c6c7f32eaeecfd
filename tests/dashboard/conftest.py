"""Headless Chromium for the ``dash_duo`` browser tests, and small models to draw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import tqdm

tqdm.tqdm.monitor_interval = 0  # no monitor thread: the runner stops its server with SystemExit in every new thread

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

CHROME_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1440,1100",
)


def pytest_setup_options():
    """dash[testing] hook: Debian's Chromium, headless (driver at /usr/bin/chromedriver)."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    if Path("/usr/bin/chromium").exists():
        options.binary_location = "/usr/bin/chromium"
    return options


@pytest.fixture(autouse=True)
def jobs_stopped_before_the_server(request):
    """Stop the app's background jobs before ``dash_duo`` stops its server.

    The test runner stops its server by raising ``SystemExit`` in every thread
    started since, which would kill a job mid-analysis; stopped first, a job
    ends through its stop flag as a cancelled job does.
    """
    if "dash_duo" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("dash_duo")  # set up first, so torn down after this fixture
    yield
    import dash
    from dash.exceptions import AppNotFoundError

    from dynalens.dashboard.jobs import ThreadJobs

    try:
        manager = dash.get_app()._background_manager
    except AppNotFoundError:  # the test started no app
        return
    if isinstance(manager, ThreadJobs):
        manager.stop_all()


@pytest.fixture
def screenshot(dash_duo):
    """``screenshot(name)`` saves the browser window as ``tests/artifacts/dashboard-<name>.png``."""
    ARTIFACTS.mkdir(exist_ok=True)

    def save(name: str) -> Path:
        path = ARTIFACTS / f"dashboard-{name}.png"
        dash_duo.driver.save_screenshot(str(path))
        return path

    return save


@pytest.fixture(scope="session")
def tiny_mamba_dir(tmp_path_factory) -> Path:
    """A small random HookedMamba (no tokenizer: prompts are token ids) saved as an HF folder."""
    from dynalens.models.mamba import HookedMamba, MambaConfig

    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(d_model=32, n_layers=2, d_vocab=64, d_state=8))
    folder = tmp_path_factory.mktemp("tiny-mamba")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def figure_in(dash_duo):
    """``figure_in(graph_id)``: ``{"title", "traces"}`` of the figure plotly.js draws in ``dcc.Graph(id=graph_id)``.

    Each trace holds ``name``, ``type``, ``x``, ``y``, ``z`` as plain lists (NaN as None); None before a draw.
    """

    def read(graph_id: str) -> dict | None:
        return dash_duo.driver.execute_script(
            """
            const el = document.getElementById(arguments[0]);
            const plot = el && (el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot'));
            if (!plot || !plot._fullData || !plot._fullData.length) return null;
            const plain = v => v == null ? null : Array.from(v, x => (x != null && typeof x === 'object')
                ? Array.from(x, y => Number.isNaN(y) ? null : y) : (Number.isNaN(x) ? null : x));
            return {title: (plot.layout.title || {}).text || '',
                    traces: plot._fullData.map(t => ({name: t.name, type: t.type,
                                                      x: plain(t.x), y: plain(t.y), z: plain(t.z)}))};
            """,
            graph_id,
        )

    return read


@pytest.fixture
def wait_title(figure_in):
    """``wait_title(graph_id, text, timeout=120)``: wait until the graph's title contains ``text``; its figure."""
    from dash.testing.wait import until

    def wait(graph_id: str, text: str, timeout: float = 120) -> dict:
        until(lambda: text in ((figure_in(graph_id) or {}).get("title") or ""), timeout=timeout,
              msg=f"{graph_id} never showed {text!r}")  # fmt: skip
        return figure_in(graph_id)

    return wait


RECORD_PROGRESS = """
const box = document.getElementById(arguments[0]);
window.progressSeen = [];
const record = () => {
  const bar = box.querySelector('progress');
  window.progressSeen.push({shown: box.style.display !== 'none', label: box.innerText,
                            value: bar && bar.hasAttribute('value') ? Number(bar.getAttribute('value')) : null,
                            max: bar ? Number(bar.getAttribute('max') || 1) : null});
};
if (window.progressObserver) window.progressObserver.disconnect();
window.progressObserver = new MutationObserver(record);
window.progressObserver.observe(box, {attributes: true, childList: true, subtree: true, characterData: true});
"""


class ProgressRecord:
    """Every state the page draws of one ``ProgressBar`` from its creation on (see ``record_progress``)."""

    def __init__(self, dash_duo, bar_id: str) -> None:
        self.dash_duo = dash_duo
        dash_duo.wait_for_element(f"#{bar_id}", timeout=60)
        dash_duo.driver.execute_script(RECORD_PROGRESS, bar_id)

    def states(self) -> list[dict]:
        """The states so far, each ``{"shown", "label", "value", "max"}`` (``value`` None while indeterminate)."""
        return self.dash_duo.driver.execute_script("return window.progressSeen;")

    def shown_then_hidden(self, timeout: float = 120) -> list[dict]:
        """Wait until the bar was drawn and is hidden again; the states drawn while it was shown."""
        from dash.testing.wait import until

        until(lambda: self.states() and not self.states()[-1]["shown"], timeout=timeout,
              msg="the progress bar never hid again")  # fmt: skip
        return [s for s in self.states() if s["shown"]]


@pytest.fixture
def record_progress(dash_duo):
    """``record_progress(bar_id)``: a :class:`ProgressRecord` of the bar's states from now on."""
    return lambda bar_id: ProgressRecord(dash_duo, bar_id)
