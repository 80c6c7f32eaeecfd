"""A results cache on disk: the same model, prompt and analysis are computed once.

Each entry is one folder named by a SHA-256 of ``(model id, token ids,
analysis name, parameters)`` and of the source of the module defining the
result type, so results written by other analysis code are never read back;
inside it the result writes itself with its own ``save`` (safetensors + JSON),
and ``load`` of the result type reads it back. Nothing is pickled, so a cache
folder shared between users is safe to read.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dynalens.models.io import atomic_dir, cache_dir


class SavableResult(Protocol):
    """What the cache needs of a result: ``save(path)`` and ``load(path)``."""

    def save(self, path: str | os.PathLike) -> Any: ...

    @classmethod
    def load(cls, path: str | os.PathLike) -> SavableResult: ...


R = TypeVar("R", bound=SavableResult)

_ENTRY = "result.safetensors"  # the file inside an entry folder that a result saves to


def request_key(
    model_id: str, tokens: Sequence[int], analysis: str, params: Mapping[str, Any] | None = None
) -> str:
    """The hex SHA-256 naming one analysis of one prompt by one model.

    Parameters
    ----------
    model_id : str
        Identifies the weights (see ``dashboard.backend.model_id``).
    tokens : sequence of int
        The prompt's token ids.
    analysis : str
        The analysis name, e.g. ``"logit_lens"``.
    params : mapping, optional
        JSON-serialisable parameters of the analysis (``{"layer": 3}``).
    """
    payload = json.dumps(
        {
            "model": model_id,
            "tokens": [int(t) for t in tokens],
            "analysis": analysis,
            "params": dict(params or {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@functools.cache
def code_version(result_type: type) -> str:
    """A hash of the source file that defines ``result_type`` (its analysis and its format)."""
    source = inspect.getsourcefile(result_type)
    data = open(source, "rb").read() if source else result_type.__qualname__.encode()
    return hashlib.sha256(data).hexdigest()[:16]


class ResultsCache:
    """Result objects on disk under ``root``, keyed by :func:`request_key`.

    Parameters
    ----------
    root : path, optional
        The cache folder; default ``<dynalens cache dir>/dashboard``.

    Examples
    --------
    >>> cache = ResultsCache("/tmp/dl-cache")                      # doctest: +SKIP
    >>> norms = cache.get_or_compute(                              # doctest: +SKIP
    ...     ResidualNorms, "name:smollm2-135m", ids, "residual_norms", {},
    ...     lambda: dl.probes.residual_norms(model, tokens))
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "dashboard"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @staticmethod
    def key(
        result_type: type,
        model_id: str,
        tokens: Sequence[int],
        analysis: str,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """The entry key of a request: :func:`request_key` with the analysis code's version."""
        return request_key(
            model_id, tokens, analysis, {**(params or {}), "_code": code_version(result_type)}
        )

    def path(self, key: str) -> Path:
        """The folder of entry ``key``."""
        return self.root / key[:2] / key

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_dir()

    def get_or_compute(
        self,
        result_type: type[R],
        model_id: str,
        tokens: Sequence[int],
        analysis: str,
        params: Mapping[str, Any] | None,
        compute: Callable[[], R],
    ) -> R:
        """Load the cached result of this request, or compute, store and return it.

        Concurrent identical requests in this process compute once; the entry is
        written to a temporary folder and renamed into place, so a reader never
        sees half an entry.
        """
        key = self.key(result_type, model_id, tokens, analysis, params)
        with self._lock(key):
            folder = self.path(key)
            if folder.is_dir():
                return result_type.load(folder / _ENTRY)
            result = compute()
            with atomic_dir(folder) as tmp:
                result.save(tmp / _ENTRY)
            return result

    def clear(self) -> None:
        """Delete every entry."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())
