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
from collections import deque
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

    def remove_stale_files(self) -> None:
        """Remove the temporary files of cells that were in flight when a driver was killed."""
        for folder in ("cells", "results"):
            for tmp in (self.store / folder).rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)

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
    out.remove_stale_files()
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
            worker = CellRunner()
            for model, cells in todo.items():
                for cell, set_prompts, analysis in cells:
                    worker.run(str(out.store), cell, set_prompts, analysis, labelled_models[model])
                    bar.update()
    finally:
        bar.close()
    return out


class CellRunner:
    """Runs cells, keeping the model of the last cell loaded (each model is loaded once)."""

    def __init__(self) -> None:
        self.source: Any = None
        self.model: Any = None

    def run(self, store: str, cell: Cell, prompts: Any, analysis: Analysis, source: Any) -> str:
        """Run one cell on the model from ``source``, write its Result and row to ``store``; return the status."""
        from dynalens.models.loading import load

        sweep = Sweep(store)
        started = time.time()
        row: dict[str, Any] = {
            "model": cell.model, "prompts": cell.prompts, "analysis": cell.analysis,
            "params": json.dumps({k: repr(v) for k, v in analysis.get_params().items()}),
            "started": started, "pid": os.getpid(),
        }  # fmt: skip
        try:
            if source != self.source:  # a new model: drop the last one before loading
                self.model, self.source = None, None
                self.model, self.source = load(source), source
            result = analysis(self.model, prompts)
            result.save(sweep.result_path(cell))
            row.update(status=STATUS_OK, error="", params=json.dumps(result.params))
            row.update({f"metric.{k}": float(v) for k, v in result.metrics().items()})
        except Exception as err:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
            row.update(status=STATUS_FAILED, error=_error_text(err))
        row["seconds"] = time.time() - started
        write_row(sweep.row_path(cell), row)
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
    """Run the cells on a pool of Ray actors; all cells of a model go to one actor, which loads it once.

    Each actor is given its next model while the last cell of its current one
    runs, so it always has a cell queued and never waits on the driver.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        pool = [_worker(ray, i) for i in range(min(size, len(todo)))]
        queue = deque(todo.items())
        pending: dict[Any, tuple[int, Cell, Any]] = {}
        queued = [0] * len(pool)

        def give(slot: int) -> None:
            model, cells = queue.popleft()
            for cell, set_prompts, analysis in cells:
                ref = pool[slot].run.remote(str(out.store), cell, set_prompts, analysis, models[model])
                pending[ref] = (slot, cell, pool[slot])
            queued[slot] += len(cells)

        def feed(slot: int) -> None:
            while queue and queued[slot] <= 1:
                give(slot)

        for slot in range(len(pool)):  # one model each first, so that every worker starts at once
            give(slot)
        for slot in range(len(pool)):
            feed(slot)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            slot, cell, actor = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - the worker died past Ray's retries: record the cell
                write_row(out.row_path(cell), {
                    "model": cell.model, "prompts": cell.prompts, "analysis": cell.analysis,
                    "status": STATUS_FAILED, "error": _error_text(err), "seconds": float("nan"),
                })  # fmt: skip
                if pool[slot] is actor:  # the first of its cells to fail: later models go to a new worker
                    pool[slot] = _worker(ray, slot, fresh=True)
            bar.update()
            queued[slot] -= 1
            feed(slot)
    finally:
        if started_here:
            _POOL.clear()
            ray.shutdown()


_POOL: dict[tuple[str, str, int], Any] = {}
"""This driver's Ray workers by (Ray job, driver's node, slot): kept alive across sweeps, so each starts once.

A job id alone repeats after ``ray.shutdown()`` and a new ``ray.init()``; the
node id is new with every Ray start, so a pool never outlives its cluster."""


def _worker(ray: Any, slot: int, fresh: bool = False) -> Any:
    """Worker ``slot`` of this driver's pool (a new one with ``fresh``, after a worker died)."""
    context = ray.get_runtime_context()
    session = (context.get_job_id(), context.get_node_id())
    for stale in [key for key in _POOL if key[:2] != session]:  # actors of a Ray that was shut down
        del _POOL[stale]
    key = (*session, slot)
    if fresh or key not in _POOL:
        actor = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(CellRunner)
        _POOL[key] = actor.remote()
    return _POOL[key]


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


def read_sweep_file(path: str | os.PathLike) -> dict[str, Any]:
    """The keyword arguments of :func:`sweep` that a TOML file describes.

    ::

        store = "runs/induction"              # relative paths are from the file's folder
        models = ["mamba-ar", "zoo/other"]    # names or paths for dl.load, and/or
        checkpoints = "attn2l-induction"      # every checkpoint of a zoo model or training run
        [prompts]
        repeats = [[3, 9, 4, 3, 9, 4]]        # token ids
        natural = ["The cat sat on the mat"]  # strings
        [[analyses]]
        type = "HeadScores"                   # a public class of dl.probes or dl.circuits
        label = "heads"                       # optional
        params = {}                           # its parameters

    Analysis types are looked up by name among dynalens' analyses only; nothing
    in the file is executed.
    """
    import tomllib

    from dynalens import circuits, probes
    from dynalens.models.zoo import checkpoints

    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read sweep file {str(path)!r}: {err}") from None
    known = {"store", "models", "checkpoints", "prompts", "analyses"}
    unknown = set(spec) - known
    missing = {"store", "prompts", "analyses"} - set(spec)
    if unknown or missing or not ({"models", "checkpoints"} & set(spec)):
        raise ValueError(
            f"sweep file {str(path)!r}: keys {sorted(unknown)} unknown, {sorted(missing)} missing; "
            f"it takes {sorted(known)}, with models or checkpoints (or both)"
        )

    def beside(p: str, must_exist: bool) -> str:
        """``p`` relative to the file's folder (a model name that is no path there stays a name)."""
        q = Path(p).expanduser()
        if q.is_absolute() or (must_exist and not (path.parent / q).exists()):
            return str(q) if q.is_absolute() else p
        return str(path.parent / q)

    models: list[Any] = [beside(m, must_exist=True) for m in spec.get("models", [])]
    if "checkpoints" in spec:
        models += checkpoints(spec["checkpoints"])
    types = {
        name: obj
        for module in (probes, circuits)
        for name in module.__all__
        if isinstance(obj := getattr(module, name), type) and issubclass(obj, Analysis)
    }
    analyses = {}
    for entry in spec["analyses"]:
        kind = entry.get("type")
        if kind not in types:
            raise ValueError(f"sweep file {str(path)!r}: unknown analysis type {kind!r}; known: {sorted(types)}")
        analysis = types[kind](**entry.get("params", {}))
        analyses[entry.get("label", analysis.name)] = analysis
    store = beside(spec["store"], must_exist=False)
    return {"analyses": analyses, "models": models, "prompts": dict(spec["prompts"]), "store": store}
