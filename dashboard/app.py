"""The dynalens dashboard: a Dash app whose pages register themselves.

Every module in ``dashboard/pages/`` that calls ``dash.register_page`` becomes
a page with a link in the top bar; adding a workflow means adding one file.

>>> from dynalens.dashboard.app import create_app
>>> app = create_app()            # doctest: +SKIP
>>> app.run(port=8050)            # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import dash

from dynalens.dashboard import backend, layout
from dynalens.dashboard.cache import ResultsCache

DEFAULT_MODEL = "smollm2-135m"

log = logging.getLogger("dynalens.dashboard")


def create_app(
    default_model: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None
) -> dash.Dash:
    """Build the dashboard app.

    Parameters
    ----------
    default_model : str
        The model picked when a tab opens: a built-in or zoo name, or a local path.
    cache_dir : path, optional
        Folder of the results cache; default ``<dynalens cache dir>/dashboard``.

    Returns
    -------
    dash.Dash
        The app; serve it with ``app.run(host=..., port=...)`` or :func:`run`.
    """
    app = dash.Dash(
        "dynalens.dashboard",  # a package: pages import as dynalens.dashboard.pages.<name>
        use_pages=True,
        pages_folder="pages",
        assets_folder="assets",
        title="dynalens",
        update_title=None,
        suppress_callback_exceptions=True,  # page components appear after the first render
    )
    app.server.config[backend.CACHE_CONFIG_KEY] = ResultsCache(cache_dir)
    app.layout = layout.shell(default_model)

    layout.register(app)
    return app


def run(
    model: str | None = None, host: str = "127.0.0.1", port: int = 8050, debug: bool = False
) -> None:
    """Serve the dashboard (the ``dynalens dashboard`` command).

    Parameters
    ----------
    model : str, optional
        The model shown first; default ``smollm2-135m``. It starts loading at once.
    host : str
        Interface to bind; the default serves this machine only.
    port : int
        TCP port.
    debug : bool
        Dash debug mode (reloader, in-browser tracebacks): for development only.
    """
    model = model or DEFAULT_MODEL
    app = create_app(default_model=model)
    threading.Thread(target=_preload, args=(model,), daemon=True).start()
    print(f"dynalens dashboard: http://{host}:{port}/  (model {model})", file=sys.stderr)
    app.run(host=host, port=port, debug=debug)


def _preload(model: str) -> None:
    """Load the first model while the browser opens; the page reports any error."""
    try:
        backend.load_model(model)
    except backend.DashboardError as exc:
        log.warning("%s", exc)
