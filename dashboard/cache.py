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

The cache has a **size limit** in bytes: after each store, the least
recently used entries are deleted until the entries fit (the one just stored
is always kept, so a single entry larger than the limit lives until the next
store). An entry's last use is its file's modification time, set when it is
stored and again each time it is loaded, so the order survives a restart and
is shared by every process that serves from the same folder.
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
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from dynalens._version import __version__
from dynalens.models.io import cache_dir, digest_tensor, tensor_bytes
from dynalens.models.prompts import Prompts
from dynalens.probes.results import Saved

S = TypeVar("S", bound=Saved)

#: The subpackages whose code computes results (the dashboard only draws them).
LIBRARY_PACKAGES = ("dynalens", "dynalens.models", "dynalens.probes", "dynalens.circuits", "dynalens.kernels")

#: File types of the library that can change a result: code and the data it reads.
SOURCE_SUFFIXES = (".py", ".json", ".jsonl", ".safetensors")

_SKIP_DIRS = {"__pycache__", "zoo", "dashboard"}  # zoo weights are identified by ``model_id``

DEFAULT_MAX_BYTES = 2 * 1024**3
"""The results cache's default size limit: 2 GiB."""


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
        return {"tensor": f"{value.dtype}{list(value.shape)}", "sha256": hashlib.sha256(tensor_bytes(value)).hexdigest()}
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
            digest_tensor(digest, name, tensor)
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


def _mark_used(path: Path) -> None:
    """Set the file's times to now, at full precision (a file system stamps writes to the clock tick only)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:  # evicted meanwhile by another store; whoever read it has it whole
        pass


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ResultsCache:
    """Saved objects (Results, directions, controllers) on disk under ``root``, by key.

    Parameters
    ----------
    root : path, optional
        The cache folder; default ``<dynalens cache dir>/dashboard``.
    max_bytes : int or None
        Size limit of the entries in bytes; the least recently used go first
        (see the module docstring). None: no limit.

    Examples
    --------
    >>> cache = ResultsCache("/tmp/dl-cache")                            # doctest: +SKIP
    >>> key = analysis_key("name:smollm2-135m", prompts, dl.probes.LogitLens(k=5))  # doctest: +SKIP
    >>> lens = cache.get_or_compute(key, lambda: dl.probes.LogitLens(k=5)(model, prompts))  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES):
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be a number of bytes (an int >= 0) or None, got {max_bytes!r}")
        self.root = Path(root) if root is not None else cache_dir() / "dashboard"
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._evicting = threading.Lock()

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
        value = Saved.load(path)
        _mark_used(path)
        return value

    def store(self, key: str, value: Saved) -> None:
        """Save ``value`` under ``key`` (atomically: a reader never sees half a file), then keep to the size limit."""
        value.save(self.path(key))
        _mark_used(self.path(key))
        self.evict(keep=key)

    def entries(self) -> list[tuple[Path, int, int]]:
        """Every entry as ``(path, bytes, last use in ns)``, least recently used first."""
        found = []
        for path in self.root.glob("??/*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another thread or process meanwhile
                continue
            found.append((path, stat.st_size, stat.st_mtime_ns))
        return sorted(found, key=lambda entry: (entry[2], entry[0].name))

    def size(self) -> int:
        """The bytes the entries take."""
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: str | None = None) -> list[Path]:
        """Delete the least recently used entries until they fit in ``max_bytes`` (never ``keep``); the deleted."""
        if self.max_bytes is None:
            return []
        with self._evicting:
            entries = self.entries()
            total, deleted = sum(size for _, size, _ in entries), []
            for path, size, _ in entries:
                if total <= self.max_bytes:
                    break
                if keep is not None and path == self.path(keep):
                    continue
                path.unlink(missing_ok=True)
                total -= size
                deleted.append(path)
            return deleted

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
