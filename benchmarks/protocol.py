"""Forwards and wall time per new prompt, before and after the analysis protocol, in one process.

Run from the repository root (SmolLM2 and the zoo present)::

    HF_HUB_OFFLINE=1 .venv/bin/python -P benchmarks/protocol.py [--repeats 5] [--tokens 64] [--batch 8]

What "before" and "after" mean
------------------------------
*Before* is how the landed code (commit ``827b385``) paid for a new prompt:
every analysis entry point ran its own forward pass (``residual_norms(model,
tokens)``, ``logit_lens(...)``, ``mixer_matrices(...)`` each called
``run_with_cache``), and each dashboard panel asked the results cache for its
own analysis, so the Explorer paid three forwards per new prompt and the
Activations page two. That code is gone (its entry points were removed with
the protocol), so it is not imported here: the before path runs **each
analysis on its own** (``analysis(model, prompts)``: one forward with that
analysis' hooks; for a page, one ``backend.page_results`` call per panel, each
with one analysis, as the old panels did). The per-analysis computation is
today's code in both paths, so the ratios measure what sharing the forward
saves, not other changes to the analyses.

*After* is what the code does now: one ``dl.run(model, prompts, [...])`` for
all the analyses (for a page, one ``backend.page_results`` call with the
page's list, which is what its callbacks do).

Both paths run in this process on the same model, with a fresh random prompt
of ``--tokens`` tokens per repeat (and a fresh results cache folder), so no
result is ever read back; the order of the two paths alternates between
repeats. Forwards are counted with a torch hook on ``hook_embed`` (one call
per forward pass). Every Result of the after path is checked against the
before path's (tensors to 1e-5); in the batch case the probes' contract
tests check that a batched Result equals the per-prompt ones.

It prints, per dashboard page and for the five analyses LogitLens,
MassiveActivations, HeadScores, ResidualNorms and SinkScores: forwards and the
median wall time before and after, and their ratio. ``--batch N`` adds the
five analyses on N prompts: before, one forward per prompt and analysis (the
old Results held exactly one prompt), after, one ``dl.run`` on the batch.
Circuit and Steering run Experiments (the attribution graph's clean and
corrupt passes and backward pass; generation), whose passes the protocol
does not change: they are listed, not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import dynalens as dl  # before torch, as in the dashboard's process: torch's huge pages on (dynalens/__init__.py)

import torch

from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import Analysis, run


@contextmanager
def counting_forwards(model: Any):
    """A list that gets one entry per forward pass of ``model`` while the block runs."""
    seen: list[int] = []
    handle = model.hook_dict[names.EMBED].register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def random_prompts(model: Any, n_tokens: int, batch: int, rng: random.Random) -> Prompts:
    """``batch`` prompts of ``n_tokens`` random ids each (BOS first when the tokenizer has one)."""
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    low, high = (1000, min(model.cfg.d_vocab, 40000)) if bos is not None else (0, model.cfg.d_vocab)
    rows = []
    for _ in range(batch):
        ids = [rng.randrange(low, high) for _ in range(n_tokens)]
        rows.append([bos, *ids[1:]] if bos is not None else ids)
    return Prompts(model, rows)


def same_results(before: Any, after: Any) -> None:
    """Every tensor field of two Results agrees to 1e-5."""
    assert type(before) is type(after), (type(before), type(after))
    for field in dataclasses.fields(after):
        a, b = getattr(before, field.name), getattr(after, field.name)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, equal_nan=True)


def timed(fn: Callable[[], Any], model: Any) -> tuple[float, int, Any]:
    """Wall time, forwards counted and the value of ``fn()``."""
    with counting_forwards(model) as seen:
        start = time.perf_counter()
        value = fn()
        elapsed = time.perf_counter() - start
    return elapsed, len(seen), value


class Row:
    """One line of the table: forwards and times of both paths over the repeats."""

    def __init__(self, label: str) -> None:
        self.label, self.times, self.forwards = label, {"before": [], "after": []}, {"before": set(), "after": set()}

    def add(self, path: str, seconds: float, forwards: int) -> None:
        self.times[path].append(seconds)
        self.forwards[path].add(forwards)

    def line(self) -> str:
        med = {k: statistics.median(v) for k, v in self.times.items()}
        fwd = {k: "/".join(str(f) for f in sorted(v)) for k, v in self.forwards.items()}
        return (f"{self.label:<44} {fwd['before']:>7} {med['before']:8.3f} s   {fwd['after']:>6} "
                f"{med['after']:8.3f} s   {med['before'] / med['after']:5.2f}x")  # fmt: skip


HEADER = f"{'':<44} {'before':>7} {'':>10}   {'after':>6} {'':>10}   ratio\n{'':<44} {'fwd':>7} {'wall':>10}   {'fwd':>6} {'wall':>10}"


def compare(
    row: Row,
    model: Any,
    make_prompts: Callable[[], Prompts],
    before: Callable[[Prompts], dict],
    after: Callable[[Prompts], dict],
    repeats: int,
) -> None:
    """Time ``before`` and ``after`` on a new prompt per repeat (alternating which goes first); check they agree."""
    for repeat in range(repeats):
        prompts = make_prompts()
        order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
        found = {}
        for path in order:
            seconds, forwards, found[path] = timed(lambda: (before if path == "before" else after)(prompts), model)
            row.add(path, seconds, forwards)
        for name, result in found["after"].items():
            same_results(found["before"][name], result)
    print(row.line(), flush=True)


# ------------------------------------------------------------------- pages
def page_paths(model_name: str, model: Any, app: Any) -> tuple[Callable, Callable]:
    """The page's before path (one ``page_results`` per panel) and after path (one for the page), each on a fresh cache."""
    from dynalens.dashboard import backend
    from dynalens.dashboard.cache import ResultsCache

    def fresh_cache() -> None:
        app.server.config[backend.CACHE_CONFIG_KEY] = ResultsCache(tempfile.mkdtemp(prefix="dl-protocol-"))

    def before(analyses: Sequence[Analysis]) -> Callable[[Prompts], dict]:
        def go(prompts: Prompts) -> dict:
            fresh_cache()
            with app.server.app_context():
                return {a.name: backend.page_results(model_name, model, prompts, [a])[a.name]
                        for a in analyses if _applies(a, model)}  # fmt: skip

        return go

    def after(analyses: Sequence[Analysis]) -> Callable[[Prompts], dict]:
        def go(prompts: Prompts) -> dict:
            fresh_cache()
            with app.server.app_context():
                found = backend.page_results(model_name, model, prompts, analyses)
                return {a.name: found[a.name] for a in analyses if found.applies(a)}

        return go

    return before, after


