"""The one small interface the pages draw from: models, prompts and the Results of their analyses.

Models are held in a **process-level cache** keyed by the name or path the
user typed (at most ``MAX_MODELS``, least recently used dropped first): loading
SmolLM2 takes seconds, and every browser tab may share the same weights
because analyses never change them. Everything else a page needs (the chosen
model, prompt, position, layer) lives in the browser (``dcc.Store``), so two
tabs never see each other's work.

A page asks for **all the analyses of its panels that share a prompt** with
:func:`page_results`: what the results cache (``dashboard/cache.py``) does not
hold is computed with ONE ``dl.run(model, prompts, [...])`` (one forward for
every cache-reading analysis), stored, and each panel draws its Result. Every
callback of a page passes the same list, so whichever runs first pays the
forward and the others read its Results. Other saved objects (a steering
direction, a fitted controller) go through :func:`cached`.

Errors meant for the user are :class:`DashboardError`; :func:`user_message`
turns any exception into one readable line, never a traceback.

A long callback runs as a Dash **background job**: its page registers it
with ``bar.callback`` (``bar`` a page's ``components.ProgressBar``), which
first tries it as a plain callback under :func:`cached_only` (a revisit
answers at once from the results cache) and otherwise hands it to the app's
job manager (``dashboard/jobs.py``), which runs it in a thread of the server
process. While it runs, it reports how far
it is with :func:`reporting` (a :class:`ProgressReport` that it advances, by
hand or per sequence the model reads with :func:`counting_sequences`); the
page's progress bar polls :func:`read_progress` from another request thread.
Reports are keyed by a random id the page's layout holds, so tabs never see
each other's. The bar's *Cancel* button stops the job: its next report (or its
wait for the models, :func:`run_alone`) raises :class:`Cancelled`, which the
page shows as a message; nothing half-computed is stored.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import flask
import torch
from torch import Tensor

import dynalens
from dynalens.dashboard.cache import ResultsCache, analysis_key, request_key
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.zoo import ZOO
from dynalens.probes.analysis import Analysis, Experiment, run
from dynalens.probes.results import Result, Saved

log = logging.getLogger("dynalens.dashboard")

MAX_MODELS = 3
"""Models kept loaded in one server process."""

MAX_PROMPT_TOKENS = 256
"""The longest prompt the dashboard analyses (mixer matrices grow as tokens squared)."""

CACHE_CONFIG_KEY = "DYNALENS_RESULTS_CACHE"
"""Where ``create_app`` puts the app's :class:`ResultsCache` in the Flask config."""

S = TypeVar("S", bound=Saved)
T = TypeVar("T")


JOB_POLL_MS = 100
"""How often the page asks whether a background job has finished (a cached job answers in about this)."""


class DashboardError(Exception):
    """An error whose message is shown to the user as is."""


class Cancelled(DashboardError):
    """The user stopped the background job (its Cancel button, or new inputs superseded it)."""


class NotCached(Exception):
    """Under :func:`cached_only`: the answer needs a model loaded or an analysis run (see ``ProgressBar.callback``)."""


_cached_only: ContextVar[bool] = ContextVar("dynalens_dashboard_cached_only", default=False)


@contextmanager
def cached_only() -> Iterator[None]:
    """Within the block, answer only from what is at hand: loading a model or running an analysis raises
    :class:`NotCached` instead (:func:`load_model` of a model not loaded, :func:`page_results` and
    :func:`cached` of anything the results cache does not hold)."""
    token = _cached_only.set(True)
    try:
        yield
    finally:
        _cached_only.reset(token)


_models: OrderedDict[str, Any] = OrderedDict()
_models_lock = threading.Lock()
# One analysis at a time in the whole server: hooks are model state, not per call,
# and the same model can be reached under several names (picker, path, preload).
_run_lock = threading.RLock()


def load_model(name_or_path: str) -> Any:
    """The model for a built-in/zoo name or a local path, loaded once per process.

    Raises
    ------
    DashboardError
        When the name is unknown, the path does not exist or loading fails;
        the message says which and why.
    """
    key = name_or_path.strip()
    if not key:
        raise DashboardError("No model chosen: pick one from the list or type a local folder path.")
    with _models_lock:  # one load at a time: two tabs asking for SmolLM2 load it once
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        if _cached_only.get():
            raise NotCached(f"model {key!r} is not loaded")
        try:
            model = dynalens.load(key)
        except Exception as exc:
            log.exception("loading model %r failed", key)
            raise DashboardError(f"Could not load model {key!r}: {user_message(exc)}") from exc
        model.eval()
        _models[key] = model
        while len(_models) > MAX_MODELS:
            _models.popitem(last=False)
        return model


