"""Sweeps: a grid of models × prompt sets × analyses, run on Ray, streamed into a store.

Every cell (one model, one prompt set, one analysis) runs the protocol
(``probes/analysis.py``) and leaves two files in the store, each written to a
temporary name and renamed into place:

- ``results/{model}/{prompts}/{analysis}.safetensors``: the cell's Result;
- ``cells/{model}__{prompts}__{analysis}.parquet``: its row (the keys,
  status, timings, the summary metrics the Result declares, error text),
  written last, so a row marks a finished cell. ``cells/`` is one Parquet
  dataset: :meth:`Sweep.frame` reads it whole.

A re-run skips cells whose row says ``ok``; a driver killed mid-sweep loses
only the cells in flight. A cell that raises is recorded as ``failed`` with
its error and the sweep goes on. On Ray each model gets one actor that loads
it once and runs all of its cells; a worker that dies is restarted and its
cell retried once (Ray's retries), then the cell is marked failed.

Examples
--------
>>> sweep = dl.sweep(dl.circuits.HeadScores(),                       # doctest: +SKIP
...                  models=dl.models.zoo.checkpoints("attn2l-induction"),
...                  prompts={"repeats": rep, "natural": nat},
...                  store="runs/induction-emergence")
>>> sweep.frame()                                                    # doctest: +SKIP
>>> sweep.results("step_1500", "repeats").figure()                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from dynalens.models.io import atomic_path, write_json
from dynalens.probes.analysis import Analysis
from dynalens.probes.results import Result

STATUS_OK, STATUS_FAILED = "ok", "failed"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: which model, which prompt set, which analysis."""

    model: str
    prompts: str
    analysis: str

    @property
    def key(self) -> str:
        """The cell's file stem: its three labels joined by ``__``."""
        return "__".join((self.model, self.prompts, self.analysis))


class Sweep:
    """A sweep's store: its cells' rows and Results.

    ``Sweep(store)`` opens a store that :func:`sweep` wrote (or is writing).
    """

    def __init__(self, store: str | os.PathLike):
        self.store = Path(store)

    def row_path(self, cell: Cell) -> Path:
        return self.store / "cells" / f"{cell.key}.parquet"

    def result_path(self, cell: Cell) -> Path:
        return self.store / "results" / cell.model / cell.prompts / f"{cell.analysis}.safetensors"

    def frame(self) -> pd.DataFrame:
        """One row per finished cell: ``model, prompts, analysis, status, seconds, error, ...``."""
        rows = sorted((self.store / "cells").glob("*.parquet"))
        if not rows:
            return pd.DataFrame(columns=["model", "prompts", "analysis", "status", "seconds", "error"])
        return pd.concat([pd.read_parquet(p) for p in rows], ignore_index=True)

    def finished(self) -> set[Cell]:
        """The cells whose row says ``ok`` and whose Result file is in place."""
        frame = self.frame()
        done = frame[frame["status"] == STATUS_OK]
        cells = {Cell(m, p, a) for m, p, a in zip(done["model"], done["prompts"], done["analysis"])}
        return {c for c in cells if self.result_path(c).is_file()}

    def results(self, model: str, prompts: str, analysis: str | None = None) -> Result:
        """The Result of one cell (``analysis`` may be left out when the sweep has one)."""
        if analysis is None:
            folder = self.store / "results" / model / prompts
            found = sorted(folder.glob("*.safetensors"))
            if len(found) != 1:
                names = [f.stem for f in found]
                raise KeyError(f"cell ({model!r}, {prompts!r}) has results {names}: name the analysis")
            return Result.load(found[0])
        path = self.result_path(Cell(model, prompts, analysis))
        if not path.is_file():
            raise KeyError(
                f"no finished cell ({model!r}, {prompts!r}, {analysis!r}) in {str(self.store)!r}; "
                "sweep.frame() lists the cells and their status"
            )
        return Result.load(path)

    def __repr__(self) -> str:
        return f"Sweep({str(self.store)!r}, {len(self.frame())} cells stored)"


