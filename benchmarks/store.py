"""Activation store throughput: ``build_store`` vs a plain forward loop over the same corpus.

Workload: the Python language reference (``dynalens.models.corpus``) as token
ids, cut into sequences of ``--seq-len`` tokens, on SmolLM2-135M (text
tokenised by its tokenizer) and on the zoo's ``mamba-ar`` (the state
``blocks.0.mixer.hook_ssm_state`` included). Peer: a plain loop that runs
``run_with_cache`` on the same batches with the same hooks and keeps the
activations (no files). Ours: ``build_store`` writing shards. Both run in
this process, alternating, after a warm-up; the script prints tokens per
second and the ratio (target ≥ 0.9×). dynalens is imported before torch, as
the README asks of a script, so both run with torch's huge pages.

    HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/store.py --repeats 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import dynalens as dl  # isort: skip  (before torch, as a user script does: torch's huge pages on, see the README)
import torch
from dynalens.models import names
from dynalens.models.corpus import python_reference
from dynalens.models.store import build_store, corpus_tokens


def plain_loop(model, hooks, sequences, batch_size) -> int:
    kept = []
    with torch.no_grad():
        for batch in sequences.split(batch_size):
            _, cache = model.run_with_cache(batch, names_filter=hooks)
            kept.append({name: cache[name].flatten(0, 1).clone() for name in hooks})
    return sequences.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    cases = [
        ("smollm2-135m", lambda m: [names.resid_post(m.cfg.n_layers // 2), names.mlp_out(3)]),
        ("mamba-ar", lambda m: [names.resid_post(1), names.mixer(0, "ssm_state")]),
    ]
    print(f"{'model':14s} {'loop tok/s':>11s} {'store tok/s':>12s} {'ratio':>6s}")
    for name, hooks_of in cases:
        model = dl.load(name)
        hooks = hooks_of(model)
        text = python_reference()
        ids = corpus_tokens(model, text) if model.tokenizer is not None else torch.randint(
            0, model.cfg.d_vocab, (args.seq_len * args.sequences,), generator=torch.Generator().manual_seed(0))
        ids = ids[: args.seq_len * args.sequences]
        sequences = ids.reshape(-1, args.seq_len)
        loop_t, store_t = [], []
        for repeat in range(args.repeats + 1):  # the first round warms up
            start = time.perf_counter()
            plain_loop(model, hooks, sequences, args.batch_size)
            loop = time.perf_counter() - start
            folder = tempfile.mkdtemp(prefix="dynalens-store-")
            start = time.perf_counter()
            build_store(model, hooks, ids, folder, seq_len=args.seq_len, shard_sequences=16,
                        batch_size=args.batch_size, progress=False)  # fmt: skip
            store = time.perf_counter() - start
            shutil.rmtree(folder)
            if repeat:
                loop_t.append(loop)
                store_t.append(store)
        n = ids.numel()
        loop_rate, store_rate = n / statistics.median(loop_t), n / statistics.median(store_t)
        print(f"{name:14s} {loop_rate:11.0f} {store_rate:12.0f} {store_rate / loop_rate:6.2f}x")


if __name__ == "__main__":
    main()