def model_id(name_or_path: str) -> str:
    """A string that changes when the weights behind ``name_or_path`` may have changed.

    A local path or a zoo model is identified by its resolved folder and the
    size and modification time of its top-level files; a built-in name by the
    name and the dynalens version (built-in weights ship with the package).
    """
    name = name_or_path.strip()
    path = ZOO[name].path if name in ZOO else Path(name).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        return f"path:{path.resolve()}:{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    return f"name:{name}:{dynalens.__version__}"


def encode_prompt(model: Any, prompt: str) -> Prompts:
    """The typed prompt as a one-prompt :class:`Prompts`, checked against the model and the dashboard.

    A model without a tokenizer (the synthetic-task zoo models) takes token ids
    typed as integers separated by spaces or commas.
    """
    if not prompt or not prompt.strip():
        raise DashboardError("The prompt is empty: type some text to analyse.")
    try:
        if getattr(model, "tokenizer", None) is None:
            prompts = Prompts(model, torch.tensor([_parse_ids(prompt)]))
        else:
            prompts = Prompts(model, prompt)
    except DashboardError:
        raise
    except Exception as exc:
        raise DashboardError(user_message(exc)) from exc
    if prompts.tokens.shape[-1] > MAX_PROMPT_TOKENS:
        raise DashboardError(
            f"The prompt is {prompts.tokens.shape[-1]} tokens long; the dashboard analyses at most "
            f"{MAX_PROMPT_TOKENS} tokens. Shorten the prompt."
        )
    return prompts


def prompts_of(model: Any, ids: Sequence[int]) -> Prompts:
    """One prompt from the token ids a page stored (``prompt["tokens"]``)."""
    return Prompts(model, torch.tensor([list(ids)], dtype=torch.long))


def _parse_ids(prompt: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", prompt.strip()) if p]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise DashboardError(
            "This model has no tokenizer, so the prompt must be token ids: integers separated "
            "by spaces or commas, e.g. '3 14 15 9 2 6'."
        )
    return [int(p) for p in parts]


def model_and_prompts(request: Mapping[str, Any]) -> tuple[Any, Prompts]:
    """The model and the prompt of a page request ``{"model": ..., "prompt": ...}``."""
    model = load_model(request["model"])
    return model, encode_prompt(model, request["prompt"])


# ------------------------------------------------------------------- results
def results_cache() -> ResultsCache:
    """The app's results cache (see ``create_app``)."""
    return flask.current_app.config[CACHE_CONFIG_KEY]


class PageResults(Mapping[str, Result]):
    """The Results of one page's analyses on one batch, by analysis name (``run[analysis]`` works too).

    Results computed by this request are held; the others are read from the
    results cache when a panel asks for them. An analysis that does not apply
    to the model raises :class:`DashboardError` with its message when asked for.

    Attributes
    ----------
    computed : list of str
        The analyses this request computed (with one ``dl.run``); empty when all were cached.
    """

    def __init__(
        self, cache: ResultsCache, keys: dict[str, str], held: dict[str, Result], unavailable: dict[str, str]
    ) -> None:
        self._cache, self._keys, self._held, self._unavailable = cache, keys, dict(held), unavailable
        self.computed = list(held)

    def __getitem__(self, key: str | Analysis) -> Result:
        name = key.name if isinstance(key, Analysis) else key
        if name in self._unavailable:
            raise DashboardError(self._unavailable[name])
        if name not in self._held:
            self._held[name] = self._cache.load(self._keys[name])  # KeyError for a name the page never asked
        return self._held[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._keys, *self._unavailable])

    def __len__(self) -> int:
        return len(self._keys) + len(self._unavailable)

    def key(self, key: str | Analysis) -> str:
        """The results-cache key of an analysis' Result (what a download reads back)."""
        return self._keys[key.name if isinstance(key, Analysis) else key]

    def applies(self, key: str | Analysis) -> bool:
        """Whether the analysis applies to the model (else asking for it raises its message)."""
        return (key.name if isinstance(key, Analysis) else key) in self._keys