def sweep(
    analyses: Analysis | Sequence[Analysis] | Mapping[str, Analysis],
    *,
    models: Iterable[Any] | Mapping[str, Any],
    prompts: Mapping[str, Any],
    store: str | os.PathLike,
    ray: bool = True,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Sweep:
    """Run every (model, prompt set, analysis) cell not yet finished in ``store``.

    Parameters
    ----------
    analyses
        One analysis, a list of them (labelled by ``analysis.name``), or a dict
        label → analysis (e.g. the same analysis at several parameters).
    models
        Names or paths for ``dl.load``, ``(step, folder)`` pairs
        (``dl.models.zoo.checkpoints(name)``, labelled ``step_{step}``), or a
        dict label → name or path.
    prompts
        Label → prompts (what ``dl.Prompts`` takes: strings or token ids).
    store
        The folder the rows and Results go to.
    ray
        Run on Ray (one actor per model); ``False`` runs the cells here, one
        model after the other.
    address
        A running Ray cluster (``"auto"``, ``"ray://..."``); ``None`` starts
        Ray on this machine with ``workers`` worker processes (default: one
        per core). ``RAY_ADDRESS`` in the environment is used when set.
    workers
        Local Ray's CPUs: how many models run at once.
    progress
        A tqdm bar over the cells.

    Returns
    -------
    Sweep
        The store, with :meth:`Sweep.frame` and :meth:`Sweep.results`.
    """
    labelled_analyses = _label_analyses(analyses)
    labelled_models = _label_models(models)
    if not prompts:
        raise ValueError("prompts must map at least one label to prompts")
    prompt_sets = {_label(k): v for k, v in prompts.items()}
    out = Sweep(store)
    write_json(out.store / "sweep.json", {
        "models": {k: str(v) for k, v in labelled_models.items()},
        "prompts": sorted(prompt_sets),
        "analyses": {k: repr(a) for k, a in labelled_analyses.items()},
    })  # fmt: skip
    done = out.finished()
    todo: dict[str, list[tuple[Cell, Any, Analysis]]] = {}
    for model in labelled_models:
        for set_label, set_prompts in prompt_sets.items():
            for a_label, analysis in labelled_analyses.items():
                cell = Cell(model, set_label, a_label)
                if cell not in done:
                    todo.setdefault(model, []).append((cell, set_prompts, analysis))
    total = sum(len(cells) for cells in todo.values())
    bar = tqdm(total=total, desc="sweep cells", disable=not progress)
    try:
        if ray:
            _run_on_ray(out, labelled_models, todo, bar, address=address, workers=workers)
        else:
            for model, cells in todo.items():
                worker = CellRunner(labelled_models[model], str(out.store))
                for cell, set_prompts, analysis in cells:
                    worker.run(cell, set_prompts, analysis)
                    bar.update()
    finally:
        bar.close()
    return out


class CellRunner:
    """Loads one model once and runs cells on it, writing each cell's files."""

    def __init__(self, source: Any, store: str):
        from dynalens.models.loading import load

        self.model = load(source)
        self.sweep = Sweep(store)

    def run(self, cell: Cell, prompts: Any, analysis: Analysis) -> str:
        """Run one cell and write its Result and row; returns the status."""
        started = time.time()
        row: dict[str, Any] = {
            "model": cell.model, "prompts": cell.prompts, "analysis": cell.analysis,
            "params": json.dumps(analysis.provenance(self.model, None)["params"]),
            "started": started, "pid": os.getpid(),
        }  # fmt: skip
        try:
            result = analysis(self.model, prompts)
            result.save(self.sweep.result_path(cell))
            row.update(status=STATUS_OK, error="")
            row.update({f"metric.{k}": float(v) for k, v in result.metrics().items()})
        except Exception as err:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
            row.update(status=STATUS_FAILED, error=_error_text(err))
        row["seconds"] = time.time() - started
        write_row(self.sweep.row_path(cell), row)
        return row["status"]


def write_row(path: Path, row: dict[str, Any]) -> None:
    """Write one cell's row as a one-row Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist([row]), tmp)


def _run_on_ray(
    out: Sweep,
    models: dict[str, Any],
    todo: dict[str, list[tuple[Cell, Any, Analysis]]],
    bar: tqdm,
    *,
    address: str | None,
    workers: int | None,
) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        actor_class = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(CellRunner)
        pending: dict[Any, tuple[str, Cell]] = {}
        actors, left = {}, {}
        for model, cells in todo.items():
            actors[model] = actor_class.remote(models[model], str(out.store))
            left[model] = len(cells)
            for cell, set_prompts, analysis in cells:
                pending[actors[model].run.remote(cell, set_prompts, analysis)] = (model, cell)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            model, cell = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - the worker died twice: record the cell
                write_row(out.row_path(cell), {
                    "model": cell.model, "prompts": cell.prompts, "analysis": cell.analysis,
                    "status": STATUS_FAILED, "error": _error_text(err), "seconds": float("nan"),
                })  # fmt: skip
            bar.update()
            left[model] -= 1
            if left[model] == 0:  # the model's cells are done: free its worker for the next model
                ray.kill(actors.pop(model))
    finally:
        if started_here:
            ray.shutdown()


def _error_text(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return "".join(lines).strip()[-2000:]


def _label(text: Any) -> str:
    label = _SAFE.sub("-", str(text)).strip("-")
    if not label:
        raise ValueError(f"{text!r} gives an empty label: use letters, digits, '.', '_' or '-'")
    return label


def _unique(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    labels = [label for label, _ in pairs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"two {what} share the label(s) {repeated}: pass a dict label → {what[:-1]}")
    return dict(pairs)


def _label_analyses(analyses: Any) -> dict[str, Analysis]:
    if isinstance(analyses, Analysis):
        analyses = [analyses]
    items = list(analyses.items()) if isinstance(analyses, Mapping) else [(None, a) for a in analyses]
    if not items or not all(isinstance(a, Analysis) for _, a in items):
        raise TypeError("analyses must be a dynalens analysis, a list of them or a dict label → analysis")
    return _unique([(_label(k if k is not None else a.name), a) for k, a in items], "analyses")


def _label_models(models: Any) -> dict[str, Any]:
    items = list(models.items()) if isinstance(models, Mapping) else list(models)
    pairs = []
    for item in items:
        if isinstance(models, Mapping):
            label, source = item
        elif isinstance(item, tuple) and len(item) == 2:  # (step, folder) of a checkpoint series
            label, source = (f"step_{item[0]}" if isinstance(item[0], int) else item[0]), item[1]
        else:
            label, source = Path(str(item)).name, item
        pairs.append((_label(label), source))
    if not pairs:
        raise ValueError("models must name at least one model")
    return _unique(pairs, "models")
