"""Scan benchmark: ours vs the sequential references, mambapy's pscan, transformers' SSD and a bandwidth floor.

Mamba-130m-like sizes, ``b = 1, d = 1536, n = 16``, shared ``B``/``C``, float32,
``delta_softplus`` with a bias, ``D`` and ``z``. Everything timed here runs in
this one process, warmed up first (numba compiled, buffers allocated); ours and
the floor take the median of ``--repeats`` runs, the slow peers (sequential
reference, mambapy's pscan, our pure-PyTorch path) run once, and only up to
``--peer-max-length`` (the reference's fwd+bwd up to
``--ref-backward-max-length``); beyond that the reference's time is
extrapolated linearly in ``l`` (it is a loop of identical steps) and marked
``~``. Peak memory at the longest length is measured in fresh subprocesses,
one per method: peak RSS (``VmHWM``, reset just before the call) minus the RSS
before the call, so inputs and imports are excluded.

The ``ssd_scan`` rows (Mamba-2's SSD, ``--ssd-shape``, default the
Mamba-2-130m mixer: ``h = 24`` heads of ``p = 64``, ``g = 1``, ``n = 128``;
``dt`` through bias and softplus, ``D``, an initial state, the final state
returned; inputs of ``benchmarks/ssd.py``) time our chunked path against the
sequential ``ssd_scan_ref`` and transformers' chunked torch SSD
(``mamba2_chunk_scan``, what ``Mamba2Mixer.torch_forward`` runs, at its
default 256-step chunks), with a floor: one fused pass reading ``x, dt, B, C``
and writing ``y``. The SSD does ``O(p n)`` arithmetic per input element, so
its floor ratio measures how far it is from memory-bound, not a target.

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scan.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scan.py --lengths 512 --repeats 3  # quick
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

from pathlib import Path

import numba
import numpy as np
import torch
from mambapy.pscan import pscan
from numba import njit, prange

from dynalens.kernels import selective_scan, selective_scan_ref

sys.path.insert(0, str(Path(__file__).parent))  # the SSD's inputs and peers (benchmarks/ssd.py), also under -P
import ssd  # noqa: E402

B_, D_, N_ = 1, 1536, 16


def make_inputs(length: int, requires_grad: bool = False, seed: int = 0) -> dict:
    """Mamba-like inputs: small positive steps, ``A = -exp(A_log)`` with ``A_log = log(1..n)``."""
    g = torch.Generator().manual_seed(seed)
    x = dict(
        u=torch.randn(B_, D_, length, generator=g),
        delta=torch.randn(B_, D_, length, generator=g) - 4.0,
        A=-torch.arange(1, N_ + 1, dtype=torch.float32).repeat(D_, 1),
        B=torch.randn(B_, N_, length, generator=g),
        C=torch.randn(B_, N_, length, generator=g),
        D=torch.ones(D_),
        z=torch.randn(B_, D_, length, generator=g),
        delta_bias=torch.rand(D_, generator=g) * 0.1,
    )
    return {k: v.requires_grad_(requires_grad) for k, v in x.items()}


def ours(x: dict, backend: str = "numba") -> torch.Tensor:
    return selective_scan(**x, delta_softplus=True, backend=backend)


def reference(x: dict) -> torch.Tensor:
    return selective_scan_ref(**x, delta_softplus=True)


def mambapy_scan(x: dict) -> torch.Tensor:
    """The same selective scan the way mamba.py computes it: states in ``(b, l, d, n)``, then ``pscan``."""
    delta = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None]).transpose(1, 2)  # (b, l, d)
    u = x["u"].transpose(1, 2)
    deltaA = torch.exp(delta.unsqueeze(-1) * x["A"])  # (b, l, d, n)
    BX = delta.unsqueeze(-1) * x["B"].transpose(1, 2).unsqueeze(2) * u.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ x["C"].transpose(1, 2).unsqueeze(-1)).squeeze(3) + x["D"] * u
    return (y * torch.nn.functional.silu(x["z"].transpose(1, 2))).transpose(1, 2)


@njit(parallel=True, cache=True)
def _floor_forward(u, delta, z, B, C, out):
    """One fused elementwise pass over the forward's bytes: reads u, delta, z, B, C; writes out."""
    b, d, L = u.shape
    n = B.shape[1]
    for job in prange(b * d):
        bi, di = job // d, job % d
        for t in range(L):
            out[bi, di, t] = u[bi, di, t] * delta[bi, di, t] + z[bi, di, t] + B[bi, di % n, t] * C[bi, di % n, t]


