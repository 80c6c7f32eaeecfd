"""``dynalens.load``: one call for built-in names, zoo names, folders and GGUF files.

>>> import dynalens as dl
>>> [row.name for row in dl.list_models()][:1]
['smollm2-135m']
>>> model = dl.load("smollm2-135m")            # doctest: +SKIP
>>> rnn = dl.load("path/to/folder")            # doctest: +SKIP

Weights are read from safetensors or GGUF only; nothing is unpickled.
"""

from __future__ import annotations

import importlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynalens.models import smollm2
from dynalens.models.building import building
from dynalens.models.io import read_json

if TYPE_CHECKING:  # torch loads with the first model: `dynalens models` needs none
    import torch


@dataclass(frozen=True)
class ModelRow:
    """One line of :func:`list_models`."""

    name: str
    architecture: str  # "transformer" | "mamba" | "mamba2" | "rnn"
    parameters: int | None  # None when the weights are not on disk yet
    description: str

    @property
    def size(self) -> str:
        """The parameter count in short form (``134.5M``); ``-`` when unknown."""
        if self.parameters is None:
            return "-"
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if self.parameters >= scale:
                return f"{self.parameters / scale:.1f}{unit}"
        return str(self.parameters)


def list_models() -> list[ModelRow]:
    """The models ``load`` knows by name: the built-in SmolLM2, then the zoo."""
    rows = [ModelRow(smollm2.NAME, "transformer", smollm2.N_PARAMETERS, smollm2.DESCRIPTION)]
    for entry in _zoo().values():
        weights = Path(entry.path) / "model.safetensors"
        n = _count_parameters(weights) if weights.is_file() else None
        rows.append(ModelRow(entry.name, entry.architecture, n, entry.description))
    return rows


