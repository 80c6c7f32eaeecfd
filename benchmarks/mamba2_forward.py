"""Mamba-2 forward on CPU: HookedMamba2 vs HF ``Mamba2ForCausalLM`` and the Bridge's eager scan.

The Mamba-2-130m shape (d_model 768, 24 layers, 24 heads of 64, d_state 128,
n_groups 1, vocab 50288) with random weights, batch 1, one process, in
inference mode. HF runs its torch path (``Mamba2Mixer.torch_forward``: no
CUDA kernels on CPU). Rows, each the median of ``--repeats`` runs timed
round-robin after a warm-up at 64 tokens:

- ours: the plain forward;
- ours, ``run_with_cache`` of every layer's ``hook_ssm_state`` at 16
  positions (``state_positions``), over our forward (target <= 1.3);
- HF's torch path (``use_cache=False``), over ours (target >= 2);
- every state of every layer: a hook on each layer's ``hook_ssm_state`` that
  reduces the ``[b, l, h, p, n]`` states to their norm per position and head
  (caching them all would take 24 x 1.6 GB at l = 2048), ours against
  TransformerBridge with ``eager_scan=True`` on every mixer and
  ``use_cache=False`` (its Python scan over time; target >= 10x), with the
  peak resident memory each adds over the process' memory before the call
  (sampled every millisecond).

    HF_HUB_OFFLINE=1 nice -n -10 .venv/bin/python benchmarks/mamba2_forward.py --lengths 512 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import dynalens  # noqa: F401  (before transformers: see tests/conftest.py)
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import Mamba2Config, Mamba2ForCausalLM

from dynalens.models import names
from dynalens.models.mamba2 import HookedMamba2

sys.path.insert(0, str(Path(__file__).parent))  # median_seconds of benchmarks/mamba_forward.py, also under -P
from mamba_forward import median_seconds  # noqa: E402

MAMBA2_130M = dict(
    vocab_size=50288, hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128, n_groups=1,
    expand=2, conv_kernel=4, chunk_size=256,
)  # fmt: skip
N_POSITIONS = 16
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process' resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_added(fn: Callable[[], object]) -> int:
    """The most resident memory ``fn()`` adds over the memory before it, sampled every millisecond."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_bytes()) - base


def spread(length: int) -> list[int]:
    """``N_POSITIONS`` positions spread evenly over ``length`` tokens, the last one included."""
    return torch.linspace(0, length - 1, N_POSITIONS).long().tolist()


def state_norms(n_layers: int) -> tuple[list[tuple[str, Callable]], list[torch.Tensor]]:
    """Hooks on every layer's ``hook_ssm_state`` that keep the norm of each state ``[b, l, h]``."""
    kept: list[torch.Tensor] = []

    def keep(states: torch.Tensor, hook) -> None:
        kept.append(torch.linalg.vector_norm(states, dim=(-2, -1)))

    return [(names.mixer(layer, "ssm_state"), keep) for layer in range(n_layers)], kept


def build_models(with_bridge: bool) -> tuple[Mamba2ForCausalLM, HookedMamba2, TransformerBridge | None]:
    """HF's model with random weights, ours with the same weights, and the Bridge (eager scan on) over a copy."""
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**MAMBA2_130M)).eval()
    if not with_bridge:
        return hf, HookedMamba2.from_hf(hf), None
    with tempfile.TemporaryDirectory() as folder:
        hf.config.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, hf_model=copy.deepcopy(hf))
    for block in bridge.blocks:
        block.mixer.eager_scan = True
    return hf, HookedMamba2.from_hf(hf), bridge


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other load)",
    )  # fmt: skip
    parser.add_argument("--no-bridge", action="store_true", help="skip the all-states rows (the Bridge's eager scan)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    hf, ours, bridge = build_models(with_bridge=not args.no_bridge)
    n_layers = MAMBA2_130M["num_hidden_layers"]
    is_state = lambda name: name.endswith("hook_ssm_state")  # noqa: E731

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"HookedMamba2 vs HF Mamba2ForCausalLM (torch path), Mamba-2-130m shape, b=1, "
          f"torch threads={torch.get_num_threads()}, {args.clock} clock, load average {load}")  # fmt: skip
    for length in args.lengths:
        tokens = torch.randint(0, MAMBA2_130M["vocab_size"], (1, length))
        paths = {
            "ours forward": lambda t: ours(t),
            f"ours run_with_cache(ssm_state at {N_POSITIONS} positions)": lambda t: ours.run_with_cache(
                t, names_filter=is_state, state_positions=spread(t.shape[1])
            ),
            "HF torch path": lambda t: hf(t, use_cache=False),
        }
        with torch.inference_mode():
            median_seconds({name: partial(fn, torch.randint(0, 100, (1, 64))) for name, fn in paths.items()}, 1)
            rows = median_seconds({name: partial(fn, tokens) for name, fn in paths.items()}, args.repeats, clock)
        ours_s = rows["ours forward"]
        print(f"\nl = {length}", flush=True)
        print(f"  {'path':48s} {'seconds':>8s} {'ms/token':>9s} {'x ours':>7s}")
        for name, seconds in rows.items():
            print(f"  {name:48s} {seconds:8.3f} {1e3 * seconds / length:9.2f} {seconds / ours_s:7.2f}")
        cached = rows[f"ours run_with_cache(ssm_state at {N_POSITIONS} positions)"]
        print(f"  HF torch path / ours: {rows['HF torch path'] / ours_s:.2f}x faster (target >= 2x)")
        print(f"  run_with_cache(ssm_state at {N_POSITIONS} positions) / forward: {cached / ours_s:.2f} (target <= 1.3)")
        if bridge is None:
            continue
        hooks, kept = state_norms(n_layers)
        every = {
            "ours, every state (hooked)": lambda: ours.run_with_hooks(tokens, fwd_hooks=hooks),
            "Bridge eager_scan, every state (hooked)": lambda: bridge.run_with_hooks(
                tokens, fwd_hooks=hooks, use_cache=False  # its states are hooked only without a cache
            ),
        }
        with torch.inference_mode():
            norms = {}
            peaks = {}
            for name, fn in every.items():  # one run each, memory measured: also checks that both agree
                kept.clear()
                peaks[name] = peak_rss_added(fn)
                norms[name] = torch.stack(kept)
            times = median_seconds(every, max(1, args.repeats - 1), clock)
        (a, b) = norms.values()
        gap = ((a - b).abs().max() / b.abs().max()).item()
        for name, seconds in times.items():
            print(f"  {name:48s} {seconds:8.3f} s, peak RSS +{peaks[name] / 2**30:.2f} GiB")
        ratio = times["Bridge eager_scan, every state (hooked)"] / times["ours, every state (hooked)"]
        print(f"  Bridge eager scan / ours, every state: {ratio:.1f}x faster (target >= 10x); "
              f"state norms agree to {gap:.1e} (relative)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
