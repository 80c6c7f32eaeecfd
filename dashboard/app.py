"""The dynalens dashboard: a Dash app whose pages register themselves, served by waitress.

Every module in ``dashboard/pages/`` that calls ``dash.register_page`` becomes
a page with a link in the top bar; adding a workflow means adding one file.
Long callbacks run as background jobs in threads of the server process
(``dashboard/jobs.py``); :func:`run` serves the app with waitress, a
production WSGI server, on this machine only unless told otherwise.

>>> from dynalens.dashboard.app import create_app, run
>>> app = create_app()            # doctest: +SKIP
>>> run(port=8050)                # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading

import dash
import waitress

from dynalens.dashboard import backend, layout
from dynalens.dashboard.cache import DEFAULT_MAX_BYTES, ResultsCache, code_version
from dynalens.dashboard.jobs import ThreadJobs

DEFAULT_MODEL = "smollm2-135m"

log = logging.getLogger("dynalens.dashboard")


def create_app(
    default_model: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    cache_bytes: int | None = DEFAULT_MAX_BYTES,
) -> dash.Dash:
    """Build the dashboard app.

    Parameters
    ----------
    default_model : str
        The model picked when a tab opens: a built-in or zoo name, or a local path.
    cache_dir : path, optional
        Folder of the results cache; default ``<dynalens cache dir>/dashboard``.
    cache_bytes : int or None
        Size limit of the results cache in bytes (least recently used entries
        go first); None for no limit.

    Returns
    -------
    dash.Dash
        The app; serve it with :func:`run` (or ``waitress.serve(app.server)``).
    """
    jobs_dir = tempfile.mkdtemp(prefix="dynalens-jobs-")  # job results live as long as the server
    atexit.register(shutil.rmtree, jobs_dir, True)
    app = dash.Dash(
        "dynalens.dashboard",  # a package: pages import as dynalens.dashboard.pages.<name>
        use_pages=True,
        pages_folder="pages",
        assets_folder="assets",
        title="dynalens",
        update_title=None,
        suppress_callback_exceptions=True,  # page components appear after the first render
        background_callback_manager=ThreadJobs(jobs_dir),
    )
    # Dash signs each page load's job handles with the server's secret; without one it stores a secret in the
    # job store on the first requests, or makes a random one when that store fails. Jobs live in this process,
    # so one secret per process, set before any request, is enough.
    app.server.secret_key = secrets.token_bytes(32)
    app.server.config[backend.CACHE_CONFIG_KEY] = ResultsCache(cache_dir, max_bytes=cache_bytes)
    app.layout = layout.shell(default_model)

    layout.register(app)
    return app


def run(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8050,
    threads: int = 16,
    cache_bytes: int | None = DEFAULT_MAX_BYTES,
) -> None:
    """Serve the dashboard with waitress until interrupted (the ``dynalens dashboard`` command).

    Parameters
    ----------
    model : str, optional
        The model shown first; default ``smollm2-135m``. It starts loading at once.
    host : str
        Interface to bind; the default serves this machine only.
    port : int
        TCP port.
    threads : int
        Request threads. A tab keeps a few busy (its callbacks, its job polls),
        and a callback waiting for another tab's analysis holds one, so allow
        several per tab.
    cache_bytes : int or None
        Size limit of the results cache in bytes; None for no limit.
    """
    model = model or DEFAULT_MODEL
    app = create_app(default_model=model, cache_bytes=cache_bytes)
    threading.Thread(target=_preload, args=(model,), daemon=True).start()
    print(f"dynalens dashboard: http://{host}:{port}/  (model {model})", file=sys.stderr)
    waitress.serve(app.server, host=host, port=port, threads=threads, ident="dynalens")


def _preload(model: str) -> None:
    """Load the first model (and the library's source digest) while the browser opens; the page reports any error."""
    code_version()
    try:
        backend.load_model(model)
    except backend.DashboardError as exc:
        log.warning("%s", exc)