def load(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> Any:
    """Load a model by built-in name, zoo name, folder or GGUF file.

    Parameters
    ----------
    name_or_path
        ``"smollm2-135m"``; a zoo name (``dynalens models`` lists them); a folder
        with a ``config.json`` (``model_type`` ``"mamba"``, ``"falcon_mamba"`` → ``HookedMamba``,
        ``"mamba2"`` → ``HookedMamba2``,
        ``"dynalens-rnn"`` → ``HookedRNN``, an SSM/attention hybrid (Bamba, Nemotron-H,
        GraniteMoeHybrid, Zamba2, Falcon-H1, Jamba) → ``HookedHybrid``, anything else → a HuggingFace causal LM
        behind :class:`~dynalens.models.transformer.HookedTransformerBridge`); or a
        ``.gguf`` file (dequantised; a Mamba GGUF → ``HookedMamba``, any other
        architecture transformers reads from GGUF → the Bridge).
    device, dtype
        Where and in what precision to put the weights (default: CPU, float32).
    device_map, max_memory, offload_folder
        Spread the model over devices instead: ``"auto"`` (with ``max_memory``,
        e.g. ``{0: "10GiB", "cpu": "30GiB"}``) or module name → device, ``"disk"``
        modules keeping their weights in ``offload_folder``. Transformers are
        placed by transformers (accelerate); our models block by block
        (``models/placement.py``).

    Returns
    -------
    HookedTransformerBridge | HookedMamba | HookedMamba2 | HookedHybrid | HookedRNN
        A model with ``run_with_cache``, ``run_with_hooks``, ``generate`` and the
        shared hook names.
    """
    with building():  # transformers and torch's meta device are process-wide: one load at a time
        return _load(name_or_path, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                     offload_folder=offload_folder)  # fmt: skip


def _load(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[Any, Any] | None,
    offload_folder: str | Path | None,
) -> Any:
    from dynalens.models.transformer import HookedTransformerBridge

    key = str(name_or_path)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    if key == smollm2.NAME:
        model = HookedTransformerBridge.from_pretrained(
            smollm2.cached_folder(), device=device, dtype=dtype, **placement
        )
        return _named(model, key)
    zoo = _zoo()
    if key in zoo and not Path(key).exists():
        return _named(_load(zoo[key].path, device=device, dtype=dtype, **placement), key)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if device_map is not None:
            raise ValueError("device_map applies to model folders: a GGUF file is dequantised in memory")
        return _named(_load_gguf(check_gguf(path), device=device, dtype=dtype), key)
    if path.is_dir():
        return _named(_load_folder(path, device=device, dtype=dtype, **placement), key)
    from dynalens.models.validation import closest_names

    names = [row.name for row in list_models()]
    close = closest_names(key, names)
    ordered = close + [n for n in names if n not in close]
    raise ValueError(
        f"cannot load {key!r}: it is not a built-in name, nor a model folder, nor a .gguf file. "
        f"Built-in names (closest first): {', '.join(ordered)}"
    )


def _named(model: Any, name: str) -> Any:
    """Record the name the model was loaded by (results and the dashboard show it)."""
    model.cfg.model_name = name
    return model


def _load_folder(folder: Path, *, device_map: Any, max_memory: Any, offload_folder: Any, **kwargs: Any) -> Any:
    model_type = folder_model_type(folder)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if model_type in OWN_MODEL_TYPES:
        if model_type in ("mamba", "falcon_mamba"):
            from dynalens.models.mamba import HookedMamba as own
        elif model_type == "mamba2":
            from dynalens.models.mamba2 import HookedMamba2 as own
        else:
            from dynalens.models.rnn import HookedRNN as own
        model = own.from_pretrained(folder, **kwargs)
        if device_map is None:
            return model
        from dynalens.models.placement import place

        return place(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
    from dynalens.models.hybrid import HYBRID_MODEL_TYPES, load_hybrid
    from dynalens.models.transformer import HookedTransformerBridge

    if model_type in HYBRID_MODEL_TYPES:
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        return load_hybrid(folder, **placement, **kwargs)
    return HookedTransformerBridge.from_pretrained(
        folder, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, **kwargs
    )


def _load_gguf(path: Path, *, device: str | torch.device | None, dtype: torch.dtype | None) -> Any:
    """A GGUF file of any architecture transformers reads: Mamba → ``HookedMamba``, else the Bridge."""
    import torch

    from dynalens.models.transformer import HookedTransformerBridge, hf_from_gguf

    hf_model, tokenizer = hf_from_gguf(path, dtype=dtype or torch.float32)
    if hf_model.config.model_type == "mamba":
        from dynalens.models.mamba import HookedMamba

        return HookedMamba.from_hf(hf_model, tokenizer, dtype=dtype or torch.float32).to(device or "cpu")
    return HookedTransformerBridge.from_hf(hf_model.to(device or "cpu"), tokenizer, name=str(path))


#: ``model_type`` values dynalens opens with its own classes; any other must be a transformers type.
OWN_MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2", "dynalens-rnn")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def folder_model_type(folder: Path) -> str:
    """The ``model_type`` of a model folder, after checking it is one dynalens can load.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file and what is
    accepted: a missing or corrupt ``config.json``, an unknown ``model_type``,
    weights in pickled files only.
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: pass a folder written by save_pretrained "
            "(dynalens or HuggingFace), a .gguf file or a built-in name"
        )
    try:
        config = read_json(config_path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): a model's config.json must be a JSON object") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ValueError(f"{config_path} has no \"model_type\": it must name the architecture (e.g. \"llama\", \"mamba\")")
    if model_type not in OWN_MODEL_TYPES:
        from transformers import CONFIG_MAPPING

        from dynalens.models.validation import closest_names

        if model_type not in CONFIG_MAPPING:
            close = closest_names(model_type, [*OWN_MODEL_TYPES, *CONFIG_MAPPING.keys()])
            raise ValueError(
                f"{config_path}: unknown model_type {model_type!r}; dynalens opens "
                f"{', '.join(OWN_MODEL_TYPES)} and every model_type transformers knows"
                f"{' (closest: ' + ', '.join(close) + ')' if close else ''}"
            )
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise ValueError(
                f"{folder} holds weights only in pickled files ({', '.join(pickled)}): dynalens never "
                "unpickles; convert them to safetensors (model.save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"{folder} has no *.safetensors weights next to its config.json")
    return model_type


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> Path:
    """``path`` if it is a GGUF file (by its magic bytes); else a ``ValueError`` naming it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path


def _zoo() -> dict[str, Any]:
    """The zoo's entries by name; empty while ``dynalens.models.zoo`` does not exist."""
    try:
        zoo = importlib.import_module("dynalens.models.zoo")
    except ModuleNotFoundError as err:
        if err.name != "dynalens.models.zoo":
            raise
        return {}
    return zoo.ZOO


def _count_parameters(safetensors_file: Path) -> int:
    """Number of weights in a safetensors file, read from its header only (no tensor library loads).

    The format: 8 bytes, little-endian, the header's length; the header, JSON
    mapping each tensor's name to its ``dtype``, ``shape`` and ``data_offsets``
    (and ``__metadata__`` to strings).
    """
    with open(safetensors_file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
