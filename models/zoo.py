"""The model zoo: small models trained on synthetic tasks, shipped with the package.

Each entry is a folder under ``models/zoo/<name>/`` written by
:func:`dynalens.models.train.train` (rebuilt by ``python -m
dynalens.models.zoo_build``)::

    <name>/config.json, model.safetensors     final weights (float32)
    <name>/training_curve.json                per-step loss, held-out metrics per checkpoint
    <name>/checkpoints/step_000123/           the same model folder at ~20 log-spaced steps

Transformers are HuggingFace folders (booted through TransformerBridge by
``dl.load``); Mamba, Mamba-2 and RNN entries are ``HookedMamba`` /
``HookedMamba2`` / ``HookedRNN`` folders; the hybrid is an HF Bamba folder
that ``dl.load`` opens as a ``HookedHybrid``.

>>> from dynalens.models.zoo import ZOO, checkpoints
>>> ZOO["attn2l-induction"].task
'induction'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynalens.models.io import read_json

if TYPE_CHECKING:  # the tasks (torch) load with the first one built: listing the zoo needs none
    from dynalens.models.tasks import Task

ZOO_DIR = Path(__file__).parent / "zoo"
CURVE_FILE = "training_curve.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class ZooEntry:
    """One shipped model: what it is, what it was trained on, where its folder is.

    ``task_kwargs`` rebuild the exact task (``entry.make_task()``);
    ``accuracy_target`` is the held-out accuracy (the task's own metric) the
    shipped weights are tested to reach.
    """

    name: str
    architecture: str  # "transformer" | "mamba" | "mamba2" | "hybrid" | "rnn"
    task: str  # a key of dynalens.models.tasks.TASKS
    description: str
    path: Path
    task_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    accuracy_target: float = 0.9

    def make_task(self) -> Task:
        """The task this model was trained on."""
        from dynalens.models.tasks import make_task

        return make_task(self.task, **self.task_kwargs)


def _entry(
    name: str, architecture: str, task: str, description: str, accuracy_target: float, **task_kwargs: Any
) -> ZooEntry:
    return ZooEntry(name, architecture, task, description, ZOO_DIR / name, task_kwargs, accuracy_target)


# The associative recall task of mamba-ar, mamba2-ar and hybrid-ar: 2 of 4 key-value pairs queried.
_RECALL = dict(n_keys=16, n_values=16, n_pairs=4, n_queries=2)

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        _entry(
            "attn2l-induction",
            "transformer",
            "induction",
            "2-layer attention-only Llama (2 heads per layer, MLPs zeroed and frozen) on random "
            "tokens with a segment of 8-16 tokens repeated at a random offset; forms a "
            "previous-token head (L0H1) and an induction head (L1H1) with a loss phase change, "
            "then a group lasso on heads prunes the other two (L0H0, L1H0) to zero",
            0.9,
            d_vocab=64,
            half_len=16,
            min_len=8,
        ),
        _entry(
            "attn3l-bbc",
            "transformer",
            "bigram-backcopy",
            "3-layer Llama (2 heads per layer, attention + MLP) on Bigram-Backcopy; both layer-0 "
            "heads are active-dormant: attention sinks on BOS at ordinary bigram positions, "
            "back-copying the previous token at trigger positions",
            0.9,
            d_vocab=32,
            seq_len=32,
            n_triggers=3,
        ),
        _entry(
            "mamba-ar",
            "mamba",
            "assoc-recall",
            "2-layer HookedMamba (d_model 128) on multi-query associative recall: 2 of 4 "
            "key-value pairs queried, so no answer follows by elimination",
            0.9,
            **_RECALL,
        ),
        _entry(
            "mamba2-ar",
            "mamba2",
            "assoc-recall",
            "2-layer HookedMamba2 on the associative recall task of mamba-ar (2 of 4 key-value "
            "pairs queried)",
            0.9,
            **_RECALL,
        ),
        _entry(
            "hybrid-ar",
            "hybrid",
            "assoc-recall",
            "2-layer Bamba-style HookedHybrid (layer 0 Mamba-2, layer 1 attention with 2 heads, "
            "each followed by a SwiGLU MLP; d_model 32) on the associative recall task of mamba-ar",
            0.9,
            **_RECALL,
        ),
        _entry(
            "lstm-hmm",
            "rnn",
            "hmm",
            "1-layer HookedRNN (LSTM) predicting the emissions of a 3-state HMM "
            "(accuracy: Bayes-relative, see HMMTask)",
            0.95,
            n_states=3,
            d_vocab=4,
            seq_len=64,
        ),
        _entry(
            "gru-hmm",
            "rnn",
            "hmm",
            "1-layer HookedRNN (GRU) predicting the emissions of a 3-state HMM "
            "(accuracy: Bayes-relative, see HMMTask)",
            0.95,
            n_states=3,
            d_vocab=4,
            seq_len=64,
        ),
    )
}


def get_entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` called ``name``; a ``KeyError`` lists the zoo otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model named {name!r}; the zoo has: {', '.join(ZOO)}") from None


def checkpoints(name: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every saved checkpoint, by increasing step.

    ``name`` is a zoo name or the output folder of a training run.
    """
    root = Path(name) if isinstance(name, Path) else get_entry(name).path
    ckpt_root = root / CHECKPOINT_DIR
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found)


def training_curve(name: str | Path) -> dict[str, Any]:
    """The training record: ``steps``, ``loss``, ``lr`` per step and ``checkpoints``.

    Each item of ``checkpoints`` holds ``step``, ``eval_loss`` (loss-mask positions),
    ``eval_scored_loss`` (the positions the accuracy scores) and ``eval_accuracy``,
    measured on a held-out batch drawn with a different seed.
    """
    root = Path(name) if isinstance(name, Path) else get_entry(name).path
    path = root / CURVE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no training curve at {path}; rebuild with `python -m dynalens.models.zoo_build`")
    return read_json(path)
