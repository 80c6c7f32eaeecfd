"""SSD scan benchmark: ours vs transformers' chunked Mamba-2 scan and the sequential reference.

One process, float32, ``dt`` through bias and softplus, ``D`` per head, an
initial state, the final state returned. Peers:

- ``hf``: transformers' ``mamba2_chunk_scan`` (the chunked einsum scan that
  ``Mamba2Mixer`` runs on CPU, i.e. its ``torch_forward``), at the model's
  ``--hf-chunk`` (256, Mamba2Config's default).
- ``ref``: our sequential reference (``ssd_scan_ref``), a loop over time.

Rows: the forward (``y`` and the final state); forward + backward (a random
linear loss of ``y`` and the final state, gradients to every input); ours with
the states at 16 chosen positions (over our plain forward); ours with every
state (over the reference with every state). Ours and HF take the median of
``--repeats`` runs after a warm-up; the reference runs once. On a shared
machine ``--threads 1 --clock cpu`` times each path by this process's CPU
time, which other processes' load barely moves.

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/ssd.py                 # small shapes, about a minute
    HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/ssd.py --threads 1 --clock cpu   # on a loaded machine
    HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/ssd.py --shape mamba2-130m --lengths 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from dynalens.kernels import ssd_scan, ssd_scan_ref

# (heads, head_dim, groups, d_state) per named shape.
SHAPES = {"small": (8, 32, 1, 64), "mamba2-130m": (24, 64, 1, 128)}


def make_inputs(length: int, shape: str, requires_grad: bool = False, seed: int = 0) -> dict:
    """Mamba-2-like inputs: ``A = -(1..h)``, small steps after softplus."""
    h, p, g, n = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    x = dict(
        x=torch.randn(1, length, h, p, generator=gen),
        dt=torch.randn(1, length, h, generator=gen) - 3.0,
        A=-torch.arange(1, h + 1, dtype=torch.float32),
        B=torch.randn(1, length, g, n, generator=gen),
        C=torch.randn(1, length, g, n, generator=gen),
        D=torch.ones(h),
        dt_bias=torch.rand(h, generator=gen) * 0.1,
        initial_state=torch.randn(1, h, p, n, generator=gen) * 0.1,
    )
    return {k: v.requires_grad_(requires_grad) for k, v in x.items()}


def ours(x: dict, **kwargs):
    return ssd_scan(**x, dt_softplus=True, return_final_state=True, **kwargs)


def reference(x: dict, **kwargs):
    return ssd_scan_ref(**x, dt_softplus=True, return_final_state=True, **kwargs)


def hf(x: dict, chunk: int):
    return mamba2_chunk_scan(
        x["x"], x["dt"], x["A"], x["B"], x["C"], chunk_size=chunk, D=x["D"], dt_bias=x["dt_bias"],
        initial_states=x["initial_state"], dt_softplus=True, return_final_states=True,
    )  # fmt: skip


def backward(outputs) -> None:
    y, final = outputs[:2]
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    loss.backward()


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def once(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hf-chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-backward", action="store_true", help="skip the forward+backward rows")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other load)",
    )  # fmt: skip
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    h, p, g, n = SHAPES[args.shape]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"shape {args.shape}: b=1, h={h}, p={p}, g={g}, n={n}, float32; torch threads {torch.get_num_threads()}; "
          f"load average {load}; {args.clock} clock")  # fmt: skip
    header = f"{'l':>5} {'mode':<16} {'ours ms':>9} {'hf ms':>9} {'x hf':>7} {'ref ms':>9} {'x ref':>7}"
    print(header)
    for length in args.lengths:
        with torch.no_grad():
            x = make_inputs(length, args.shape)
            t_ours = timed(lambda: ours(x), args.repeats)
            t_hf = timed(lambda: hf(x, args.hf_chunk), args.repeats)
            t_ref = once(lambda: reference(x))
            print(f"{length:>5} {'fwd':<16} {t_ours * 1e3:>9.1f} {t_hf * 1e3:>9.1f} {t_hf / t_ours:>6.1f}x "
                  f"{t_ref * 1e3:>9.1f} {t_ref / t_ours:>6.1f}x")  # fmt: skip
            t_pos = timed(lambda: ours(x, state_positions=torch.linspace(0, length - 1, 16).long()), args.repeats)
            print(f"{length:>5} {'fwd+16 states':<16} {t_pos * 1e3:>9.1f}   ({t_pos / t_ours:.2f}x our fwd)")
            t_all = timed(lambda: ours(x, return_states=True), max(1, args.repeats // 2))
            t_ref_all = once(lambda: reference(x, return_states=True))
            print(f"{length:>5} {'fwd+all states':<16} {t_all * 1e3:>9.1f} {'-':>9} {'':>7} "
                  f"{t_ref_all * 1e3:>9.1f} {t_ref_all / t_all:>6.1f}x")  # fmt: skip
        if args.no_backward:
            continue
        xg = make_inputs(length, args.shape, requires_grad=True)
        t_ours = timed(lambda: backward(ours(xg)), args.repeats)
        t_hf = timed(lambda: backward(hf(xg, args.hf_chunk)), args.repeats)
        t_ref = once(lambda: backward(reference(xg)))
        print(f"{length:>5} {'fwd+bwd':<16} {t_ours * 1e3:>9.1f} {t_hf * 1e3:>9.1f} {t_hf / t_ours:>6.1f}x "
              f"{t_ref * 1e3:>9.1f} {t_ref / t_ours:>6.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
