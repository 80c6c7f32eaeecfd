"""Mamba forward on CPU: HookedMamba vs HF ``MambaForCausalLM`` vs TransformerBridge.

The mamba-130m shape (d_model 768, 24 layers, d_state 16, d_conv 4, expand 2,
vocab 50280) with random weights, batch 1, one process, in inference mode.
Each path runs once on 64 tokens to warm up (numba compilation), then each
row is the median of ``--repeats`` runs, the paths timed round-robin so that
a change in load hits all alike; ratios are against our plain forward. The scan's share is the time of
``dynalens.kernels.selective_scan`` on one layer's real inputs (taken from a
cache), times the number of layers, over our plain forward.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mamba_forward.py --lengths 512 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import dynalens  # noqa: F401  (before transformers: see tests/conftest.py)
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import MambaConfig, MambaForCausalLM

from dynalens.kernels import selective_scan
from dynalens.models import HookedMamba

MAMBA_130M = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2)


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median time of each function by ``clock`` (wall time by default), timed round-robin."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def scan_seconds(model: HookedMamba, tokens: torch.Tensor, repeats: int) -> float:
    """The selective scans of one forward: layer 0's scan on its cached inputs, times n_layers."""
    names = [f"blocks.0.mixer.hook_{k}" for k in ("conv", "delta", "B", "C")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    u, delta, B, C = (cache[n].transpose(1, 2).contiguous() for n in names)
    mixer = model.blocks[0].mixer
    A, D = mixer.A, mixer.D.float()
    scan = lambda: selective_scan(u, delta, A, B, C, D=D, return_last_state=True)  # noqa: E731
    return median_seconds({"scan": scan}, repeats)["scan"] * model.cfg.n_layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf = MambaForCausalLM(MambaConfig(**MAMBA_130M)).eval()
    ours = HookedMamba.from_hf(hf)
    hf_mambapy = copy.deepcopy(hf)
    for layer in hf_mambapy.backbone.layers:
        layer.mixer.use_mambapy = True
    with tempfile.TemporaryDirectory() as folder:
        hf.config.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=copy.deepcopy(hf))

    print(f"HookedMamba vs HF MambaForCausalLM, mamba-130m shape, b=1, torch threads={torch.get_num_threads()}")
    resid = lambda name: "resid" in name  # noqa: E731
    paths = {
        "ours forward": lambda tokens: ours(tokens),
        "ours run_with_cache(resid)": lambda tokens: ours.run_with_cache(tokens, names_filter=resid),
        "HF default CPU path": lambda tokens: hf(tokens),
        "HF use_mambapy=True": lambda tokens: hf_mambapy(tokens),
        "TransformerBridge": lambda tokens: bridge(tokens),
    }
    with torch.inference_mode():
        median_seconds({name: partial(fn, torch.randint(0, 100, (1, 64))) for name, fn in paths.items()}, 1)
    for length in args.lengths:
        tokens = torch.randint(0, MAMBA_130M["vocab_size"], (1, length))
        with torch.inference_mode():
            rows = median_seconds({name: partial(fn, tokens) for name, fn in paths.items()}, args.repeats)
            scan = scan_seconds(ours, tokens, args.repeats)
        ours_s = rows["ours forward"]
        print(f"\nl = {length}", flush=True)
        print(f"  {'path':28s} {'seconds':>8s} {'ms/token':>9s} {'x ours':>7s}")
        for name, seconds in rows.items():
            print(f"  {name:28s} {seconds:8.3f} {1e3 * seconds / length:9.2f} {seconds / ours_s:7.2f}")
        print(f"  HF default / ours: {rows['HF default CPU path'] / ours_s:.2f}x faster (target >= 3x at l=2048)")
        print(f"  run_with_cache(resid) / forward: {rows['ours run_with_cache(resid)'] / ours_s:.2f} (target <= 1.2)")
        print(f"  scan share of our forward: {scan:.3f} s of {ours_s:.3f} s = {100 * scan / ours_s:.0f}% (target <= 25%)", flush=True)


if __name__ == "__main__":
    main()
