"""Dash background callbacks run as threads of the server process, stopped by their Cancel button.

Dash's ``DiskcacheManager`` forks a process for every job. For the dashboard
that costs more than it gives:

- a model a job loads is lost when the job's process ends, so every job on a
  model the server had not loaded yet would load it again;
- the server is multi-threaded (waitress): a fork copies the locks other
  threads hold at that moment (the model cache's, an analysis in flight, the
  BLAS and OpenMP pools) locked, and the child waits on them forever;
- each job would recompute what the server process keeps in memory (the
  library's source digest in every results-cache key, the weights digests).

:class:`ThreadJobs` keeps ``DiskcacheManager``'s result and progress store (a
``diskcache.Cache``), its job function and its signed job handles, and starts
each job in a thread instead. A job therefore shares the process-level model
cache with every request, writes its Results to the results cache on disk like
any callback (the next request for the same prompt reads them back), and
takes its turn on the models through ``backend.run_alone`` like any callback
(hooks are model state). A job is stopped cooperatively:
:meth:`ThreadJobs.terminate_job` sets the job's stop flag and the job raises
``backend.Cancelled`` at its next progress report (after every block of every
forward under ``backend.counting_sequences``) or while it waits for the
models; the page's callback shows that as a message. Every request gets its
own result key, so two tabs asking the same thing never read each other's
job, and a superseded job's late result is never read.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

import diskcache
import flask
from dash import DiskcacheManager

from dynalens.dashboard.backend import stoppable

RESULTS_BYTES = 2**28
"""Size limit of the job result store: results are read once, so this only bounds unread ones."""

STOP_WAIT_S = 5.0
"""How long a cancel request waits for its job to stop before answering."""


class ThreadJobs(DiskcacheManager):
    """A Dash background-callback manager that runs each job in a thread and stops it on request.

    Parameters
    ----------
    folder : path
        Where the job results and progress are kept (a ``diskcache.Cache``).

    Examples
    --------
    >>> app = dash.Dash(__name__, background_callback_manager=ThreadJobs(tmp))  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__(diskcache.Cache(str(folder), size_limit=RESULTS_BYTES))
        self._jobs: dict[int, tuple[threading.Thread, threading.Event, str]] = {}  # thread, stop flag, result key
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def build_cache_key(self, fn: Any, args: Any, cache_args_to_ignore: Any, triggered: Any) -> str:
        """A new key for every request: jobs never share results (the results cache does the caching)."""
        return uuid.uuid4().hex

    def call_job_fn(self, key: str, job_fn: Any, args: Any, context: Any) -> int:
        """Start the job in a thread (inside the request's Flask app); its id, an integer that is no process id."""
        app = flask.current_app._get_current_object()
        stop = threading.Event()

        def target() -> None:
            with app.app_context(), stoppable(stop):
                job_fn(key, self._make_progress_key(key), args, context)

        with self._lock:
            job = next(self._ids)
            thread = threading.Thread(target=target, name=f"dashboard-job-{job}", daemon=True)
            self._jobs = {j: found for j, found in self._jobs.items() if self._pending(found)}
            self._jobs[job] = (thread, stop, key)
            thread.start()  # before another call's clean-up sees it: a thread not started is not alive
        return job

    def _pending(self, found: tuple[threading.Thread, threading.Event, str]) -> bool:
        """Whether the job still runs, or its result waits to be read."""
        thread, _, key = found
        return thread.is_alive() or key in self.handle

    def _job(self, job: Any) -> tuple[threading.Thread, threading.Event, str] | None:
        try:
            number = int(job)
        except (TypeError, ValueError):
            return None
        with self._lock:
            return self._jobs.get(number)

    def job_running(self, job: Any) -> bool:
        """Whether the job runs or its result is not read yet.

        Dash reads the result first and then asks whether the job runs; a job
        that stored its result and ended between the two would otherwise
        count as cancelled, and its tab would never get the result.
        """
        found = self._job(job)
        return found is not None and self._pending(found)

    def terminate_job(self, job: Any) -> None:
        """Ask the job to stop and wait up to ``STOP_WAIT_S`` for it (it stores its cancelled outputs first)."""
        found = self._job(job)
        if found is None:
            return
        thread, stop, _ = found
        stop.set()
        if thread is not threading.current_thread():
            thread.join(STOP_WAIT_S)

    def stop_all(self) -> None:
        """Ask every running job to stop and wait up to ``STOP_WAIT_S`` for each (a server shutting down)."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            self.terminate_job(job)

    def terminate_unhealthy_job(self, job: Any) -> bool:
        """Threads cannot be left half-dead: no job is ever unhealthy."""
        return False

    def running(self) -> int:
        """How many jobs run now."""
        with self._lock:
            return sum(thread.is_alive() for thread, _, _ in self._jobs.values())