@njit(parallel=True, cache=True)
def _floor_backward(u, delta, z, dout, B, C, du, ddelta, dz):
    """The backward's bytes: reads u, delta, z, dout, B, C; writes du, ddelta, dz."""
    b, d, L = u.shape
    n = B.shape[1]
    for job in prange(b * d):
        bi, di = job // d, job % d
        for t in range(L):
            g = dout[bi, di, t] * B[bi, di % n, t] * C[bi, di % n, t]
            du[bi, di, t] = g * delta[bi, di, t]
            ddelta[bi, di, t] = g * u[bi, di, t]
            dz[bi, di, t] = g * z[bi, di, t]


@njit(parallel=True, cache=True)
def _floor_ssd(x, dt, B, C, y):
    """One fused pass over the SSD forward's bytes: reads x, dt, B, C; writes y (``(b, l, ...)`` layouts)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    for job in prange(b * L):
        bi, t = job // L, job % L
        for hi in range(h):
            gi = hi // (h // g)
            for q in range(p):
                y[bi, t, hi, q] = x[bi, t, hi, q] * dt[bi, t, hi] + B[bi, t, gi, q % n] * C[bi, t, gi, q % n]


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run unless repeats is 1)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_backward(fn, x: dict):
    """A closure running ``fn`` forward and backward, gradients cleared each time."""
    grad = torch.randn(B_, D_, x["u"].shape[-1], generator=torch.Generator().manual_seed(1))

    def run():
        for v in x.values():
            v.grad = None
        fn(x).backward(grad)

    return run


def time_length(length: int, repeats: int, slow_peers: bool) -> dict:
    """Seconds for every method at one length; the slow peers only when ``slow_peers``."""
    x, xg = make_inputs(length), make_inputs(length, requires_grad=True)
    a = {k: v.numpy() for k, v in x.items()}
    out = np.empty_like(a["u"])
    grads = [np.empty_like(a["u"]) for _ in range(3)]
    t = {}
    with torch.no_grad():
        t["ours fwd"] = median_time(lambda: ours(x), repeats)
        if slow_peers:
            t["ours-pytorch fwd"] = median_time(lambda: ours(x, "torch"), 1)
            t["pscan fwd"] = median_time(lambda: mambapy_scan(x), 1)
            t["ref fwd"] = median_time(lambda: reference(x), 1)
    t["floor fwd"] = median_time(lambda: _floor_forward(a["u"], a["delta"], a["z"], a["B"], a["C"], out), repeats)
    t["ours fwd+bwd"] = median_time(forward_backward(ours, xg), repeats)
    if slow_peers:
        t["pscan fwd+bwd"] = median_time(forward_backward(mambapy_scan, xg), 1)
    backward = median_time(lambda: _floor_backward(a["u"], a["delta"], a["z"], out, a["B"], a["C"], *grads), repeats)
    t["floor fwd+bwd"] = t["floor fwd"] + backward
    return t


def time_ssd(length: int, shape: str, repeats: int, slow_peers: bool) -> dict:
    """Seconds of ``ssd_scan`` (forward) and its peers at one length; the reference only when ``slow_peers``."""
    x = ssd.make_inputs(length, shape)
    a = {k: x[k].numpy() for k in ("x", "dt", "B", "C")}
    y = np.empty_like(a["x"])
    t = {}
    with torch.no_grad():
        t["ours"] = median_time(lambda: ssd.ours(x), repeats)
        t["hf"] = median_time(lambda: ssd.hf(x, 256), repeats)
        if slow_peers:
            t["ref"] = median_time(lambda: ssd.reference(x), 1)
    t["floor"] = median_time(lambda: _floor_ssd(a["x"], a["dt"], a["B"], a["C"], y), repeats)
    return t


def print_ssd(lengths: list[int], shape: str, repeats: int, peer_max_length: int) -> None:
    """The ``ssd_scan`` rows: ours, transformers' chunked SSD, the reference and the floor, per length."""
    h, p, g, n = ssd.SHAPES[shape]
    print(f"\nssd_scan ({shape}: b=1 h={h} p={p} g={g} n={n}), forward, float32; hf = mamba2_chunk_scan at 256-step chunks")
    print(f"{'l':>5} {'ours ms':>9} {'hf ms':>9} {'x hf':>7} {'ref ms':>10} {'x ref':>7} {'floor ms':>9} {'/ floor':>8}")
    for length in lengths:
        t = time_ssd(length, shape, repeats, slow_peers=length <= peer_max_length)
        o, f = t["ours"], t["floor"]
        ref = f"{t['ref'] * 1e3:10.1f} {t['ref'] / o:6.1f}x" if "ref" in t else f"{'-':>10} {'-':>7}"
        print(f"{length:5d} {o * 1e3:9.1f} {t['hf'] * 1e3:9.1f} {t['hf'] / o:6.1f}x {ref} {f * 1e3:9.2f} {o / f:7.1f}x")
        sys.stdout.flush()


