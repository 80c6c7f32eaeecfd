"""A results cache on disk: the same model, prompts, analysis and code compute once.

An entry is one record file (``Saved.save``: safetensors + JSON metadata,
written atomically, never pickled) named by the SHA-256 of

- the **model** (``dashboard.backend.model_id``: a name and version, or a
  folder's file sizes and times),
- the **prompts** (``Prompts.key()``: token ids and mask; ``None`` for
  weight-only analyses),
- the **analysis**: its class (module and name) and its parameters
  (``get_params()``, as plain JSON),
- the **code**: the dynalens version and a digest of the library's source
  (every ``.py`` file and shipped data file of ``dynalens``, ``models``,
  ``probes``, ``circuits`` and ``kernels``; zoo weights are identified by the
  model id, and the dashboard's own files are left out, since they only draw). An edit of any helper an analysis calls changes the key,
  so a stale result is never read back.

``Saved.load`` reads any entry back as the type it holds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from dynalens._version import __version__
from dynalens.models.io import cache_dir
from dynalens.models.prompts import Prompts
from dynalens.probes.results import Saved

S = TypeVar("S", bound=Saved)

#: The subpackages whose code computes results (the dashboard only draws them).
LIBRARY_PACKAGES = ("dynalens", "dynalens.models", "dynalens.probes", "dynalens.circuits", "dynalens.kernels")

#: File types of the library that can change a result: code and the data it reads.
SOURCE_SUFFIXES = (".py", ".json", ".jsonl", ".safetensors")

_SKIP_DIRS = {"__pycache__", "zoo", "dashboard"}  # zoo weights are identified by ``model_id``


def source_digest(folders: Iterable[str | os.PathLike]) -> str:
    """A SHA-256 over every source file under ``folders`` (relative path and bytes, in sorted order).

    Only files ending in ``SOURCE_SUFFIXES`` count; ``__pycache__``, ``zoo``
    and ``dashboard`` folders are skipped.
    """
    digest = hashlib.sha256()
    for folder in sorted({Path(f).resolve() for f in folders}):
        files = sorted(
            p for p in folder.rglob("*")
            if p.suffix in SOURCE_SUFFIXES and p.is_file()
            and not _SKIP_DIRS.intersection(p.relative_to(folder).parts[:-1])
        )  # fmt: skip
        for path in files:
            digest.update(f"{folder.name}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def library_folders() -> list[Path]:
    """The folders of ``LIBRARY_PACKAGES`` in this installation."""
    folders = []
    for name in LIBRARY_PACKAGES:
        module = importlib.import_module(name)
        folders += [Path(p) for p in getattr(module, "__path__", [])]
    return folders


@functools.cache
def code_version() -> str:
    """``"{dynalens version}+{source digest}"``: changes with any edit of the library (read once per process)."""
    return f"{__version__}+{source_digest(library_folders())[:16]}"


def plain_params(value: Any) -> Any:
    """``value`` as plain JSON for a key: tensors by digest, prompts by ``key()``, analyses by class and params.

    A model (any ``torch.nn.Module``) is its class and :func:`weights_digest`;
    a saved object (a Result, a direction) its class and every saved field.

    Floats that are not finite become strings; any other object its
    ``repr`` (an object whose repr holds its address never hits the cache,
    which is safe).
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [plain_params(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain_params(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"tensor": f"{t.dtype}{list(t.shape)}", "sha256": hashlib.sha256(data).hexdigest()}
    if isinstance(value, Prompts):
        return {"prompts": value.key()}
    if isinstance(value, torch.nn.Module):
        return {"module": _class_name(type(value)), "weights": weights_digest(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Saved):  # a Result or a fitted object passed as a parameter: all its fields
        return {"saved": _class_name(type(value)), "fields": plain_params(value._fields())}
    if hasattr(value, "get_params"):
        return {"class": _class_name(type(value)), "params": plain_params(value.get_params())}
    return repr(value)


_weights_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_digest(module: torch.nn.Module) -> str:
    """A SHA-256 of a module's parameters and buffers, computed once per module object.

    The dashboard never changes weights (steering adds hooks), so a loaded
    model keeps its digest.
    """
    if module not in _weights_digests:
        digest = hashlib.sha256()
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        _weights_digests[module] = digest.hexdigest()
    return _weights_digests[module]


def request_key(
    model_id: str,
    prompts: str | None,
    analysis: str,
    params: Mapping[str, Any] | None = None,
    version: str | None = None,
) -> str:
    """The hex SHA-256 naming one analysis of some prompts by one model and one version of the code.

    Parameters
    ----------
    model_id : str
        Identifies the weights (``dashboard.backend.model_id``).
    prompts : str or None
        ``Prompts.key()`` of the batch; ``None`` for results of weights alone.
    analysis : str
        The analysis' class, ``"module.Name"``, or another name for what is cached.
    params : mapping, optional
        Its parameters (``get_params()``); made plain with :func:`plain_params`.
    version : str, optional
        The code version; default :func:`code_version`.
    """
    payload = json.dumps(
        {
            "model": model_id,
            "prompts": prompts,
            "analysis": analysis,
            "params": plain_params(dict(params or {})),
            "version": code_version() if version is None else version,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def analysis_key(model_id: str, prompts: Prompts | None, analysis: Any) -> str:
    """:func:`request_key` of an analysis object: its class, its ``get_params()``, the prompts' ``key()``."""
    return request_key(
        model_id, None if prompts is None else prompts.key(), _class_name(type(analysis)), analysis.get_params()
    )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ResultsCache:
    """Saved objects (Results, directions, controllers) on disk under ``root``, by key.

    Parameters
    ----------
    root : path, optional
        The cache folder; default ``<dynalens cache dir>/dashboard``.

    Examples
    --------
    >>> cache = ResultsCache("/tmp/dl-cache")                            # doctest: +SKIP
    >>> key = analysis_key("name:smollm2-135m", prompts, dl.probes.LogitLens(k=5))  # doctest: +SKIP
    >>> lens = cache.get_or_compute(key, lambda: dl.probes.LogitLens(k=5)(model, prompts))  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "dashboard"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def path(self, key: str) -> Path:
        """The record file of entry ``key``."""
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> Saved:
        """The object stored under ``key`` (``KeyError`` when there is none)."""
        path = self.path(key)
        if not path.is_file():
            raise KeyError(f"no cached result {key}")
        return Saved.load(path)

    def store(self, key: str, value: Saved) -> None:
        """Save ``value`` under ``key`` (atomically: a reader never sees half a file)."""
        value.save(self.path(key))

    def get_or_compute(self, key: str, compute: Callable[[], S]) -> S:
        """The object stored under ``key``, or ``compute()`` stored there and returned.

        Concurrent identical requests in this process compute once; a failed
        computation stores nothing.
        """
        with self.lock(key):
            if key in self:
                return self.load(key)  # type: ignore[return-value]
            value = compute()
            self.store(key, value)
            return value

    def clear(self) -> None:
        """Delete every entry."""
        shutil.rmtree(self.root, ignore_errors=True)

    def lock(self, key: str) -> threading.Lock:
        """The lock of entry ``key`` in this process."""
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())
