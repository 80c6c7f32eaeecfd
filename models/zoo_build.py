"""Rebuild the model zoo from scratch, deterministically.

``python -m dynalens.models.zoo_build [--only NAME ...] [--out DIR]`` trains
every zoo model (or the named ones) with its recipe below and writes its
folder (final weights, ``training_curve.json``, checkpoint series) under
``DIR/<name>/`` (default: the package's ``models/zoo/``). The optimizer state
used for resuming is not shipped. Each model takes a few CPU minutes; the
README's zoo section gives the measured total.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynalens.models.train import TRAIN_STATE_DIR, TrainResult, build_model, train
from dynalens.models.zoo import ZOO, ZOO_DIR, get_entry


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained: architecture, sizes and optimisation."""

    arch: str  # a key of dynalens.models.train.ARCHS
    steps: int
    lr: float
    batch_size: int
    warmup: int
    weight_decay: float = 0.01
    head_sparsity: float = 0.0  # group-lasso weight on attention heads (models.train.head_weight_norms)
    head_sparsity_from: int = 0  # the first step it applies
    n_checkpoints: int = 20
    seed: int = 0
    sizes: dict[str, Any] = field(default_factory=dict, compare=False)


RECIPES: dict[str, Recipe] = {
    # Varied repeat lengths and offsets rule out the fixed positional look-back a single
    # repeat length allows; with 4 heads per layer every layer-1 head became an induction head.
    # Without a penalty the second layer-1 head became a backup induction head (seeds 0-2, weight
    # decay 0.1, d_model 32, 400-1500 steps); the group lasso from step 500 (the circuit forms at
    # ~200) prunes it and the idle layer-0 head to zero. From step 0, any weight that prunes
    # (>= 0.003) keeps the circuit from forming; 0.01-0.02 leave the backup head half pruned.
    "attn2l-induction": Recipe(
        "attn-only-2l-rope", steps=1500, lr=3e-3, batch_size=64, warmup=100, head_sparsity=0.03,
        head_sparsity_from=500, sizes={"n_heads": 2},
    ),  # fmt: skip
    # Back-copies are solved by step ~300; the sinks form after, from step ~500 to ~1700.
    # With lr 1e-3 or 3e-3 they had not formed (BOS attention < 0.35) after 3000-4000 steps.
    "attn3l-bbc": Recipe(
        "attn-3l", steps=6000, lr=1e-2, batch_size=32, warmup=200, weight_decay=0.0, n_checkpoints=16,
        sizes={"d_model": 32, "n_layers": 3, "n_heads": 2, "d_mlp": 64},
    ),  # fmt: skip
    # At d_model 64 only lr 3e-3 passed 0.9 (0.96; 0.37 at lr 1e-3) in 4000 steps; at d_model 128
    # both lr 1e-3 and 3e-3 reach >= 0.999. 8 pairs with 4 queries stayed at 0.28 (4000 steps).
    "mamba-ar": Recipe(
        "mamba-2l", steps=4000, lr=3e-3, batch_size=64, warmup=100, n_checkpoints=8,
        sizes={"d_model": 128, "d_state": 16},
    ),  # fmt: skip
    # d_model 32 (lr 3e-3; or 8 heads of 8 with d_state 32) stayed at 0.33-0.34 in 1500-3000 steps; d_model 64
    # passed 0.9 at step ~1400 of 4000.
    "mamba2-ar": Recipe(
        "mamba2-2l", steps=4000, lr=3e-3, batch_size=64, warmup=100, n_checkpoints=8, sizes={"d_model": 64},
    ),  # fmt: skip
    # d_model 32 reached 0.996 by step 600 of 1500 (lr 3e-3).
    "hybrid-ar": Recipe("hybrid-bamba", steps=1000, lr=3e-3, batch_size=64, warmup=100, n_checkpoints=8),
    "lstm-hmm": Recipe("lstm-1l", steps=1000, lr=3e-3, batch_size=64, warmup=50, sizes={"d_model": 32}),
    "gru-hmm": Recipe("gru-1l", steps=1000, lr=3e-3, batch_size=64, warmup=50, sizes={"d_model": 32}),
}


def build(
    name: str, out: str | Path | None = None, *, progress: bool = True, device: str | torch.device = "cpu"
) -> TrainResult:
    """Train zoo model ``name`` from scratch into ``out/<name>`` (default: the package's zoo).

    An existing folder of that name is replaced. ``device="cuda"`` trains on a
    GPU with the same recipe (same seeds; not bit-identical to a CPU run).
    """
    entry, recipe = get_entry(name), RECIPES[name]
    folder = Path(out or ZOO_DIR) / name
    shutil.rmtree(folder, ignore_errors=True)
    task = entry.make_task()
    model = build_model(recipe.arch, task, seed=recipe.seed, **recipe.sizes).to(device)
    result = train(
        model, task, recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size, warmup=recipe.warmup,
        weight_decay=recipe.weight_decay, head_sparsity=recipe.head_sparsity,
        head_sparsity_from=recipe.head_sparsity_from, seed=recipe.seed, out=folder,
        n_checkpoints=recipe.n_checkpoints, progress=progress,
    )  # fmt: skip
    shutil.rmtree(folder / TRAIN_STATE_DIR)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynalens.models.zoo_build", description=__doc__)
    parser.add_argument("--only", action="append", choices=list(ZOO), help="build only this model (repeatable)")
    parser.add_argument("--out", default=None, help="root folder (default: the package's models/zoo)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    args = parser.parse_args(argv)
    total = 0.0
    for name in args.only or list(ZOO):
        start = time.perf_counter()
        result = build(name, args.out, progress=not args.no_progress, device=args.device)
        took = time.perf_counter() - start
        total += took
        print(f"{name}: held-out accuracy {result.final_accuracy:.4f} in {took:.0f} s", flush=True)
    print(f"total: {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