def page_results(
    name_or_path: str,
    model: Any,
    prompts: Prompts | None,
    analyses: Sequence[Analysis],
    report: ProgressReport | None = None,
) -> PageResults:
    """The Results of ``analyses`` on ``prompts``: cached ones read back, the rest from ONE ``dl.run``.

    Parameters
    ----------
    name_or_path : str
        The model as the user picked it (its :func:`model_id` is part of every key).
    model
        The loaded model.
    prompts : Prompts or None
        The batch the page's panels share; ``None`` when every analysis is a
        weight-only :class:`~dynalens.probes.analysis.Experiment`.
    analyses : sequence of Analysis
        Every analysis of the page's panels on these prompts; each callback of a
        page passes the same list, so the first one computes what is missing
        for all of them in one forward.
    report : ProgressReport, optional
        Advanced by one unit per sequence the model reads (:func:`counting_sequences`).

    Raises
    ------
    DashboardError
        When the run fails (the message names the analyses and the cause).
    """
    cache = results_cache()
    identity = model_id(name_or_path)
    keys, unavailable = {}, {}
    for analysis in analyses:
        try:
            analysis.check(model)
        except Exception as exc:  # AnalysisError, or a parameter the model cannot take (a site, a layer)
            unavailable[analysis.name] = user_message(exc)
        else:
            keys[analysis.name] = analysis_key(identity, prompts, analysis)
    held: dict[str, Result] = {}
    if any(key not in cache for key in keys.values()):
        with _models_turn():  # a callback that started first may have computed them meanwhile
            missing = [a for a in analyses if a.name in keys and keys[a.name] not in cache]
            if missing:
                held = _run(model, prompts, missing, report)
                for name, result in held.items():
                    cache.store(keys[name], result)
    return PageResults(cache, keys, held, unavailable)


def _run(model: Any, prompts: Prompts | None, analyses: list[Analysis], report: ProgressReport | None) -> dict:
    """``dl.run`` of ``analyses`` (each weight-only Experiment on its own when there are no prompts)."""

    def compute() -> dict[str, Result]:
        if prompts is None:
            if not all(isinstance(a, Experiment) for a in analyses):
                raise TypeError("only weight-only experiments run without prompts")
            return {a.name: a(model) for a in analyses}
        return dict(run(model, prompts, analyses))

    try:
        return (compute if report is None else counting_sequences(model, report, compute))()
    except DashboardError:
        raise
    except Exception as exc:
        what = ", ".join(a.name.replace("_", " ") for a in analyses)
        log.exception("analyses %s failed", what)
        raise DashboardError(f"{what} failed: {user_message(exc)}") from exc


def cached(
    name_or_path: str,
    prompts: Prompts | None,
    what: str,
    params: Mapping[str, Any],
    compute: Callable[[], S],
) -> S:
    """A saved object (a direction, a fitted controller) through the results cache.

    The key covers the model, ``prompts`` (or ``None``), ``what`` and
    ``params`` (everything the object depends on that is not in the
    prompts) and the code version; ``compute`` runs while no other analysis
    uses a model (hooks are model state).
    """
    cache = results_cache()
    key = cached_key(name_or_path, prompts, what, params)
    try:
        return cache.get_or_compute(key, lambda: run_alone(compute))
    except (DashboardError, NotCached):
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        raise DashboardError(f"{what.replace('_', ' ')} failed: {user_message(exc)}") from exc


def cached_key(name_or_path: str, prompts: Prompts | None, what: str, params: Mapping[str, Any]) -> str:
    """The results-cache key under which :func:`cached` keeps ``what`` (what a download reads back)."""
    return request_key(model_id(name_or_path), None if prompts is None else prompts.key(), what, params)


def run_alone(compute: Callable[[], T]) -> T:
    """``compute()`` while no other analysis runs: hooks are model state, shared by every tab."""
    with _models_turn():
        return compute()


@contextmanager
def _models_turn() -> Iterator[None]:
    """Hold the lock on every model; a cancelled job stops waiting for it (:class:`Cancelled`).

    Every computation goes through here: under :func:`cached_only` it raises :class:`NotCached`.
    """
    if _cached_only.get():
        raise NotCached("the answer needs an analysis run")
    while not _run_lock.acquire(timeout=0.1):
        check_cancelled()
    try:
        check_cancelled()
        yield
    finally:
        _run_lock.release()


# ------------------------------------------------------------ background jobs
_stop: ContextVar[threading.Event | None] = ContextVar("dynalens_dashboard_job_stop", default=None)


def background(bar: Any) -> dict[str, Any]:
    """The ``dash.callback`` keywords that run a long page callback as a background job.

    ``bar`` is the page's ``components.ProgressBar``: it shows while the job
    runs (``bar.running``) and its Cancel button (``bar.cancel``) stops the job.
    Pass the bar's key as the callback's last ``State`` and report under it::

        @callback(Output(...), Input(REQUEST, "data"), BAR.key, **backend.background(BAR))
        def panel(request, key):
            with backend.reporting(key) as report:
                ...

    The app's job manager (``dashboard/jobs.py``) runs it; the page polls for
    the result every ``JOB_POLL_MS``.
    """
    return {"background": True, "running": bar.running, "cancel": [bar.cancel], "interval": JOB_POLL_MS}


