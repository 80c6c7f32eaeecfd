"""Retrieval heads of SmolLM2-135M: the paper's score on a needle grid, then top-k vs random-head masking.

Detection: ``dl.circuits.RetrievalScores`` on needles × context lengths ×
depths (the paper's code: 3 needles × 20 lengths of 1K-50K tokens × 10
depths on 7B models; here the lengths fit this CPU). Prints the share of
heads above 0.1 overall and per context length (each length's haystacks
averaged alone), a histogram of the scores, the strongest heads, and the
seconds per haystack. Masking: the top-k heads vs k random heads drawn
outside the top 100, masked at decoding steps only, needle accuracy = ROUGE-1
recall of the answer (``NeedleScorer``), ``trials`` trials with 95% CIs.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/retrieval_heads.py \\
        --lengths 1000 2000 3000 --depths 5 --ks 5 10 --trials 3 --out /tmp/retrieval.safetensors

Detection can run in parallel processes (``--ks`` with no value: no masking),
their files merged with ``--load a.safetensors b.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from itertools import pairwise

import torch

import dynalens as dl
from dynalens.circuits import NEEDLES, RetrievalScoresResult, make_haystacks
from dynalens.models.prompts import Prompts


def merge(model, parts: list[RetrievalScoresResult]) -> RetrievalScoresResult:
    """One result from several runs' haystacks (each head's mean over all retrieved haystacks)."""
    haystacks = [h for p in parts for h in p.haystacks()]
    return dataclasses.replace(
        parts[0], prompts=Prompts(model, [h.tokens for h in haystacks]),
        haystack_scores=torch.cat([p.haystack_scores for p in parts]), recall=torch.cat([p.recall for p in parts]),
        responses=[r for p in parts for r in p.responses], needle_spans=[list(h.needle_span) for h in haystacks],
        answers=[h.answer for h in haystacks],
    )  # fmt: skip


def report_scores(ret: RetrievalScoresResult, lengths: list[int]) -> None:
    """The share of heads above threshold, overall and per context length, and the score histogram."""
    n_heads = ret.scores.numel()
    print(f"haystacks {len(ret.recall)}, retrieved {ret.retrieved} (mean recall {ret.recall.mean():.3f})")
    print(f"heads > {ret.threshold}: {len(ret.heads())} of {n_heads} = {ret.fraction:.1%}")
    length_of = torch.tensor([min(lengths, key=lambda t: abs(p - t)) for p in ret.prompt_tokens])
    for length in lengths:
        keep = (length_of == length) & (ret.recall > ret.min_recall)
        share = (ret.haystack_scores[keep].mean(0) > ret.threshold).float().mean().item() if keep.any() else 0.0
        prompts = [p for p, t in zip(ret.prompt_tokens, length_of.tolist()) if t == length]
        print(f"  context {length} ({len(prompts)} haystacks of {min(prompts)}-{max(prompts)} prompt tokens, "
              f"{int(keep.sum())} retrieved): {share:.1%} of heads > {ret.threshold}")
    kept = ret.haystack_scores[ret.recall > ret.min_recall]
    draws = torch.randint(len(kept), (1000, len(kept)), generator=torch.Generator().manual_seed(0))
    shares = (kept[draws].mean(1) > ret.threshold).flatten(1).float().mean(1)
    print(f"  bootstrap over the retrieved haystacks (1000 resamples): share 95% interval "
          f"{shares.quantile(0.025):.1%}-{shares.quantile(0.975):.1%}")
    edges = [0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, float("inf")]
    counts = [int(((ret.scores >= lo) & (ret.scores < hi)).sum()) for lo, hi in pairwise(edges)]
    print("histogram: " + ", ".join(f"[{lo}, {hi}): {c}" for lo, hi, c in zip(edges, edges[1:], counts)))
    top = ret.top(25)
    print("top heads: " + ", ".join(f"L{r.layer}H{r.head} {r.score:.3f}" for r in top.itertuples()))
    failed = [r for r, x in zip(ret.responses, ret.recall.tolist()) if x <= ret.min_recall]
    print(f"responses left out ({len(failed)}): {failed[:5]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 3000])
    parser.add_argument("--depths", type=int, default=5, help="needle depths per needle and length")
    parser.add_argument("--ks", type=int, nargs="*", default=[5, 10], help="heads masked (none: no masking)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--mask-haystacks", type=int, default=3, help="haystacks per masking trial")
    parser.add_argument("--mask-context", type=int, default=1000)
    parser.add_argument("--out", default=None, help="save the RetrievalScoresResult here")
    parser.add_argument("--load", nargs="+", default=None, help="read (and merge) saved results instead")
    args = parser.parse_args(argv)
    model = dl.load(args.model)
    if args.load:
        ret = merge(model, [RetrievalScoresResult.load(path) for path in args.load])
    else:
        n = len(NEEDLES) * len(args.lengths) * args.depths
        haystacks = make_haystacks(model, n, context_tokens=args.lengths)
        start = time.perf_counter()
        ret = dl.circuits.RetrievalScores(haystacks, progress=True)(model)
        seconds = time.perf_counter() - start
        print(f"detection: {n} haystacks in {seconds:.0f} s ({seconds / n:.1f} s per haystack)")
        if args.out:
            ret.save(args.out)
    report_scores(ret, args.lengths)
    scorer = dl.circuits.NeedleScorer(model, n_haystacks=args.mask_haystacks, context_tokens=args.mask_context)
    for k in args.ks:
        start = time.perf_counter()
        effect = dl.circuits.HeadAblation(
            ret.top(k), scorer, method="mask", last_queries=scorer.answer_queries,
            exclude=ret.top(100), trials=args.trials,
        )(model)  # fmt: skip
        frame = effect.to_frame().set_index("condition")
        row = {c: f"{frame.loc[c, 'mean']:.3f} [{frame.loc[c, 'ci_low']:.3f}, {frame.loc[c, 'ci_high']:.3f}]"
               for c in ("clean", "ablated", "control")}  # fmt: skip
        print(f"mask k={k}, {args.trials} trials x {args.mask_haystacks} haystacks of {args.mask_context} tokens "
              f"({time.perf_counter() - start:.0f} s): clean {row['clean']}, top-k {row['ablated']}, "
              f"random {row['control']}")  # fmt: skip
        for trial, (scores, control) in enumerate(zip(effect.scores.tolist(), effect.control_heads)):
            print(f"  trial {trial}: clean {scores[0]:.3f}, top-k {scores[1]:.3f}, random {scores[2]:.3f} "
                  f"(random heads {', '.join(f'L{layer}H{head}' for layer, head in control)})")


if __name__ == "__main__":
    main()