def _rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in KiB, from /proc."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_memory(method: str, length: int) -> dict:
    """Run one method once in this (fresh) process; report its peak RSS above the RSS before it.

    The kernel's peak-RSS mark is reset first (``echo 5 > /proc/self/clear_refs``),
    so imports and warm-up do not hide the call's own peak. ``ref graph`` is the
    reference's forward with autograd recording: the memory its backward needs.
    """
    backward = method == "ours fwd+bwd"
    grad = backward or method == "ref graph"
    fn = ours if method.startswith("ours") else reference
    with torch.set_grad_enabled(grad):
        warm = make_inputs(64, requires_grad=grad)
        (forward_backward(fn, warm) if backward else lambda: fn(warm))()  # load numba's cache, warm torch
        x = make_inputs(length, requires_grad=grad)
        run = forward_backward(fn, x) if backward else (lambda: fn(x))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - t0
        peak = _rss_kib("VmHWM")
        del result
    return {"method": method, "peak_extra_mib": (peak - before) / 1024, "seconds": seconds}


@functools.cache
def memory_in_subprocess(method: str, length: int) -> dict:
    """:func:`measure_memory` in a fresh interpreter (cached: the reference's fwd+bwd is slow)."""
    cmd = [sys.executable, __file__, "--memory", method, "--lengths", str(length)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-max-length", type=int, default=2048, help="longest l for ref/pscan/torch path")
    parser.add_argument("--ref-backward-max-length", type=int, default=2048, help="longest l for ref fwd+bwd")
    parser.add_argument("--ssd-shape", choices=sorted(ssd.SHAPES), default="mamba2-130m", help="shape of the ssd_scan rows")
    parser.add_argument("--ssd-only", action="store_true", help="only the ssd_scan rows")
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: their own)")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.lengths[0])))
        return
    if args.ssd_only:
        print_ssd(args.lengths, args.ssd_shape, args.repeats, args.peer_max_length)
        return

    print(f"selective scan, b={B_} d={D_} n={N_}, float32, torch threads={torch.get_num_threads()}")
    print("'~' marks a reference time extrapolated linearly in l from the longest length where it ran")
    header = f"{'l':>5} {'mode':<8} {'ours ms':>9} {'ref ms':>10} {'x ref':>7} {'pscan ms':>9} {'x pscan':>8}"
    header += f" {'floor ms':>9} {'/ floor':>8} {'torch-path ms':>14}"
    print(header)
    per_step = {}  # the reference's seconds per time step, from the longest length it ran at
    ratios = {}  # (length, mode) -> {"x ref": ..., "x pscan": ..., "/ floor": ...}
    for length in args.lengths:
        slow = length <= args.peer_max_length
        t = time_length(length, args.repeats, slow_peers=slow)
        if length <= args.ref_backward_max_length:
            x = make_inputs(length, requires_grad=True)
            t["ref fwd+bwd"] = median_time(forward_backward(reference, x), 1)
        for mode in ("fwd", "fwd+bwd"):
            if f"ref {mode}" in t:
                per_step[mode] = t[f"ref {mode}"] / length
            o, f = t[f"ours {mode}"], t[f"floor {mode}"]
            r = t.get(f"ref {mode}", per_step[mode] * length)
            mark = " " if f"ref {mode}" in t else "~"
            p = t.get(f"pscan {mode}")
            ps = f"{p * 1e3:9.1f} {p / o:7.1f}x" if p else f"{'-':>9} {'-':>8}"
            tp = f"{t['ours-pytorch fwd'] * 1e3:14.1f}" if mode == "fwd" and slow else f"{'-':>14}"
            ratios[length, mode] = {"x ref": r / o, "x pscan": p / o if p else None, "/ floor": o / f}
            line = f"{length:5d} {mode:<8} {o * 1e3:9.1f} {mark}{r * 1e3:9.1f} {r / o:6.1f}x {ps}"
            print(f"{line} {f * 1e3:9.2f} {o / f:7.1f}x {tp}")
        sys.stdout.flush()

    length = max(args.lengths)
    print(f"\npeak memory added by one call at l={length} (peak RSS above the RSS before it, fresh subprocess):")
    mem = {m: memory_in_subprocess(m, length) for m in ("ours fwd", "ref fwd", "ours fwd+bwd", "ref graph")}
    for m, r in mem.items():
        print(f"  {m:<13} {r['peak_extra_mib']:8.1f} MiB  ({r['seconds']:.2f} s)")
    print(f"  ours / ref, forward: {mem['ours fwd']['peak_extra_mib'] / mem['ref fwd']['peak_extra_mib']:.3f}")
    ratio = mem["ours fwd+bwd"]["peak_extra_mib"] / mem["ref graph"]["peak_extra_mib"]
    print(f"  ours fwd+bwd / ref forward graph (a lower bound on the reference's fwd+bwd): {ratio:.3f}")
    ratios[length, "memory"] = {"ours / ref": mem["ours fwd"]["peak_extra_mib"] / mem["ref fwd"]["peak_extra_mib"]}
    print_targets(ratios)
    print_ssd(args.lengths, args.ssd_shape, args.repeats, args.peer_max_length)


# The issue's CPU targets: (length, mode, ratio, at least?, bound); length None = the longest one run.
TARGETS = [
    (2048, "fwd", "x ref", True, 20.0),
    (2048, "fwd+bwd", "x ref", True, 10.0),
    (2048, "fwd", "x pscan", True, 20.0),
    (2048, "fwd", "/ floor", False, 10.0),
    (None, "memory", "ours / ref", False, 0.25),
]


def print_targets(ratios: dict) -> None:
    """One line per target of the issue: measured ratio, bound, PASS or MISS (or not run)."""
    longest = max(length for length, _ in ratios)
    print("\ntargets (CPU):")
    for length, mode, key, at_least, bound in TARGETS:
        length = length or longest
        value = ratios.get((length, mode), {}).get(key)
        goal = f"{'>=' if at_least else '<='} {bound:g}"
        if value is None:
            verdict, shown = "not run", "-"
        else:
            verdict, shown = ("PASS" if (value >= bound if at_least else value <= bound) else "MISS"), f"{value:.3g}"
        print(f"  l={length:<5d} {mode:<8} {key:<11} {shown:>8}  target {goal:<7} {verdict}")


if __name__ == "__main__":
    main()