def _applies(analysis: Analysis, model: Any) -> bool:
    """Whether the analysis applies to ``model`` (``backend.page_results`` skips it the same way)."""
    try:
        analysis.check(model)
    except Exception:  # noqa: BLE001 - as the backend: any failed check means it does not apply
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="new prompts per measurement (median reported)")
    parser.add_argument("--tokens", type=int, default=64, help="prompt length in tokens (BOS included)")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batch case (0: skip it)")
    parser.add_argument("--rnn", default="lstm-hmm", help="the RNN for the Dynamics page's phase portrait")
    parser.add_argument("--pages", default="explorer,activations,dynamics,dynamics-rnn,heads",
                        help="comma-separated pages to measure (empty: none)")
    parser.add_argument("--no-analyses", action="store_true", help="skip the five analyses")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    rng = random.Random(0)

    from dynalens.dashboard.app import create_app

    app = create_app(cache_dir=tempfile.mkdtemp(prefix="dl-protocol-"))  # registers the pages
    from dynalens.dashboard.pages import activations, dynamics, explorer, heads

    smollm2 = dl.load("smollm2-135m")
    rnn = dl.load(args.rnn)
    for model in (smollm2, rnn):  # the first passes of a process are slow (allocator, kernels): not measured
        warm = random_prompts(model, args.tokens, 1, rng)
        for _ in range(3):
            run(model, warm, [dl.probes.ResidualNorms(), dl.probes.LogitLens(k=5)])

    print(f"# benchmarks/protocol.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"# median of {args.repeats} new prompts of {args.tokens} tokens; fwd = forward passes counted\n")
    print(HEADER)

    print("dashboard pages (server side of a new prompt: analyses + results cache writes)")
    pages = {
        "explorer": ("Explorer (SmolLM2)", "smollm2-135m", smollm2, explorer.analyses(smollm2.cfg.n_layers - 1)),
        "activations": ("Activations (SmolLM2)", "smollm2-135m", smollm2, activations.analyses("resid", args.tokens)),
        "dynamics": ("Dynamics (SmolLM2)", "smollm2-135m", smollm2, dynamics.analyses(smollm2, 0, args.tokens)),
        "dynamics-rnn": (f"Dynamics ({args.rnn})", args.rnn, rnn, dynamics.analyses(rnn, 0, args.tokens)),
        "heads": ("Heads: pattern on the prompt (SmolLM2)", "smollm2-135m", smollm2,
                  heads.analyses(smollm2.cfg.n_layers - 1)),
    }  # fmt: skip
    chosen = [pages[p.strip()] for p in args.pages.split(",") if p.strip()]
    for label, name, model, analyses in chosen:
        before, after = page_paths(name, model, app)
        make = lambda model=model: random_prompts(model, args.tokens, 1, rng)
        compare(Row(label), model, make, before(analyses), after(analyses), args.repeats)
    print("Circuit, Steering: experiments with their own passes (attribution graph, generation): unchanged")
    if args.no_analyses:
        return 0

    five = [dl.probes.LogitLens(k=5), dl.probes.MassiveActivations(), dl.circuits.HeadScores(),
            dl.probes.ResidualNorms(), dl.probes.SinkScores()]  # fmt: skip
    alone = lambda analyses: lambda prompts: {a.name: a(smollm2, prompts) for a in analyses}
    together = lambda analyses: lambda prompts: dict(run(smollm2, prompts, analyses))
    one = lambda: random_prompts(smollm2, args.tokens, 1, rng)
    print("\nanalyses on SmolLM2, one new prompt (before: the analysis alone = its own forward)")
    for analysis in five:
        compare(Row(f"{type(analysis).__name__}"), smollm2, one, alone([analysis]), together([analysis]), args.repeats)
    compare(Row("all five (before: one forward each)"), smollm2, one, alone(five), together(five), args.repeats)
    if args.batch:
        print(f"\nthe five on a batch of {args.batch} new prompts (before: one forward per prompt and analysis)")

        def per_prompt(prompts: Prompts) -> dict:
            return {f"{a.name}.{i}": a(smollm2, p) for i, p in enumerate(prompts) for a in five}

        def batched(prompts: Prompts) -> dict:
            return dict(run(smollm2, prompts, five))

        batch = lambda: random_prompts(smollm2, args.tokens, args.batch, rng)
        row = Row(f"all five, {args.batch} prompts")
        for repeat in range(args.repeats):
            prompts = batch()
            for path in (("before", "after") if repeat % 2 == 0 else ("after", "before")):
                seconds, forwards, _ = timed(lambda: (per_prompt if path == "before" else batched)(prompts), smollm2)
                row.add(path, seconds, forwards)
        print(row.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
