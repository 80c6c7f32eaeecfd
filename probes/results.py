"""The base of every analysis result: tensors plus what they were computed on.

A result is a dataclass. Subclasses only declare their fields and write
``top``, ``to_frame`` and ``figure``; saving and loading are generic: every
tensor field goes into one safetensors file and every other field (plain
JSON values: str, int, float, bool, None, lists and dicts of them) into that
file's metadata as JSON. Nothing is pickled, and the write is atomic.

Examples
--------
>>> norms = dl.probes.residual_norms(model, "Hello world")     # doctest: +SKIP
>>> norms.save("norms.safetensors")                            # doctest: +SKIP
>>> Result.load("norms.safetensors")                           # doctest: +SKIP
ResidualNorms(model_name='smollm2-135m', ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Int
from safetensors import safe_open
from torch import Tensor

from dynalens.models.io import write_safetensors

_METADATA_KEY = "dynalens.result"
R = TypeVar("R", bound="Result")


@dataclass(kw_only=True, eq=False)
class Result(ABC):
    """Tensors of one analysis plus the model and input they describe.

    Attributes
    ----------
    model_name
        Name or path the model was loaded from.
    architecture
        ``"transformer"``, ``"mamba"`` or ``"rnn"``.
    tokens
        The input token ids ``[pos]``.
    str_tokens
        One string per input token.
    """

    model_name: str
    architecture: str
    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]

    _registry: ClassVar[dict[str, type[Result]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Result._registry[cls.__name__] = cls

    @abstractmethod
    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` most salient entries, one row each, most salient first."""

    @abstractmethod
    def to_frame(self) -> pd.DataFrame:
        """Every value as one long-form table row."""

    @abstractmethod
    def figure(self, **options: Any) -> go.Figure:
        """The result drawn with plotly in the dynalens look (``probes/figures.py``)."""

    def summary(self) -> str:
        """A one-line description: tensors by shape, long lists by length."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                shown = f"Tensor{list(value.shape)}"
            elif isinstance(value, list) and len(value) > 4:
                shown = f"[{len(value)} items]"
            else:
                shown = repr(value)
            parts.append(f"{field.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.summary())  # IPython shows the summary, not every tensor value

    def position_index(self, position: int) -> int:
        """``position`` as an index into the tokens; negative values count from the end."""
        n = len(self.str_tokens)
        if isinstance(position, bool) or not -n <= position < n:
            raise IndexError(
                f"position {position!r} is out of range: valid positions are 0 to {n - 1} "
                f"(or -{n} to -1 from the end)"
            )
        return position % n

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the result to one safetensors file, atomically.

        Tensor fields become tensors; every other field is stored as JSON in
        the file's metadata, so it must be a plain JSON value.
        """
        tensors: dict[str, Tensor] = {}
        plain: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                tensors[field.name] = value.detach().cpu()
            else:
                plain[field.name] = value
        try:
            text = json.dumps({"type": type(self).__name__, "fields": plain})
        except TypeError as err:
            raise TypeError(
                f"{type(self).__name__} fields that are not tensors must be plain JSON values "
                f"(str, int, float, bool, None, lists and dicts of them): {err}"
            ) from None
        write_safetensors(path, tensors, metadata={_METADATA_KEY: text})

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read a result written by :meth:`save`.

        ``Result.load`` returns whichever result type the file holds; a
        subclass (``ResidualNorms.load``) checks that the file holds that type.
        """
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if _METADATA_KEY not in metadata:
                raise ValueError(f"{os.fspath(path)!r} is not a dynalens result file")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        stored = json.loads(metadata[_METADATA_KEY])
        kind = Result._registry.get(stored["type"])
        if kind is None or not issubclass(kind, cls):
            raise TypeError(
                f"{os.fspath(path)!r} holds a {stored['type']} result, not a {cls.__name__}"
            )
        return kind(**stored["fields"], **tensors)
