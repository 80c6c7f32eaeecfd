"""The analysis protocol on the probes: one forward for many, caches, batches, persistence, errors.

Every analysis of logit_lens, residual, massive and sinks runs on the
architectures it applies to; its batched Result equals the per-prompt
Results, ``compute`` on a cache equals calling it, and it saves and loads.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

import dynalens as dl
from dynalens.models import names
from dynalens.probes import (
    ExtremeTokens,
    HeadActivity,
    LogitLens,
    MassiveAblation,
    MassiveActivations,
    ResidualNorms,
    Result,
    SinkScores,
)
from dynalens.probes.analysis import AnalysisError, Run
from tests.tolerances import assert_close

ATTENTION_ONLY = (SinkScores, ExtremeTokens, HeadActivity)

# Batches of ids below every fixture's vocabulary: equal lengths, and ragged (left-padded, with a mask).
BATCH = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(11))
RAGGED = [BATCH[0, :3].tolist(), BATCH[1].tolist(), BATCH[2, :5].tolist(), BATCH[0, 2:4].tolist()]
BATCHES = {"equal": BATCH, "ragged": RAGGED}


def every_analysis() -> list:
    return [
        LogitLens(k=3), ResidualNorms(), MassiveActivations(k=4), MassiveActivations(site="state", k=4),
        MassiveAblation(), SinkScores(), ExtremeTokens(), HeadActivity(),
    ]  # fmt: skip


def applies(analysis, model) -> bool:
    arch = model.cfg.architecture
    if isinstance(analysis, ATTENTION_ONLY):
        return arch == "transformer"
    if isinstance(analysis, MassiveActivations) and analysis.site == "state":
        return arch != "transformer"
    return True


def analysis_id(analysis) -> str:
    return repr(analysis)


# Each Result's values of one prompt: what the batched Result and the prompt's own must agree on.
def per_prompt(result: Result, i: int) -> dict[str, object]:
    p = result.prompts
    real = lambda x: p.real(x, i)  # noqa: E731
    offset = int(p.offsets[i])
    views = {
        "LogitLensResult": lambda r: {"ids": real(r.top_ids), "probs": real(r.top_probs),
                                      "tokens": r.top_tokens[i][offset:]},
        "ResidualNormsResult": lambda r: {"norms": real(r.norms)},
        "MassiveActivationsResult": lambda r: {
            "values": r.top_values[i], "positions": r.top_positions[i], "channels": r.top_channels[i],
            "medians": r.medians[i], "channel_max": r.channel_max[i],
        },
        "MassiveAblationResult": lambda r: {
            "clean": r.loss_clean[i], "ablated": r.loss_ablated[i], "random": r.loss_random[i],
            "n": r.n_entries[i],
        },
        "SinkScoresResult": lambda r: {"scores": r.scores[i], "n": r.n_queries[i]},
        "ExtremeTokensResult": lambda r: {
            "scores": r.sink_scores[i], "n": r.n_queries[i], "values": real(r.value_norms),
            "resid": real(r.resid_norms),
        },
        "HeadActivityResult": lambda r: {"scores": r.sink_scores[:, i], "n": r.n_queries[:, i]},
    }  # fmt: skip
    return views[type(result).__name__](result)


def assert_field_close(a: object, b: object, where: str, exact: bool = False) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        if a.is_floating_point() and not exact:
            assert_close(a, b, equal_nan=True, msg=where)
        else:
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), where
    else:
        assert a == b, where


def assert_same_result(a: Result, b: Result, exact: bool = False) -> None:
    """Two Results of one analysis on the same prompts agree field by field (``exact``: a round trip)."""
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "prompts":
            assert x.key() == y.key() and x.str_tokens == y.str_tokens and x.texts == y.texts
        else:
            assert_field_close(x, y, field.name, exact)


def assert_frames_close(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if np.issubdtype(x.dtype, np.floating):
            assert_close(x, y, msg=column)
        else:
            assert x.tolist() == y.tolist(), column


# ------------------------------------------------------ (a) one forward for five
def test_run_makes_one_forward_caching_only_the_union_of_hooks(tiny_llama, monkeypatch):
    analyses = [LogitLens(k=3), ResidualNorms(), MassiveActivations(k=4), SinkScores(), ExtremeTokens()]
    forwards, filters, cached = [], [], []
    handle = tiny_llama.hook_dict[names.EMBED].register_forward_hook(lambda *args: forwards.append(1))
    original = tiny_llama.run_with_cache

    def spy(*args, names_filter=None, **kwargs):
        filters.append(list(names_filter))
        logits, cache = original(*args, names_filter=names_filter, **kwargs)
        cached.append(cache)
        return logits, cache

    monkeypatch.setattr(tiny_llama, "run_with_cache", spy)
    try:
        together = dl.run(tiny_llama, BATCH, analyses)
    finally:
        handle.remove()
    assert len(forwards) == 1 and len(filters) == 1
    n = tiny_llama.cfg.n_layers
    union = {
        *names.resid_stream(n), *(names.pattern(layer) for layer in range(n)),
        *(names.attn(layer, "v") for layer in range(n)),
    }  # fmt: skip
    assert set(filters[0]) == union
    # The Bridge also files each alias' tensor under its own name (blocks.0.hook_in for
    # blocks.0.hook_resid_pre): the same storage, nothing more is held.
    (cache,) = cached
    assert union <= set(cache.keys())
    assert {t.data_ptr() for t in cache.values()} == {cache[name].data_ptr() for name in union}
    assert list(together) == ["logit_lens", "residual_norms", "massive_activations", "sink_scores", "extreme_tokens"]
    assert together.logits.shape == (*BATCH.shape, tiny_llama.cfg.d_vocab)
    monkeypatch.undo()
    for analysis in analyses:
        assert_same_result(together[analysis], analysis(tiny_llama, BATCH))


def test_experiments_run_after_the_shared_forward(tiny_mamba):
    together = dl.run(tiny_mamba, BATCH, [ResidualNorms(), MassiveAblation()])
    assert_same_result(together["massive_ablation"], MassiveAblation()(tiny_mamba, BATCH))


def test_transformer_lens_style_cache_code_gives_the_logit_lens(any_model):
    """``logit_attrs(accumulated_resid(apply_ln=True), tokens)`` on any architecture: LogitLens' probabilities.

    ``logit_attrs`` leaves out the unembedding bias and the softmax's normaliser,
    so the ranks' log-probability differences are compared.
    """
    lens_analysis = LogitLens(k=3)
    prompts = dl.Prompts(any_model, RAGGED)
    _, cache = any_model.run_with_cache(prompts)
    lens = lens_analysis.compute(cache, prompts)
    stack = cache.accumulated_resid(apply_ln=True)  # [layer + 1, batch, pos, d_model]
    assert stack.shape[0] == len(lens.hook_names)
    bias = any_model.unembed(torch.zeros(1, 1, any_model.cfg.d_model)).reshape(-1)  # b_U (zeros if none)
    ids = lens.top_ids.clamp(min=0)  # pad positions hold -1
    logits = torch.stack([
        torch.stack([cache.logit_attrs(stack[r : r + 1], tokens=ids[:, :, r, j])[0] for j in range(3)], -1)
        for r in range(stack.shape[0])
    ], 2) + bias[ids]  # [batch, pos, row, k]
    mask = prompts.mask
    expected = lens.top_probs.log() - lens.top_probs[..., :1].log()
    assert_close((logits - logits[..., :1])[mask], expected[mask])


# --------------------------------------------------------- (b) a run saved whole
def test_run_save_load_round_trip(tiny_llama, tmp_path):
    run = dl.run(tiny_llama, BATCH, [LogitLens(k=2), MassiveActivations(), HeadActivity()])
    run.save(tmp_path / "run")
    back = Run.load(tmp_path / "run")
    assert sorted(back) == sorted(run)
    for name in run:
        assert_same_result(back[name], run[name], exact=True)
        assert back[name].to_frame().equals(run[name].to_frame())
    assert back["logit_lens"].params == {"k": 2} and back["logit_lens"].version == dl.__version__


# ------------------------------------------------------- (c) non-finite caches
@pytest.mark.parametrize("make", [ResidualNorms, lambda: MassiveActivations(k=2)])
def test_nan_or_inf_in_the_cache_names_hook_and_position(any_model, make):
    analysis = make()
    prompts = dl.Prompts(any_model, BATCH)
    _, cache = any_model.run_with_cache(prompts, names_filter=analysis.hooks(any_model))
    hook = names.resid_post(1)
    cache.cache_dict[hook] = cache[hook].clone()
    cache.cache_dict[hook][1, 4, 0] = float("inf")
    with pytest.raises(AnalysisError, match=rf"'{hook}'.*prompt 1, position 4"):
        analysis.compute(cache, prompts)


def test_non_finite_values_at_pad_positions_are_not_read(any_model):
    analysis = ResidualNorms()
    prompts = dl.Prompts(any_model, RAGGED)  # prompt 0 has 4 pad columns
    _, cache = any_model.run_with_cache(prompts, names_filter=analysis.hooks(any_model))
    clean = analysis.compute(cache, prompts)
    hook = names.resid_post(1)
    cache.cache_dict[hook] = cache[hook].clone()
    cache.cache_dict[hook][0, :4] = float("nan")
    dirty = analysis.compute(cache, prompts)
    assert_same_result(dirty, clean)
    assert dirty.norms[0, :4].isnan().all() and not dirty.to_frame()["norm"].isna().any()


@pytest.mark.parametrize("analysis", [a for a in every_analysis() if not isinstance(a, MassiveAblation)],
                         ids=analysis_id)  # fmt: skip
def test_garbage_at_every_pad_position_leaves_the_result_unchanged(any_model, analysis):
    if not applies(analysis, any_model):
        return
    prompts = dl.Prompts(any_model, RAGGED)
    _, cache = any_model.run_with_cache(prompts, names_filter=analysis.hooks(any_model))
    clean = analysis.compute(cache, prompts)
    pad = ~prompts.mask
    for name in list(cache.keys()):
        x = cache[name].clone()
        if name.endswith("attn.hook_pattern"):  # [batch, head, q, k]: pad queries and keys (finite: checked whole)
            x.masked_fill_(pad[:, None, :, None] | pad[:, None, None, :], 1e4)
        else:  # [batch, pos, ...]
            x[pad] = float("nan")
        cache.cache_dict[name] = x
    assert_same_result(analysis.compute(cache, prompts), clean)


# ------------------------------------------ (d) compute on your cache == call
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("analysis", every_analysis(), ids=analysis_id)
def test_compute_from_a_cache_equals_calling_the_analysis(any_model, analysis, batch):
    if not applies(analysis, any_model):
        return
    prompts = dl.Prompts(any_model, BATCHES[batch])
    _, cache = any_model.run_with_cache(prompts, names_filter=analysis.hooks(any_model))
    assert_same_result(analysis.compute(cache, prompts), analysis(any_model, prompts))


# ----------------------------------------------- batched == each prompt alone
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("analysis", every_analysis(), ids=analysis_id)
def test_batched_result_equals_each_prompt_alone(any_model, analysis, batch):
    if not applies(analysis, any_model):
        return
    batched = analysis(any_model, BATCHES[batch])
    assert batched.architecture == any_model.cfg.architecture and len(batched.prompts) == len(BATCHES[batch])
    assert batched.prompts.is_padded == (batch == "ragged")
    frame = batched.to_frame()
    for i, prompt in enumerate(batched.prompts):
        alone = analysis(any_model, prompt)
        mine, theirs = per_prompt(batched, i), per_prompt(alone, 0)
        for key in mine:
            assert_field_close(mine[key], theirs[key], f"{type(batched).__name__}.{key} of prompt {i}")
        own = alone.to_frame().assign(prompt=i)
        assert_frames_close(frame[frame["prompt"] == i].reset_index(drop=True), own)


@pytest.mark.parametrize("analysis", every_analysis(), ids=analysis_id)
def test_metrics_are_named_floats_a_sweep_can_store(any_model, analysis):
    if not applies(analysis, any_model):
        return
    metrics = analysis(any_model, RAGGED).metrics()
    assert metrics and all(isinstance(k, str) and isinstance(v, float) for k, v in metrics.items())


# --------------------------------------------------------- save / load, params
@pytest.mark.parametrize("analysis", every_analysis(), ids=analysis_id)
def test_results_save_and_load_exactly(any_model, analysis, tmp_path):
    if not applies(analysis, any_model):
        return
    result = analysis(any_model, BATCH)
    result.save(tmp_path / "r.safetensors")
    back = Result.load(tmp_path / "r.safetensors")
    assert_same_result(back, result, exact=True)
    assert back.params == {k: v for k, v in analysis.get_params().items()}
    assert back.model_name == result.model_name and back.architecture == any_model.cfg.architecture


def test_analyses_store_their_parameters_only():
    lens = LogitLens(k=0)  # validated when it runs, not when it is made
    assert lens.get_params() == {"k": 0} and repr(lens) == "LogitLens(k=0)"
    assert lens.set_params(k=4).k == 4 and lens.name == "logit_lens"
    assert MassiveActivations(site="state").get_params() == {
        "site": "state", "k": 10, "min_magnitude": 100.0, "min_ratio": 1000.0,
    }  # fmt: skip
    assert SinkScores().name == "sink_scores" and HeadActivity().name == "head_activity"


# ---------------------------------------------- (e) analyses that do not apply
@pytest.mark.parametrize("make", ATTENTION_ONLY)
def test_attention_analyses_name_what_a_recurrent_model_lacks(tiny_mamba, tiny_rnn, make):
    for model in (tiny_mamba, tiny_rnn):
        arch = model.cfg.architecture
        message = rf"{make.__name__} needs attention patterns: it applies to transformer models, .* is a {arch}"
        with pytest.raises(AnalysisError, match=message):
            make()(model, BATCH)
        with pytest.raises(AnalysisError, match=message):
            dl.run(model, BATCH, [ResidualNorms(), make()])


def test_an_analysis_that_does_not_apply_fails_before_the_forward(tiny_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_llama, "run_with_cache", lambda *a, **k: calls.append(1))
    with pytest.raises(AnalysisError, match="recurrent state, which a transformer model does not have"):
        dl.run(tiny_llama, BATCH, [ResidualNorms(), MassiveActivations(site="state")])
    assert calls == []


def test_a_cache_without_the_hooks_says_which_are_missing(tiny_rnn):
    prompts = dl.Prompts(tiny_rnn, BATCH)
    _, cache = tiny_rnn.run_with_cache(prompts, names_filter=[names.resid_pre(0)])
    with pytest.raises(AnalysisError, match=r"needs hooks the cache does not hold: \['blocks.0.hook_resid_post'"):
        ResidualNorms().compute(cache, prompts)


def test_bad_parameters_name_what_is_accepted(tiny_rnn):
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        LogitLens(k=0)(tiny_rnn, BATCH)
    with pytest.raises(ValueError, match="min_magnitude"):
        MassiveActivations(min_magnitude=-1.0)(tiny_rnn, BATCH)
    with pytest.raises(ValueError, match="mode must be one of 'zero', 'mean'"):
        MassiveAblation(mode="one")(tiny_rnn, BATCH)
    with pytest.raises(ValueError, match="'resid', 'state'"):
        MassiveActivations(site="stat")(tiny_rnn, BATCH)


def test_positions_count_real_tokens(tiny_rnn):
    result = ResidualNorms()(tiny_rnn, BATCH)
    frame = result.to_frame()
    assert frame.groupby("prompt")["position"].agg(["min", "max"]).values.tolist() == [[0, 6]] * 3
    assert math.isclose(frame["norm"].iloc[0], float(result.norms[0, 0, 0]), rel_tol=1e-6)
