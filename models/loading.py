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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dynalens.models import smollm2
from dynalens.models.io import read_json
from dynalens.models.validation import closest_names


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
) -> Any:
    """Load a model by built-in name, zoo name, folder or GGUF file.

    Parameters
    ----------
    name_or_path
        ``"smollm2-135m"``; a zoo name (``dynalens models`` lists them); a folder
        with a ``config.json`` (``model_type`` ``"mamba"`` → ``HookedMamba``, ``"mamba2"`` → ``HookedMamba2``,
        ``"dynalens-rnn"`` → ``HookedRNN``, anything else → a HuggingFace causal LM
        behind :class:`~dynalens.models.transformer.HookedTransformerBridge`); or a
        ``.gguf`` file (a transformer, dequantised).
    device, dtype
        Where and in what precision to put the weights (default: CPU, float32).

    Returns
    -------
    HookedTransformerBridge | HookedMamba | HookedRNN
        A model with ``run_with_cache``, ``run_with_hooks``, ``generate`` and the
        shared hook names.
    """
    from dynalens.models.transformer import HookedTransformerBridge

    key = str(name_or_path)
    if key == smollm2.NAME:
        model = HookedTransformerBridge.from_pretrained(
            smollm2.cached_folder(), device=device, dtype=dtype
        )
        return _named(model, key)
    zoo = _zoo()
    if key in zoo and not Path(key).exists():
        return _named(load(zoo[key].path, device=device, dtype=dtype), key)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return HookedTransformerBridge.from_gguf(path, device=device, dtype=dtype)
    if path.is_dir():
        return _load_folder(path, device=device, dtype=dtype)
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


def _load_folder(folder: Path, **kwargs: Any) -> Any:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: pass a folder written by save_pretrained "
            "(dynalens or HuggingFace), a .gguf file or a built-in name"
        )
    model_type = read_json(config_path).get("model_type")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if model_type == "mamba":
        from dynalens.models.mamba import HookedMamba

        return HookedMamba.from_pretrained(folder, **kwargs)
    if model_type == "mamba2":
        from dynalens.models.mamba2 import HookedMamba2

        return HookedMamba2.from_pretrained(folder, **kwargs)
    if model_type == "dynalens-rnn":
        from dynalens.models.rnn import HookedRNN

        return HookedRNN.from_pretrained(folder, **kwargs)
    from dynalens.models.transformer import HookedTransformerBridge

    return HookedTransformerBridge.from_pretrained(folder, **kwargs)


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
    """Number of weights in a safetensors file, read from its header only."""
    with safe_open(str(safetensors_file), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
