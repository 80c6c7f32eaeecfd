"""Sweeps: head scores over the 20 checkpoints of ``attn2l-induction`` × 3 prompt sets.

Four ways, in this process, on the same cells: a plain loop (load each
checkpoint, run ``HeadScores`` on each prompt set, keep the Results) on one
torch thread, as each Ray worker runs (Ray gives a one-CPU actor one thread;
the loop on all threads is printed for reference), ``dl.sweep``
in-process (the loop plus the store's files), and ``dl.sweep`` on a local Ray
with 1 and with 2 workers. Ray's start and its workers' first imports are
paid once per Ray session, before the timed sweep (a warm-up sweep of one
cell); the script prints them apart. Targets: Ray with 1 worker within 10% of
the loop, Ray with 2 workers ≥ 1.6× the loop.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep.py --sequences 256
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import ray
import torch

import dynalens as dl
from dynalens.models.zoo import checkpoints


def prompt_sets(n_sequences: int) -> dict[str, list[list[int]]]:
    model = dl.load("attn2l-induction")
    return {
        f"repeats{seed}": dl.circuits.repeated_tokens(model, half_len=16, n_sequences=n_sequences, seed=seed).tolist()
        for seed in range(3)
    }


def plain_loop(models, prompts) -> float:
    start = time.perf_counter()
    results = []
    for _, folder in models:
        model = dl.load(folder)
        for set_prompts in prompts.values():
            results.append(dl.circuits.HeadScores()(model, set_prompts))
    return time.perf_counter() - start


def timed_sweep(models, prompts, **kwargs) -> float:
    store = tempfile.mkdtemp(prefix="dynalens-sweep-")
    try:
        start = time.perf_counter()
        done = dl.sweep(dl.circuits.HeadScores(), models=models, prompts=prompts, store=store, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        frame = done.frame()
        assert len(frame) == len(models) * len(prompts) and (frame["status"] == "ok").all(), frame
        return seconds
    finally:
        shutil.rmtree(store)


def on_ray(workers: int, models, prompts) -> tuple[float, float]:
    """(start + warm-up seconds, timed sweep seconds) on a fresh local Ray of ``workers`` CPUs."""
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    for slot in range(workers):  # each worker imports dynalens and loads a model once
        timed_sweep(models[slot : slot + 1], {"warm": next(iter(prompts.values()))[:1]})
    warm = time.perf_counter() - start
    try:
        return warm, timed_sweep(models, prompts)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256, help="sequences per prompt set")
    args = parser.parse_args()
    models = checkpoints("attn2l-induction")
    prompts = prompt_sets(args.sequences)
    print(f"{len(models)} checkpoints x {len(prompts)} prompt sets of {args.sequences} sequences")
    plain_loop(models[:2], prompts)  # warm-up: imports, first loads
    all_threads = torch.get_num_threads()
    loop_all = plain_loop(models, prompts)
    torch.set_num_threads(1)  # as each Ray worker runs (one CPU per actor): the loop is one such worker, alone
    loop = plain_loop(models, prompts)
    here = timed_sweep(models, prompts, ray=False)
    warm1, ray1 = on_ray(1, models, prompts)
    warm2, ray2 = on_ray(2, models, prompts)
    print(f"plain loop, {all_threads} threads  {loop_all:7.2f} s   (for reference: torch's own threads on the same cores)")
    print(f"plain loop, 1 thread  {loop:7.2f} s   (the baseline below)")
    print(f"sweep, in-process     {here:7.2f} s   {here / loop:5.2f}x the loop's time")
    print(f"sweep, Ray 1 worker   {ray1:7.2f} s   {ray1 / loop:5.2f}x the loop's time  (target <= 1.10)"
          f"   [Ray start + warm-up {warm1:.1f} s]")
    print(f"sweep, Ray 2 workers  {ray2:7.2f} s   {loop / ray2:5.2f}x faster than the loop  (target >= 1.6)"
          f"   [Ray start + warm-up {warm2:.1f} s]")


if __name__ == "__main__":
    main()