@contextmanager
def stoppable(stop: threading.Event) -> Iterator[None]:
    """Within the block, :func:`check_cancelled` (and every progress report) raises once ``stop`` is set."""
    token = _stop.set(stop)
    try:
        yield
    finally:
        _stop.reset(token)


def check_cancelled(stop: threading.Event | None = None) -> None:
    """Raise :class:`Cancelled` when the running job (or ``stop``, when given) was asked to stop."""
    stop = _stop.get() if stop is None else stop
    if stop is not None and stop.is_set():
        raise Cancelled("Cancelled: the analysis was stopped before it finished; nothing was stored. "
                        "Run it again to see its result.")


def user_message(exc: BaseException) -> str:
    """One readable line for ``exc``: its own message (KeyError's unquoted), else its type."""
    if isinstance(exc, DashboardError):
        return str(exc)
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return text or type(exc).__name__


# ------------------------------------------------------------------ progress
@dataclass(frozen=True)
class Progress:
    """Where a long callback stands: ``value`` of ``steps`` done (fractions within a step) and its current step."""

    value: float
    steps: int
    label: str


_progress: dict[str, tuple[ProgressReport, Progress]] = {}  # key: (the report that wrote last, what it wrote)
_progress_lock = threading.Lock()


class ProgressReport:
    """The progress of one long callback, published under ``key`` for :func:`read_progress`.

    The work is ``steps`` steps; :meth:`step` starts the next one, optionally
    with its size in units that :meth:`advance` counts (checkpoints, or the
    sequences a model reads, see :func:`counting_sequences`). Get one from
    :func:`reporting`, which removes it when the work ends.
    """

    def __init__(self, key: str, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps!r}")
        self.key, self.steps = key, steps
        self._step, self._size, self._done, self._label = 0, None, 0.0, ""
        self._lock = threading.Lock()  # hooks may tick from another thread than the one stepping
        self._stop = _stop.get()  # the job this report belongs to: hooks in other threads see it too

    def step(self, label: str, size: float | None = None) -> None:
        """Start the next step: ``label`` says what it does, ``size`` how many units it counts (None: unknown).

        Raises
        ------
        Cancelled
            When the job reporting was asked to stop (so is :meth:`advance`).
        """
        check_cancelled(self._stop)
        with self._lock:
            self._step, self._size, self._done, self._label = min(self._step + 1, self.steps), size, 0.0, label
        self._publish()

    def advance(self, units: float = 1.0, label: str | None = None) -> None:
        """Count ``units`` more of the current step done; ``label`` replaces its label."""
        check_cancelled(self._stop)
        with self._lock:
            self._done += units
            self._label = self._label if label is None else label
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            within = min(1.0, self._done / self._size) if self._size else 0.0
            value = max(0, self._step - 1) + within
            label = f"{self._label} (step {self._step} of {self.steps})" if self.steps > 1 else self._label
        if self.key:
            with _progress_lock:
                _progress[self.key] = (self, Progress(value, self.steps, label))


@contextmanager
def reporting(key: str | None, steps: int = 1) -> Iterator[ProgressReport]:
    """A :class:`ProgressReport` of ``steps`` steps under ``key`` (None: reported nowhere), removed on exit.

    A run the page superseded (its inputs changed while it ran) may end after
    the next run started reporting under the same key: it removes only its own report.
    """
    report = ProgressReport(key or "", steps)
    try:
        yield report
    finally:
        with _progress_lock:
            if _progress.get(report.key, (None,))[0] is report:
                del _progress[report.key]


def read_progress(key: str | None) -> Progress | None:
    """The latest progress published under ``key``; None before the first step and after the work ends."""
    with _progress_lock:
        return _progress.get(key or "", (None, None))[1]


def counting_sequences(model: Any, report: ProgressReport, compute: Callable[[], T]) -> Callable[[], T]:
    """``compute`` wrapped so that each sequence ``model`` reads advances ``report`` by one unit.

    A forward pass over ``b`` sequences advances it by ``b``, a share after
    each block (hooks ``names.resid_post(l)``), so the bar moves within
    a pass; one generated token is one sequence read. Run the wrapped function
    under :func:`run_alone` (:func:`page_results` and :func:`cached` do): hooks are model state.
    """
    n_layers = model.cfg.n_layers

    def tick(act: Tensor, hook: Any) -> None:
        report.advance(act.shape[0] / n_layers)

    def counted() -> T:
        with model.hooks(fwd_hooks=[(names.resid_post(layer), tick) for layer in range(n_layers)]):
            return compute()

    return counted
