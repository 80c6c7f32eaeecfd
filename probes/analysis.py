"""The analysis protocol: parameters, the hooks an analysis needs, a Result from a cache.

Every analysis is an object that stores its parameters and nothing else
(scikit-learn style), says which hooks it needs for a model, and computes its
:class:`~dynalens.probes.results.Result` from a cache and the prompts::

    lens = dl.probes.LogitLens(k=5)
    lens.hooks(model)                      # the names it reads
    lens.compute(cache, prompts)           # from a cache you already hold
    lens(model, prompts)                   # runs the one forward for you
    dl.run(model, prompts, [lens, dl.probes.MassiveActivations()])   # one forward for all

:class:`Analysis` is the cache-reading kind. :class:`Experiment` is the kind
that must intervene or run several passes (ablation, patching, decoding,
emergence over checkpoints): it keeps its passes but takes the same prompts
and returns a Result. :func:`run` runs any mix: one forward for every
``Analysis`` (caching only the union of their hooks), then each ``Experiment``.
"""

from __future__ import annotations

import inspect
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dynalens._version import __version__
from dynalens.models import names
from dynalens.models.io import atomic_dir
from dynalens.models.prompts import PromptInput, Prompts
from dynalens.models.surface import architecture_of, model_name_of
from dynalens.probes.results import Result


