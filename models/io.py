"""Atomic file writing and the safetensors + JSON folder format.

Nothing here unpickles: weights are safetensors, configs and metadata JSON.
A write goes to a temporary file in the same folder and is renamed into place,
so a crash never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the first tensor: reading JSON (`dynalens models`) needs none
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, mode: int) -> None:
    """Give a ``mkstemp``/``mkdtemp`` result (owner-only) the usual permissions."""
    os.chmod(tmp, mode & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it onto ``path`` on success.

    An existing ``path`` is replaced only once the new folder is complete; with
    ``replace=False`` it is kept and the new folder dropped (the first of several
    concurrent writers wins, and readers never see ``path`` missing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.parent / f"{tmp.name}.old"
    try:
        yield tmp
        _publish(tmp, 0o777)
        if not replace:
            try:
                os.rename(tmp, path)  # fails when another writer's folder is in place
            except OSError:
                if not path.is_dir():
                    raise
            return
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors as safetensors, atomically (tensors that share memory are copied apart)."""
    from safetensors.torch import save_file

    flat, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        flat[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a dict of tensors."""
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_tokenizer(folder: str | os.PathLike) -> Any | None:
    """The ``AutoTokenizer`` saved in ``folder``, or ``None`` when it holds no tokenizer files."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def write_pretrained(obj: Any, folder: str | os.PathLike) -> None:
    """Save the files of a HuggingFace object's ``save_pretrained`` into ``folder``, each renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pretrained.") as tmp:
        obj.save_pretrained(tmp)
        for file in Path(tmp).iterdir():
            os.replace(file, folder / file.name)


def write_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> None:
    """Save a HuggingFace tokenizer's files into ``folder``, each renamed into place."""
    write_pretrained(tokenizer, folder)


def read_model_folder(folder: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], Any | None]:
    """The weights and the tokenizer (``None`` without one) of an HF-format model folder.

    Weights come from ``model.safetensors`` or the shards its index lists,
    never from pickled files. ``kind`` names the model in the error raised
    when ``folder`` has no ``config.json`` (e.g. ``"Mamba-2"``).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass an HF-format {kind} folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{folder} has no model.safetensors (or model.safetensors.index.json); "
            "dynalens reads safetensors only, never pickled .bin weights"
        )
    weights = {k: v for f in files for k, v in read_safetensors(f).items()}
    return weights, read_tokenizer(folder)


def write_model_folder(
    folder: str | os.PathLike, config: dict[str, Any], weights: dict[str, torch.Tensor], tokenizer: Any = None
) -> None:
    """Write an HF-format model folder: ``config.json``, ``model.safetensors`` and the tokenizer if any.

    Each file is written atomically; ``config`` is the HF config's JSON dict.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", weights, metadata={"format": "pt"})
    write_json(folder / "config.json", config)
    if tokenizer is not None:
        write_tokenizer(tokenizer, folder)


def cache_dir() -> Path:
    """The user cache folder of dynalens (``$DYNALENS_CACHE`` or ``~/.cache/dynalens``)."""
    root = os.environ.get("DYNALENS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dynalens"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ records
#: The safetensors metadata key that holds a record's JSON.
RECORD_KEY = "dynalens.record"
_PLAIN_JSON = frozenset({str, int, float, bool, type(None)})


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, on CPU in row-major order (what a digest of it reads)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def digest_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, the dtype, the shape and the values of ``tensor`` to a ``hashlib`` digest."""
    digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
    digest.update(tensor_bytes(tensor))


def write_record(path: str | os.PathLike, kind: str, fields: dict[str, Any]) -> None:
    """Write ``fields`` as one safetensors file, atomically: tensors as tensors, the rest as JSON.

    Values may be tensors, plain JSON values, and lists or dicts (string keys)
    nesting them; each tensor is stored under its path (``scores``,
    ``curves.0``, ``weights.layer_3``) and the JSON names that path. Nothing
    is pickled. :func:`read_record` returns ``(kind, fields)``.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[where] = value.detach().cpu()
            return {"__tensor__": where}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"{kind}.{where}: dict keys must be strings to be saved")
            return {"__dict__": {k: encode(v, f"{where}.{k}") for k, v in value.items()}}
        if isinstance(value, (list, tuple)):
            if all(type(v) in _PLAIN_JSON for v in value):  # token ids, strings: as they are
                return list(value)
            return [encode(v, f"{where}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        raise TypeError(
            f"{kind}.{where} is a {type(value).__name__}: a saved field must be a tensor, a plain "
            "JSON value (str, int, float, bool, None) or a list or dict of them"
        )

    text = json.dumps({"type": kind, "fields": {k: encode(v, k) for k, v in fields.items()}})
    write_safetensors(path, tensors, metadata={RECORD_KEY: text})


def read_record(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The ``(kind, fields)`` that :func:`write_record` wrote to ``path``."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - OSError, or safetensors' own error (no public type)
        raise ValueError(f"{path!r} is not a dynalens record file (safetensors): {err}") from None
    if RECORD_KEY not in metadata:
        raise ValueError(f"{path!r} is a safetensors file but not a dynalens record")
    stored = json.loads(metadata[RECORD_KEY])

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            return {k: decode(v) for k, v in value["__dict__"].items()}
        return value

    return stored["type"], {k: decode(v) for k, v in stored["fields"].items()}
