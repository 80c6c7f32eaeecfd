"""The one small interface the pages draw from: models, prompts and cached results.

Models are held in a **process-level cache** keyed by the name or path the
user typed (at most ``MAX_MODELS``, least recently used dropped first): loading
SmolLM2 takes seconds, and every browser tab may share the same weights
because analyses never change them. Everything else a page needs (the chosen
model, prompt, position, layer) lives in the browser (``dcc.Store``), so two
tabs never see each other's work.

Errors meant for the user are :class:`DashboardError`; :func:`user_message`
turns any exception into one readable line, never a traceback.

A long callback reports how far it is with :func:`reporting` (a
:class:`ProgressReport` that it advances, by hand or per sequence the model
reads with :func:`counting_sequences`); the page's progress bar polls
:func:`read_progress` from another request thread while it runs. Reports are
keyed by a random id the page's layout holds, so tabs never see each other's.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import flask
import torch
from jaxtyping import Int
from torch import Tensor

import dynalens
from dynalens.circuits.directions import resid_name
from dynalens.dashboard.cache import ResultsCache, SavableResult

log = logging.getLogger("dynalens.dashboard")

MAX_MODELS = 3
"""Models kept loaded in one server process."""

MAX_PROMPT_TOKENS = 256
"""The longest prompt the dashboard analyses (mixer matrices grow as tokens squared)."""

CACHE_CONFIG_KEY = "DYNALENS_RESULTS_CACHE"
"""Where ``create_app`` puts the app's :class:`ResultsCache` in the Flask config."""

R = TypeVar("R", bound=SavableResult)
T = TypeVar("T")


class DashboardError(Exception):
    """An error whose message is shown to the user as is."""


_models: OrderedDict[str, Any] = OrderedDict()
_models_lock = threading.Lock()
# One analysis at a time in the whole server: hooks are model state, not per call,
# and the same model can be reached under several names (picker, path, preload).
_run_lock = threading.Lock()


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

    A local path is identified by its resolved location and the size and
    modification time of its top-level files; a built-in name by the name and
    the dynalens version (built-in weights ship with the package).
    """
    path = Path(name_or_path.strip()).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        return f"path:{path.resolve()}:{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    return f"name:{name_or_path.strip()}:{dynalens.__version__}"


def encode_prompt(model: Any, prompt: str) -> Int[Tensor, "1 pos"]:
    """The prompt's token ids ``[1, pos]``, checked against the model and the dashboard.

    A model without a tokenizer (the synthetic-task zoo models) takes token ids
    typed as integers separated by spaces or commas.
    """
    if not prompt or not prompt.strip():
        raise DashboardError("The prompt is empty: type some text to analyse.")
    try:
        if getattr(model, "tokenizer", None) is None:
            tokens = model.to_tokens(torch.tensor([_parse_ids(prompt)]))
        else:
            tokens = model.to_tokens(prompt)
    except DashboardError:
        raise
    except Exception as exc:
        raise DashboardError(user_message(exc)) from exc
    if tokens.shape[-1] > MAX_PROMPT_TOKENS:
        raise DashboardError(
            f"The prompt is {tokens.shape[-1]} tokens long; the dashboard analyses at most "
            f"{MAX_PROMPT_TOKENS} tokens. Shorten the prompt."
        )
    return tokens[:1]


def _parse_ids(prompt: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", prompt.strip()) if p]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise DashboardError(
            "This model has no tokenizer, so the prompt must be token ids: integers separated "
            "by spaces or commas, e.g. '3 14 15 9 2 6'."
        )
    return [int(p) for p in parts]


def cached_result(
    result_type: type[R],
    name_or_path: str,
    tokens: list[int],
    analysis: str,
    params: Mapping[str, Any],
    compute: Callable[[], R],
) -> R:
    """The result of ``compute()`` through the app's results cache (see ``create_app``).

    ``compute`` runs while no other analysis uses the same model: the Flask
    server answers callbacks in threads, and a forward pass with hooks
    (``run_with_cache``) adds them to the shared model, so two at once would
    see each other's hooks.
    """
    cache: ResultsCache = flask.current_app.config[CACHE_CONFIG_KEY]
    try:
        return cache.get_or_compute(
            result_type, model_id(name_or_path), tokens, analysis, params, lambda: run_alone(compute)
        )
    except DashboardError:
        raise
    except Exception as exc:
        log.exception("analysis %s failed", analysis)
        raise DashboardError(f"{analysis.replace('_', ' ')} failed: {user_message(exc)}") from exc


def run_alone(compute: Callable[[], T]) -> T:
    """``compute()`` while no other analysis runs: hooks are model state, shared by every tab."""
    with _run_lock:
        return compute()


def user_message(exc: BaseException) -> str:
    """One readable line for ``exc``: its own message (KeyError's unquoted), else its type."""
    if isinstance(exc, DashboardError):
        return str(exc)
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return text or type(exc).__name__


def model_and_tokens(request: Mapping[str, Any]) -> tuple[Any, Int[Tensor, "1 pos"]]:
    """The model and the prompt's token ids of a page request ``{"model": ..., "prompt": ...}``."""
    model = load_model(request["model"])
    return model, encode_prompt(model, request["prompt"])


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

    def step(self, label: str, size: float | None = None) -> None:
        """Start the next step: ``label`` says what it does, ``size`` how many units it counts (None: unknown)."""
        with self._lock:
            self._step, self._size, self._done, self._label = min(self._step + 1, self.steps), size, 0.0, label
        self._publish()

    def advance(self, units: float = 1.0, label: str | None = None) -> None:
        """Count ``units`` more of the current step done; ``label`` replaces its label."""
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
    each block (hooks ``blocks.{l}.hook_resid_post``), so the bar moves within
    a pass; one generated token is one sequence read. Run the wrapped function
    under :func:`run_alone` (:func:`cached_result` does): hooks are model state.
    """
    n_layers = model.cfg.n_layers

    def tick(act: Tensor, hook: Any) -> None:
        report.advance(act.shape[0] / n_layers)

    def counted() -> T:
        with model.hooks(fwd_hooks=[(resid_name(layer), tick) for layer in range(n_layers)]):
            return compute()

    return counted
