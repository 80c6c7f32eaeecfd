"""Start-up time: ``import torch`` vs ``import dynalens``, ``dynalens --help`` and ``dynalens models``.

Each case runs in a fresh Python process of this environment (the
interpreter's own start-up included); the wall time from spawning the process
to its exit is taken ``--repeats`` times, the cases interleaved round by round
after one warm-up round (file caches). The CLI cases run what the
``dynalens`` console script runs (``from dynalens.cli import main``) with this
interpreter. Peer: ``import torch``, which every dynalens model needs anyway.
The script prints min and median per case, the ratios to ``import torch``, and
the targets with PASS/MISS (on the medians).

    HF_HUB_OFFLINE=1 nice -n -10 .venv/bin/python benchmarks/import_time.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CLI = "import sys; from dynalens.cli import main; sys.exit(main())"
CASES: dict[str, list[str]] = {
    "import torch": ["-c", "import torch"],
    "import dynalens": ["-c", "import dynalens"],
    "dynalens --help": ["-c", CLI, "--help"],
    "dynalens models": ["-c", CLI, "models"],
}
# (case, what is measured, bound, against torch?)
TARGETS = [
    ("import dynalens", "x import torch", 1.2, True),
    ("dynalens --help", "seconds", 0.5, False),
    ("dynalens models", "seconds", 1.5, False),
]


def wall(args: list[str]) -> float:
    """Seconds from spawning ``python args`` to its exit (it must succeed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for case in CASES.values():  # warm-up: file caches, bytecode
        wall(case)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, case in CASES.items():
            times[name].append(wall(case))
    torch_median = statistics.median(times["import torch"])
    print(f"{'case':16s} {'min s':>7s} {'median s':>9s} {'x torch':>8s}   (fresh processes, {args.repeats} each)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:16s} {min(values):7.3f} {median:9.3f} {median / torch_median:7.2f}x")
    print("targets (medians):")
    for name, what, bound, relative in TARGETS:
        value = statistics.median(times[name]) / (torch_median if relative else 1.0)
        verdict = "PASS" if value <= bound else "MISS"
        print(f"  {name:16s} {what:15s} {value:6.2f}  target <= {bound}  {verdict}")


if __name__ == "__main__":
    main()
