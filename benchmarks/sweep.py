"""Sweeps: head scores over the 20 checkpoints of ``attn2l-induction`` × 3 prompt sets.

The same cells four ways, in this process: a plain loop (load each
checkpoint, run ``HeadScores`` on each prompt set, keep the Results) on one
torch thread, as each Ray worker runs (Ray gives a one-CPU actor one thread;
the loop on all threads is printed for reference); ``dl.sweep`` in-process
(the loop plus the store's files); ``dl.sweep`` on a local Ray with 1 and
with 2 workers. Ray's start and its workers' first imports are paid once per
Ray session, before the timed sweeps (a warm-up sweep of one cell on each
worker); the script prints them apart. Inside each Ray session the loop and
the sweep alternate ``--repeats`` times and the median of the paired ratios
is reported, so a change in the machine's load hits both sides.

Where the CPU goes during the Ray sweeps: CPU seconds of this driver, of
the workers and of each of Ray's own processes (GCS, raylet, agents), and the
workers' idle time (the sweep's wall time × workers, less the seconds their
cells took). Targets: Ray with 1 worker within 10% of the loop, Ray with 2
workers ≥ 1.6× the loop.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep.py --sequences 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter

import psutil
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


def timed_sweep(models, prompts, **kwargs) -> tuple[float, float]:
    """(wall seconds, seconds the cells took: the workers' busy time)."""
    store = tempfile.mkdtemp(prefix="dynalens-sweep-")
    try:
        start = time.perf_counter()
        done = dl.sweep(dl.circuits.HeadScores(), models=models, prompts=prompts, store=store, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        frame = done.frame()
        assert len(frame) == len(models) * len(prompts) and (frame["status"] == "ok").all(), frame
        return seconds, float(frame["seconds"].sum())
    finally:
        shutil.rmtree(store)


def cpu_seconds() -> Counter:
    """CPU seconds (user + system) so far of this process and each process it started, by role."""
    out: Counter = Counter()
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times, cmdline = proc.cpu_times(), proc.cmdline()
        except psutil.Error:  # ended meanwhile
            continue
        if proc.pid == os.getpid():
            role = "driver"
        elif cmdline and cmdline[0].startswith("ray::"):
            role = "workers" if "CellRunner" in cmdline[0] else cmdline[0]
        else:
            script = next((arg for arg in cmdline if arg.endswith((".py", "_server", "raylet"))), proc.name())
            role = os.path.basename(script)
        out[role] += times.user + times.system
    return out


def on_ray(workers: int, models, prompts, repeats: int) -> dict:
    """The loop and the sweep, alternating, on a fresh local Ray of ``workers`` CPUs."""
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        timed_sweep(models[-workers:], {"warm": next(iter(prompts.values()))[:1]})  # each worker starts, runs once
        warm = time.perf_counter() - start
        ratios, walls, idle, cpu = [], [], [], Counter()
        for _ in range(repeats):
            loop = plain_loop(models, prompts)
            before = cpu_seconds()
            wall, busy = timed_sweep(models, prompts)
            cpu.update(cpu_seconds())
            cpu.subtract(before)
            ratios.append(wall / loop)
            walls.append(wall)
            idle.append(wall * workers - busy)
    finally:
        ray.shutdown()
    return {"warm": warm, "ratio": statistics.median(ratios), "wall": statistics.median(walls),
            "idle": statistics.median(idle), "cpu": {k: v / repeats for k, v in cpu.most_common()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256, help="sequences per prompt set")
    parser.add_argument("--repeats", type=int, default=5, help="loop/sweep pairs per Ray session")
    args = parser.parse_args()
    models = checkpoints("attn2l-induction")
    prompts = prompt_sets(args.sequences)
    print(f"{len(models)} checkpoints x {len(prompts)} prompt sets of {args.sequences} sequences, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    plain_loop(models[:2], prompts)  # warm-up: imports, first loads
    all_threads = torch.get_num_threads()
    loop_all = plain_loop(models, prompts)
    torch.set_num_threads(1)  # as each Ray worker runs (one CPU per actor): the loop is one such worker, alone
    loop = plain_loop(models, prompts)
    here, _ = timed_sweep(models, prompts, ray=False)
    ray1 = on_ray(1, models, prompts, args.repeats)
    ray2 = on_ray(2, models, prompts, args.repeats)
    print(f"plain loop, {all_threads} threads  {loop_all:7.2f} s   (for reference: torch's own threads on the same cores)")
    print(f"plain loop, 1 thread  {loop:7.2f} s   (the baseline below)")
    print(f"sweep, in-process     {here:7.2f} s   {here / loop:5.2f}x the loop's time")
    print(f"sweep, Ray 1 worker   {ray1['wall']:7.2f} s   {ray1['ratio']:5.2f}x the loop's time  (target <= 1.10)"
          f"   [Ray start + warm-up {ray1['warm']:.1f} s]")  # fmt: skip
    print(f"sweep, Ray 2 workers  {ray2['wall']:7.2f} s   {1 / ray2['ratio']:5.2f}x faster than the loop  (target >= 1.6)"
          f"   [Ray start + warm-up {ray2['warm']:.1f} s]")  # fmt: skip
    print(f"(Ray rows: medians of {args.repeats} sweeps, each paired with a loop run just before it in the same session)")
    for label, run in (("1 worker", ray1), ("2 workers", ray2)):
        spent = ", ".join(f"{role} {seconds:.2f}" for role, seconds in run["cpu"].items() if seconds >= 0.005)
        print(f"CPU seconds per sweep, Ray {label}: {spent}; workers idle {run['idle']:.2f} s")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