class AnalysisError(ValueError):
    """An analysis that does not apply to a model, or a cache it cannot read."""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Analysis(ABC):
    """Base of every analysis: parameters in the object, hooks for a model, a Result from a cache.

    Subclasses store each ``__init__`` argument under its own name (so
    :meth:`get_params` reads them back), implement :meth:`hooks` and
    :meth:`_compute`, and may set ``architectures`` (those it applies to) and
    ``requirement`` (what those have that others lack, for the error).
    """

    #: Architectures the analysis applies to; ``None``: every architecture.
    architectures: ClassVar[tuple[str, ...] | None] = None
    #: What the architectures above have, said in the error for the others.
    requirement: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """The key of this analysis' Result in a :class:`Run`: the class name in snake case."""
        return _snake(type(self).__name__)

    # -------------------------------------------------------------- parameters
    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments, by name (scikit-learn's ``get_params``)."""
        signature = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def set_params(self, **params: Any) -> Analysis:
        """Set parameters by name; unknown names are an error. Returns ``self``."""
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"{type(self).__name__} has no parameter {name!r}; its parameters: {sorted(valid)}"
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # ----------------------------------------------------------------- protocol
    def check(self, model: Any) -> None:
        """Raise :class:`AnalysisError` if the analysis does not apply to ``model``."""
        arch = architecture_of(model)
        if self.architectures is not None and arch not in self.architectures:
            needs = f"{self.requirement}: it " if self.requirement else ""
            raise AnalysisError(
                f"{type(self).__name__} needs {needs}applies to {', '.join(self.architectures)} "
                f"models, and this model is a {arch} ({model_name_of(model)})"
            )

    @abstractmethod
    def hooks(self, model: Any) -> list[str]:
        """The hook names :meth:`compute` reads on ``model``."""

    def compute(self, cache: Any, prompts: Prompts) -> Result:
        """The Result from a cache holding :meth:`hooks` for ``prompts`` (``cache.model`` is the model).

        Raises :class:`AnalysisError` when a needed hook is missing from the
        cache, or holds NaN or inf at a real position (naming hook and position).
        """
        model = cache.model
        self.check(model)
        needed = self.hooks(model)
        missing = [name for name in needed if name not in cache.cache_dict]
        if missing:
            raise AnalysisError(
                f"{type(self).__name__} needs hooks the cache does not hold: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; cache them with "
                "model.run_with_cache(prompts, names_filter=analysis.hooks(model))"
            )
        for name in needed:
            check_finite_at_real(name, cache[name], prompts)
        with torch.no_grad():
            return self._compute(cache, prompts)

    @abstractmethod
    def _compute(self, cache: Any, prompts: Prompts) -> Result:
        """The Result, from a cache that holds every hook of :meth:`hooks`, all finite."""

    def __call__(self, model: Any, prompts: PromptInput) -> Result:
        """Run the one forward this analysis needs on ``prompts`` and compute its Result."""
        return run(model, prompts, [self])[self.name]

    def provenance(self, model: Any, prompts: Prompts | None) -> dict[str, Any]:
        """The fields every Result shares: model, architecture, version, parameters, prompts."""
        return {
            "model_name": model_name_of(model),
            "architecture": architecture_of(model),
            "params": {k: _plain(v) for k, v in self.get_params().items()},
            "prompts": None if prompts is None else prompts.to("cpu"),
            "version": __version__,
        }


class Experiment(Analysis):
    """An analysis that runs its own passes (interventions, decoding, checkpoints).

    It reads no shared cache: :meth:`hooks` is empty and :meth:`run` takes the
    model and the prompts (``None`` where the analysis reads weights only).
    """

    def hooks(self, model: Any) -> list[str]:
        return []

    def _compute(self, cache: Any, prompts: Prompts) -> Result:
        return self.run(cache.model, prompts)

    @abstractmethod
    def run(self, model: Any, prompts: Prompts | None) -> Result:
        """Run the experiment's passes on ``model`` and return its Result."""

    def __call__(self, model: Any, prompts: PromptInput | None = None) -> Result:
        self.check(model)
        return self.run(model, None if prompts is None else Prompts(model, prompts))


class Run(Mapping[str, Result]):
    """The Results of several analyses on one batch, by analysis name.

    ``run["logit_lens"]`` or ``run[analysis]``; ``save(folder)`` writes one
    record file per result (``{name}.safetensors``), the folder renamed into
    place; :meth:`load` reads it back.
    """

    def __init__(self, results: dict[str, Result], logits: Tensor | None = None):
        self._results = dict(results)
        self.logits = logits

    def __getitem__(self, key: str | Analysis) -> Result:
        name = key.name if isinstance(key, Analysis) else key
        if name not in self._results:
            raise KeyError(f"no result named {name!r}; this run holds {sorted(self._results)}")
        return self._results[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return f"Run({', '.join(self._results)})"

    def save(self, folder: str | os.PathLike) -> Path:
        """Write every result to ``folder/{name}.safetensors``, the folder atomically."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            for name, result in self._results.items():
                result.save(tmp / f"{name}.safetensors")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Run:
        """The results :meth:`save` wrote to ``folder``."""
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no result files (*.safetensors) in {os.fspath(folder)!r}")
        return cls({f.stem: Result.load(f) for f in files})


def run(
    model: Any,
    prompts: PromptInput,
    analyses: Sequence[Analysis],
    *,
    progress: bool = False,
) -> Run:
    """Run several analyses on one batch: one forward for every cache-reading analysis.

    Parameters
    ----------
    model
        Any dynalens model.
    prompts
        A :class:`Prompts`, or what builds one (strings, token ids, ragged id lists).
    analyses
        Analysis objects; names must differ (two of one class: give one a
        subclass or run them apart).
    progress
        Show a tqdm bar over the analyses.

    Returns
    -------
    Run
        The Results by analysis name, and the forward's logits ``[batch, pos, d_vocab]``.
    """
    analyses = list(analyses)
    if not analyses or not all(isinstance(a, Analysis) for a in analyses):
        raise TypeError("analyses must be a non-empty list of dynalens analyses (e.g. dl.probes.LogitLens())")
    names = [a.name for a in analyses]
    if len(set(names)) != len(names):
        raise ValueError(f"two analyses share a name in {names}: run them apart")
    for analysis in analyses:
        analysis.check(model)
    prompts = Prompts(model, prompts)
    readers = [a for a in analyses if not isinstance(a, Experiment)]
    hooks = sorted({name for a in readers for name in a.hooks(model)})
    logits, cache = None, None
    if readers:
        with torch.no_grad():
            logits, cache = model.run_with_cache(prompts, names_filter=hooks)
    results = {}
    for analysis in tqdm(analyses, desc="analyses", disable=not progress):
        if isinstance(analysis, Experiment):
            results[analysis.name] = analysis.run(model, prompts)
        else:
            results[analysis.name] = analysis.compute(cache, prompts)
    return Run(results, logits)


def check_finite_at_real(name: str, value: Tensor, prompts: Prompts) -> None:
    """Raise :class:`AnalysisError` naming ``name`` and the first prompt and position holding NaN or inf.

    Only real positions are checked: the position axis is 1 (``[batch, pos, ...]``),
    or the query and key axes 2 and 3 of attention patterns and scores
    (``[batch, head, q, k]``).
    """
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return
    bad = ~torch.isfinite(value)
    mask = prompts.mask.to(bad.device)
    batch, width = mask.shape
    square = names.short(name) in _QUERY_KEY_HOOKS
    if square and value.ndim == 4 and value.shape[0] == batch and value.shape[2:] == (width, width):
        bad = bad & mask[:, None, :, None] & mask[:, None, None, :]
        position_axis = 2
    elif not square and value.ndim >= 2 and value.shape[:2] == (batch, width):
        bad = bad & mask.reshape(batch, width, *([1] * (value.ndim - 2)))
        position_axis = 1
    else:
        position_axis = None
    if not bool(bad.any()):
        return
    where = [int(i) for i in bad.nonzero()[0]]
    if position_axis is None:
        at = f"index {tuple(where)}"
    else:
        prompt = where[0]
        at = f"prompt {prompt}, position {where[position_axis] - int(prompts.offsets[prompt])}"
    raise AnalysisError(
        f"the cache holds {int(bad.sum())} non-finite values (NaN or inf) at {name!r}, first at {at}; "
        "an analysis reads finite activations only"
    )


#: Hooks whose axes 2 and 3 are query and key positions.
_QUERY_KEY_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")


def _plain(value: Any) -> Any:
    """A parameter as a plain JSON value (other objects by their repr)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)
