"""What every analysis returns, and the one file format everything is saved in.

A :class:`Result` is a dataclass with its provenance (model, architecture,
dynalens version, the analysis' parameters), the prompts it was computed on
(none, one or many: a :class:`~dynalens.models.prompts.Prompts`), and its own
fields. Subclasses declare fields and write ``top``, ``to_frame`` and
``figure``; saving is generic.

Tensors with a position axis keep the prompts' left-padded layout
``[batch, pos, ...]``; positions that ``to_frame`` and ``top`` report count
each prompt's real tokens from 0.

:class:`Saved` is the persistence every dynalens object shares (results,
directions, steering controllers, refusal classifiers): one safetensors file
whose metadata holds the JSON fields, written atomically, never pickled
(``models/io.py``, ``write_record``). ``Saved.load`` returns whichever type
the file holds.

Examples
--------
>>> lens = dl.probes.LogitLens(k=5)(model, "Hello world")     # doctest: +SKIP
>>> lens.save("lens.safetensors")                             # doctest: +SKIP
>>> Result.load("lens.safetensors")                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pandas as pd
import plotly.graph_objects as go
from torch import Tensor

from dynalens.models.io import read_record, write_record
from dynalens.models.prompts import Prompts

S = TypeVar("S", bound="Saved")


class Saved(ABC):
    """Objects saved as one record file (``save(path)``, ``Class.load(path)``).

    Subclasses give :meth:`_fields` (a dict of tensors and plain JSON values)
    and :meth:`_from_fields` (the inverse).
    """

    _registry: ClassVar[dict[str, type[Saved]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Saved._registry[cls.__name__] = cls

    @staticmethod
    def registered(kind: str) -> type[Saved] | None:
        """The subclass named ``kind``, or ``None``.

        ``dl.probes`` and ``dl.circuits`` import their modules on first use, so a
        file may name a class whose module has not been imported yet: on a miss
        their modules are imported (registering every class they define) first.
        """
        if kind not in Saved._registry:
            from dynalens._lazy import import_submodules

            import_submodules("dynalens.probes")
            import_submodules("dynalens.circuits")
        return Saved._registry.get(kind)

    @abstractmethod
    def _fields(self) -> dict[str, Any]:
        """The fields to save: tensors, plain JSON values, lists and dicts of them."""

    @classmethod
    @abstractmethod
    def _from_fields(cls: type[S], fields: dict[str, Any]) -> S:
        """The object :meth:`_fields` describes."""

    def save(self, path: str | os.PathLike) -> None:
        """Write to one safetensors file (tensors + JSON metadata), atomically."""
        write_record(path, type(self).__name__, self._fields())

    @classmethod
    def load(cls: type[S], path: str | os.PathLike) -> S:
        """Read what :meth:`save` wrote; ``cls`` checks the file holds that type (or a subclass)."""
        kind, fields = read_record(path)
        saved = Saved.registered(kind)
        if saved is None or not issubclass(saved, cls):
            raise TypeError(f"{os.fspath(path)!r} holds a {kind}, not a {cls.__name__}")
        return saved._from_fields(fields)


@dataclass(kw_only=True, eq=False)
class Result(Saved):
    """Tensors of one analysis plus the model, parameters and prompts they describe.

    Attributes
    ----------
    model_name
        Name or path the model was loaded from.
    architecture
        ``"transformer"``, ``"mamba"``, ``"mamba2"``, ``"hybrid"`` or ``"rnn"``.
    params
        The analysis' parameters (``Analysis.get_params()``).
    prompts
        The batch the result was computed on; ``None`` for weight-only results.
    version
        The dynalens version that computed it.
    """

    model_name: str
    architecture: str
    params: dict[str, Any]
    prompts: Prompts | None
    version: str

    @abstractmethod
    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` most salient entries, one row each, most salient first."""

    @abstractmethod
    def to_frame(self) -> pd.DataFrame:
        """Every value as one long-form table row (a ``prompt`` column where there are prompts)."""

    @abstractmethod
    def figure(self, **options: Any) -> go.Figure:
        """The result drawn with plotly in the dynalens look (``probes/figures.py``)."""

    def metrics(self) -> dict[str, float]:
        """Summary numbers a sweep stores in its table (name → value); none by default."""
        return {}

    # ----------------------------------------------------------------- prompts
    def position_index(self, position: int, prompt: int = 0) -> int:
        """The padded column of real position ``position`` of ``prompt`` (negative from its end)."""
        return self._prompts().position_index(position, prompt)

    def str_tokens(self, prompt: int = 0) -> list[str]:
        """The real tokens of ``prompt`` as strings."""
        prompts = self._prompts()
        if not -len(prompts) <= prompt < len(prompts):
            raise IndexError(f"prompt {prompt} is out of range: this result has {len(prompts)} prompts")
        return prompts.str_tokens[prompt]

    def position_frame(self, **columns: Tensor) -> pd.DataFrame:
        """``prompt, position, token`` per real token, plus one column per ``[batch, pos]`` tensor."""
        prompts = self._prompts()
        frame = prompts.frame()
        for name, values in columns.items():
            frame[name] = prompts.flat(values.cpu()).double().numpy()
        return frame

    def _prompts(self) -> Prompts:
        if self.prompts is None:
            raise ValueError(f"{type(self).__name__} was computed from weights alone: it has no prompts")
        return self.prompts

    # ---------------------------------------------------------------- display
    def summary(self) -> str:
        """A one-line description: tensors by shape, long lists by length."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                shown = f"Tensor{list(value.shape)}"
            elif isinstance(value, (list, dict)) and len(value) > 4:
                shown = f"[{len(value)} items]"
            else:
                shown = repr(value)
            parts.append(f"{field.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.summary())  # IPython shows the summary, not every tensor value

    # ------------------------------------------------------------- persistence
    def _fields(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.prompts is not None:
            tensors, plain = self.prompts.state()
            fields["prompts"] = {**tensors, **plain}
        return fields

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Result:
        stored = fields.get("prompts")
        if stored is not None:
            fields["prompts"] = Prompts.from_parts(
                stored["tokens"], stored["mask"], stored["str_tokens"],
                texts=stored["texts"], pad_id=stored["pad_id"],
            )  # fmt: skip
        return cls(**fields)
