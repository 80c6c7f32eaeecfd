"""All head scores of a model: ``dl.circuits.HeadScores`` + ``CopyingScores`` vs a per-head loop with TransformerLens.

Workload: ``dl.circuits.repeated_tokens`` (8 sequences of BOS + 20 random
tokens repeated, 41 tokens) on SmolLM2-135M (30 layers × 9 heads = 270).
Ours: one batched forward caching the patterns (``dl.run``), the three
pattern scores per prompt, copying from ``[d_head, d_head]`` eigenproblems. Peer, the straightforward
way: per sequence, TransformerLens' ``detect_head`` for induction and
previous-token heads (a forward each, a Python loop over heads), the sink
score read per head from a cache, and per head the eigenvalues of the
``[d_model, d_model]`` OV circuit ``W_V W_O W_U W_E``. Both run in this
process, round-robin; the script checks that they agree and prints the ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/heads.py --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.stats import spearmanr
from transformer_lens.head_detector import detect_head

import dynalens as dl
from dynalens.models import names
from dynalens.probes.analysis import run


@torch.no_grad()
def per_head_loop(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four scores the straightforward way (TransformerLens' detector, one head at a time)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    induction, prev, sink = (torch.zeros(n_layers, n_heads) for _ in range(3))
    for seq in tokens:
        text_free = seq[None]  # detect_head takes token ids through model.to_tokens
        induction += detect_head(model, text_free, "induction_head", exclude_bos=False) / len(tokens)
        prev += detect_head(model, text_free, "previous_token_head") / len(tokens)
        patterns = [names.pattern(layer) for layer in range(n_layers)]
        _, cache = model.run_with_cache(text_free, names_filter=patterns)
        for layer in range(n_layers):
            for head in range(n_heads):
                pattern = cache[patterns[layer]][0, head]
                sink[layer, head] += pattern[1:, 0].mean() / len(tokens)
    eu = model.W_U.float() @ model.W_E.float()
    group = n_heads // model.W_V.shape[1]
    copying = torch.zeros(n_layers, n_heads)
    for layer in range(n_layers):
        for head in range(n_heads):
            ov = model.W_V[layer, head // group].float() @ model.W_O[layer, head].float() @ eu
            eig = torch.linalg.eigvals(ov)
            copying[layer, head] = eig.sum().real / eig.abs().sum()
    return {"induction": induction, "prev_token": prev, "sink": sink, "copying": copying}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    model = dl.load(args.model)
    half_len = min(20, (model.cfg.n_ctx - 2) // 2)  # the default workload; TL detect_head needs pos < n_ctx
    tokens = dl.circuits.repeated_tokens(model, half_len=half_len)
    analyses = [dl.circuits.HeadScores(), dl.circuits.CopyingScores()]
    ours_fn = lambda: run(model, tokens, analyses)  # noqa: E731
    ours = ours_fn()  # warm-up, and the values to compare
    grids = {kind: ours["head_scores"].score(kind) for kind in ("induction", "prev_token", "sink")}
    grids["copying"] = ours["copying_scores"].scores
    peer = per_head_loop(model, tokens)
    rhos = {kind: spearmanr(values.flatten(), grids[kind].flatten()).statistic for kind, values in peer.items()}
    for kind, rho in rhos.items():
        print(f"{kind:>10}: Spearman rho(ours, per-head loop) = {rho:.4f}")
    times: dict[str, list[float]] = {"ours": [], "per-head loop": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours_fn), ("per-head loop", lambda: per_head_loop(model, tokens))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    n = model.cfg.n_layers * model.cfg.n_heads
    print(f"{args.model}: {n} heads, tokens {tuple(tokens.shape)}, median of {args.repeats}")
    for name, seconds in med.items():
        print(f"{name:>14}: {seconds:7.2f} s   ratio {seconds / med['ours']:5.1f}x")
    print(
        f"SUMMARY heads: {n} heads, ours {med['ours']:.2f} s, per-head loop {med['per-head loop']:.2f} s "
        f"({med['per-head loop'] / med['ours']:.1f}x), min Spearman rho over the 4 scores {min(rhos.values()):.4f}"
    )


if __name__ == "__main__":
    main()
