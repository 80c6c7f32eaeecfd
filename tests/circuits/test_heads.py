"""Head scores against TransformerLens' head detector, the full OV circuit and known answers; the protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dynalens.circuits import CopyingScores, CopyingScoresResult, HeadScores, HeadScoresResult
from dynalens.circuits.heads import attention_scores, induction_targets, repeated_tokens
from dynalens.kernels import mixer_matrix, ssd_mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import AnalysisError, run
from dynalens.probes.results import Result
from scipy.stats import spearmanr
from transformer_lens.head_detector import detect_head
from tests.tolerances import assert_close

WORDS = ["apple", "river", "stone", "cloud", "engine", "garden", "silver", "market", "window", "forest", "pencil", "doctor", "island", "ladder", "museum", "orange", "planet", "rocket", "summer", "tunnel"]


def test_induction_targets_known_answer():
    tokens = torch.tensor([[5, 7, 8, 5, 7]])
    target = induction_targets(tokens)[0]
    # query 3 (token 5) should attend to key 1 (after the earlier 5); query 4 (token 7) to key 2.
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[3, 1] = expected[4, 2] = True
    assert torch.equal(target, expected)


def test_attention_scores_average_only_queries_with_a_target():
    target = torch.zeros(3, 3, dtype=torch.bool)
    target[2, 0] = True
    pattern = torch.zeros(2, 3, 3)
    pattern[0, 2, 0] = 0.25
    pattern[1, 2, 0] = 1.0
    assert attention_scores(pattern, target).tolist() == [0.25, 1.0]
    assert torch.isnan(attention_scores(pattern, torch.zeros_like(target))).all()  # no query: no score


def test_repeated_tokens_use_the_models_bos(smollm2):
    tokens = repeated_tokens(smollm2, half_len=6, n_sequences=3)
    bos = smollm2.tokenizer.bos_token_id
    assert tokens.shape == (3, 13)
    assert (tokens[:, 0] == bos).all() and not (tokens[:, 1:] == bos).any()
    assert torch.equal(tokens[:, 1:7], tokens[:, 7:])


def test_repeated_tokens_fit_the_models_context(attn2l):
    tokens = repeated_tokens(attn2l)  # 20 + 20 + BOS would not fit n_ctx = 33
    assert tokens.shape[-1] == 1 + 2 * ((attn2l.cfg.n_ctx - 1) // 2) <= attn2l.cfg.n_ctx


def test_scores_agree_with_transformer_lens_head_detector(smollm2):
    """Rank correlation over all 270 SmolLM2 heads with detect_head on the same prompt; sink by hand."""
    text = " ".join(WORDS + WORDS)
    ours = HeadScores()(smollm2, text)
    for kind, name in (("induction", "induction_head"), ("prev_token", "previous_token_head")):
        theirs = detect_head(smollm2, text, name)
        rho = spearmanr(theirs.flatten(), ours.score(kind).flatten()).statistic
        assert rho >= 0.9, (kind, rho)
    layers = range(smollm2.cfg.n_layers)
    _, cache = smollm2.run_with_cache(smollm2.to_tokens(text), names_filter=[names.pattern(la) for la in layers])
    sink = torch.stack([cache[names.pattern(la)][0, :, 1:, 0].mean(-1) for la in layers])
    assert_close(ours.sink, sink.float())


def test_copying_scores_match_the_full_vocab_circuit(attn2l, tmp_path):
    """Eigenvalues of the [vocab, vocab] OV circuit W_E W_V W_O W_U, computed directly."""
    w_e, w_u = attn2l.W_E.float(), attn2l.W_U.float()
    full = w_e @ attn2l.W_V.float() @ attn2l.W_O.float() @ w_u  # [layer, head, vocab, vocab]
    eig = torch.linalg.eigvals(full.double())
    expected = eig.sum(-1).real / eig.abs().sum(-1)
    result = CopyingScores()(attn2l)
    assert isinstance(result, CopyingScoresResult) and result.prompts is None
    ours = result.scores
    assert ours.shape == (attn2l.cfg.n_layers, attn2l.cfg.n_heads)
    # attn2l-induction's pruned heads (weights ~4e-8) have no OV circuit to speak of: theirs is
    # 0 / 0 up to rounding, ours reads 0.
    live = eig.abs().sum(-1) > 1e-6
    assert live.any() and ours[~live].abs().max() < 0.01
    assert_close(ours.double()[live], expected[live], dtype=torch.float32)
    assert result.top(1)["copying"].item() == pytest.approx(ours.max().item())
    result.save(tmp_path / "copying.safetensors")
    loaded = Result.load(tmp_path / "copying.safetensors")
    assert isinstance(loaded, CopyingScoresResult) and torch.equal(loaded.scores, ours) and loaded.prompts is None
    assert result.figure().data[0].z.shape == tuple(ours.shape)
    # In a run of several analyses it reads no prompts, and the same weights give the same scores.
    both = run(attn2l, repeated_tokens(attn2l, 4, 2), [CopyingScores(), HeadScores()])
    assert torch.equal(both["copying_scores"].scores, ours) and both["copying_scores"].prompts is None


def test_copying_score_is_one_for_an_identity_ov_circuit():
    class Toy:
        class cfg:
            architecture = "transformer"

        W_E = torch.eye(4)
        W_U = torch.eye(4)
        W_V = torch.eye(4)[None, None, :, :2]  # one layer, one head: keep the first two directions
        W_O = torch.eye(4)[None, None, :2, :] * torch.tensor([1.0, -1.0, 0, 0])[:2, None]

    assert CopyingScores()(Toy).scores.item() == pytest.approx(0.0)  # eigenvalues +1 and -1
    Toy.W_O = torch.eye(4)[None, None, :2, :]
    assert CopyingScores()(Toy).scores.item() == pytest.approx(1.0)


def test_attn2l_induction_heads(attn2l, induction_task):
    """attn2l-induction composes two layers: a layer-0 previous-token head, read by a layer-1 induction
    head (its recipe prunes the other head of each layer); layer 0 holds no induction head."""
    batch = induction_task.sample(16, torch.Generator().manual_seed(3))
    scores = HeadScores()(attn2l, batch.tokens)
    assert isinstance(scores, HeadScoresResult) and len(scores.prompts) == 16
    induction = scores.heads("induction", 0.5)
    assert len(induction) >= 1 and all(layer == 1 for layer, _ in induction)
    assert scores.induction[0].max() < 0.1
    top = scores.top(1).iloc[0]
    assert top["layer"] == 1 and top["induction"] > 0.7  # measured 0.80
    assert scores.prev_token[0].max() > 0.5  # the previous-token head the induction heads read


def test_head_scores_result_round_trip(attn2l, tmp_path):
    scores = HeadScores()(attn2l, repeated_tokens(attn2l, half_len=8, n_sequences=2))
    frame = scores.to_frame()
    assert list(frame.columns) == ["prompt", "layer", "head", "mixer", "induction", "prev_token", "sink"]
    assert set(frame["mixer"]) == {"attention"}
    assert len(frame) == 2 * attn2l.cfg.n_layers * attn2l.cfg.n_heads
    assert scores.top(3, by="prev_token")["prev_token"].is_monotonic_decreasing
    path = tmp_path / "heads.safetensors"
    scores.save(path)
    loaded = HeadScoresResult.load(path)
    assert torch.equal(loaded.scores, scores.scores) and torch.equal(loaded.queries, scores.queries)
    assert torch.equal(loaded.prompts.tokens, scores.prompts.tokens) and loaded.params == {"channel_groups": None}
    assert scores.figure(kind="sink").data[0].z.shape == (attn2l.cfg.n_layers, attn2l.cfg.n_heads)
    # the figure sends its values as float32
    torch.testing.assert_close(torch.tensor(scores.figure(prompt=1).data[0].z), scores.score("induction", 1).float())
    with pytest.raises(ValueError, match="kind must be one of"):
        scores.figure(kind="copying")


def test_pooled_scores_weigh_prompts_by_their_queries(attn2l):
    """A prompt without a repeated token has no induction score (nan) and no weight; the others pool their queries."""
    repeats = repeated_tokens(attn2l, half_len=6, n_sequences=2)
    plain = torch.arange(1, 14)[None]  # 13 distinct tokens: nothing to copy
    scores = HeadScores()(attn2l, torch.cat([repeats, plain]))
    assert torch.isnan(scores.score("induction", 2)).all() and scores.queries[0].tolist() == [6, 6, 0]
    torch.testing.assert_close(scores.induction, scores.scores[0, :2].mean(0))
    torch.testing.assert_close(scores.sink, scores.scores[2].mean(0))  # every prompt has 12 queries


def test_mamba_scores_are_channel_scores_averaged_over_groups(tiny_mamba_model):
    tokens = repeated_tokens(tiny_mamba_model, half_len=5, n_sequences=2)
    scores = HeadScores(channel_groups=4)(tiny_mamba_model, tokens)
    assert scores.architecture == "mamba" and scores.induction.shape == (1, 4)
    # By hand, per channel: |M| with rows normalised,
    # attention on the induction target, then group means.
    induction, sink = [], []
    for seq in tokens:
        m = _ssm_matrices(tiny_mamba_model, seq, 0).abs()
        m = m / m.sum(-1, keepdim=True)
        induction.append(torch.stack([m[:, 6 + j, 2 + j] for j in range(5)], -1).mean(-1))
        sink.append(m[:, 1:, 0].mean(-1))
    group_mean = lambda per_channel: torch.stack(per_channel).mean(0).view(4, 4).mean(-1).float()
    torch.testing.assert_close(scores.induction[0], group_mean(induction))
    torch.testing.assert_close(scores.sink[0], group_mean(sink))
    with pytest.raises(ValueError, match="channel_groups must divide d_inner = 16"):
        HeadScores(channel_groups=3)(tiny_mamba_model, tokens)


def _ssm_matrices(model, seq, layer):
    """Every channel's ``M`` from the cached Δ, B, C with the kernel (tested against loops in tests/kernels)."""
    hooks = [names.mixer(layer, part) for part in ("delta", "B", "C")]
    _, cache = model.run_with_cache(seq[None], names_filter=hooks)
    delta, B, C = (cache[name].transpose(1, 2) for name in hooks)
    return mixer_matrix(delta, model.blocks[layer].mixer.A, B, C)[0].double()


def test_head_scores_reject_rnns_and_bad_arguments(tiny_rnn_model, attn2l, tiny_mamba_model):
    tokens = torch.randint(0, 16, (1, 6))
    with pytest.raises(AnalysisError, match="HeadScores needs attention patterns .* this model is a rnn"):
        HeadScores()(tiny_rnn_model, tokens)
    with pytest.raises(AnalysisError, match="HeadScores needs"):
        run(tiny_rnn_model, tokens, [HeadScores()])
    with pytest.raises(ValueError, match="channel_groups is for Mamba"):
        HeadScores(channel_groups=2)(attn2l, repeated_tokens(attn2l, 8))
    with pytest.raises(AnalysisError, match="CopyingScores needs attention heads .* this model is a mamba"):
        CopyingScores()(tiny_mamba_model)


@pytest.fixture(params=["tiny_llama", "tiny_mamba_model", "tiny_mamba2", "tiny_hybrid"])
def model(request):
    return request.getfixturevalue(request.param)


def test_batched_scores_equal_per_prompt_scores_and_the_cache_path(model):
    """Each prompt's grids in a ragged batch equal its own run; compute() on a cache you hold equals the call."""
    gen = torch.Generator().manual_seed(0)
    halves = [torch.randperm(model.cfg.d_vocab - 1, generator=gen)[:n] + 1 for n in (2, 5, 3, 4)]  # distinct
    rows = [half.repeat(2).tolist() for half in halves]  # lengths 4, 10, 6, 8: each half repeated
    analysis = HeadScores(channel_groups=2 if model.cfg.architecture == "mamba" else None)
    together = analysis(model, rows)
    assert together.prompts.lengths.tolist() == [4, 10, 6, 8] and together.prompts.is_padded
    for i, row in enumerate(rows):
        alone = analysis(model, [row])
        assert_close(together.scores[:, i], alone.scores[:, 0], equal_nan=True)
        n = len(row)
        assert together.queries[:, i].tolist() == alone.queries[:, 0].tolist() == [n // 2, n - 1, n - 1]
    prompts = Prompts(model, rows)
    _, cache = model.run_with_cache(prompts, names_filter=analysis.hooks(model))
    from_cache = analysis.compute(cache, prompts)
    assert_close(from_cache.scores, together.scores, equal_nan=True)
    assert math.isfinite(together.induction.nansum().item())
    assert int(together.induction.isnan().sum()) == together.induction.numel() - sum(map(len, together.mixers))
    frame = together.to_frame()
    assert frame.groupby("prompt").size().tolist() == [sum(map(len, together.mixers))] * 4


def test_pad_positions_of_the_cache_are_never_read(model):
    """Garbage at every pad position of a ragged cache (pad queries and pad keys) leaves the result unchanged."""
    gen = torch.Generator().manual_seed(1)
    rows = [(torch.randperm(model.cfg.d_vocab - 1, generator=gen)[:n] + 1).repeat(2).tolist() for n in (2, 5, 3)]
    analysis = HeadScores(channel_groups=2 if model.cfg.architecture == "mamba" else None)
    prompts = Prompts(model, rows)
    _, cache = model.run_with_cache(prompts, names_filter=analysis.hooks(model))
    clean = analysis.compute(cache, prompts)
    pad = ~prompts.mask
    for name in analysis.hooks(model):
        value = cache.cache_dict[name].clone()
        if value.ndim == 4 and value.shape[-1] == value.shape[-2] == pad.shape[1]:  # a pattern [batch, head, q, k]
            value.masked_fill_(pad[:, None, :, None] | pad[:, None, None, :], 7.0)
        else:  # [batch, pos, ...]
            value[pad] = 1e4
        cache.cache_dict[name] = value
    assert_close(analysis.compute(cache, prompts).scores, clean.scores, equal_nan=True)


# ----------------------------------------------------------------- Mamba-2 heads and hybrids
def _constructed_ssd_cache(model, prompts, layer):
    """The cache of ``prompts`` with ``layer``'s ``dt``, ``B``, ``C`` replaced by a constructed SSD layer.

    ``B``/``C`` are one-hot in ``d_state``. Group 0 reads positions (``C_t = e_{t-1}``, ``B_s = e_s``):
    its heads' ``M`` is zero except ``M[t, t - 1]``, previous-token heads. Group 1 reads tokens
    (``C_t = e_{x_t}``, ``B_s = e_{x_{s-1}}``): ``M[t, s] != 0`` only where ``x_{s-1} = x_t``, induction heads.
    """
    _, cache = model.run_with_cache(prompts, names_filter=HeadScores().hooks(model))
    b, width = prompts.tokens.shape
    B, C = torch.zeros(b, width, 2, model.cfg.d_state), torch.zeros(b, width, 2, model.cfg.d_state)
    for i in range(b):
        offset, tokens = int(prompts.offsets[i]), prompts.real(prompts.tokens, i).tolist()
        for t, token in enumerate(tokens):
            B[i, offset + t, 0, t] = 1.0
            C[i, offset + t, 1, token] = 1.0
            if t > 0:
                C[i, offset + t, 0, t - 1] = 1.0
                B[i, offset + t, 1, tokens[t - 1]] = 1.0
    dt = torch.full((b, width, model.cfg.n_heads), 0.05) * prompts.mask[..., None]
    for part, value in (("dt", dt), ("B", B), ("C", C)):
        cache.cache_dict[names.mixer(layer, part)] = value
    return cache


def test_constructed_ssd_layer_has_known_previous_token_and_induction_heads():
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=16, n_layers=2, d_vocab=16, n_heads=4, d_head=8, d_state=16, n_groups=2)
    model = HookedMamba2(cfg).eval()
    rows = [row[: 1 + 2 * n].tolist() for row, n in zip(repeated_tokens(model, half_len=5, n_sequences=3), (5, 3, 4))]
    prompts = Prompts(model, rows)  # ragged: BOS + two repeats of 5, 3, 4 distinct tokens
    scores = HeadScores().compute(_constructed_ssd_cache(model, prompts, 0), prompts)
    assert scores.mixers == [["mamba2"] * 4] * 2
    assert_close(scores.prev_token[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert_close(scores.induction[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # sink: only query 1 reads position 0 in a previous-token head; an induction head never does
    expected_sink = torch.tensor([1 / (len(r) - 1) for r in rows])
    torch.testing.assert_close(scores.scores[2, :, 0, 0], expected_sink)
    assert scores.heads("induction", 0.9) == [(0, 2), (0, 3)] and scores.heads("prev_token", 0.9) == [(0, 0), (0, 1)]


def _scores_by_hand(pattern, tokens):
    """Induction, previous-token and sink of ``[head, q, k]`` patterns of one prompt, query by query."""
    n = len(tokens)
    induction = [[pattern[h, q, k] for k in range(1, q + 1) if tokens[k - 1] == tokens[q]] for h in range(len(pattern))
                 for q in range(n)]  # fmt: skip
    per_head = lambda rows: torch.stack([torch.stack([sum(r) for r in rows[h * n:(h + 1) * n] if r]).mean()
                                         for h in range(len(pattern))])  # fmt: skip
    previous = torch.stack([pattern[:, q, q - 1] for q in range(1, n)], -1).mean(-1)
    sink = pattern[:, 1:, 0].mean(-1)
    return per_head(induction), previous, sink


def test_hybrid_scores_attention_from_hf_patterns_and_ssd_layers_from_their_matrices(tiny_hybrid, tiny_hybrid_hf):
    tokens = repeated_tokens(tiny_hybrid, half_len=4, n_sequences=2)
    scores = HeadScores()(tiny_hybrid, tokens)
    assert scores.architecture == "hybrid" and scores.mixers == [["mamba2"] * 8, ["attention"] * 4, ["mamba2"] * 8]
    with torch.no_grad():
        (attention,) = tiny_hybrid_hf(tokens, output_attentions=True).attentions  # layer 1, [batch, head, q, k]
    hooks = [names.mixer(layer, part) for layer in (0, 2) for part in ("dt", "B", "C")]
    _, cache = tiny_hybrid.run_with_cache(tokens, names_filter=hooks)
    for b, seq in enumerate(tokens.tolist()):
        for layer in range(3):
            if layer == 1:
                pattern = attention[b].double()
            else:
                dt, B, C = (cache[names.mixer(layer, part)][b : b + 1] for part in ("dt", "B", "C"))
                m = ssd_mixer_matrix(dt, tiny_hybrid.blocks[layer].mixer.A, B, C)[0].abs().double()
                pattern = m / m.sum(-1, keepdim=True)
            for kind, expected in zip(("induction", "prev_token", "sink"), _scores_by_hand(pattern, seq)):
                n_heads = len(scores.mixers[layer])
                got = scores.score(kind, b)[layer, :n_heads]
                assert_close(got, expected.float())
    frame = scores.to_frame()
    assert frame.groupby("mixer").size().to_dict() == {"attention": 2 * 4, "mamba2": 2 * 16}
    with pytest.raises(ValueError, match="channel_groups is for Mamba layers; this hybrid has none"):
        HeadScores(channel_groups=2)(tiny_hybrid, tokens)


def test_hybrid_grid_marks_missing_heads_and_round_trips(tiny_hybrid, tmp_path):
    """The attention layer has 4 heads beside 8 SSD heads: nan in its other columns, pooled too, no rows for them."""
    scores = HeadScores()(tiny_hybrid, repeated_tokens(tiny_hybrid, half_len=3, n_sequences=2))
    assert scores.scores.shape == (3, 2, 3, 8)
    assert torch.isnan(scores.scores[:, :, 1, 4:]).all() and not torch.isnan(scores.scores[:, :, :, :4]).any()
    assert torch.isnan(scores.induction[1, 4:]).all() and not torch.isnan(scores.induction[1, :4]).any()
    frame = scores.to_frame()
    assert len(frame) == 2 * (8 + 4 + 8) and not frame[["induction", "prev_token", "sink"]].isna().any().any()
    assert scores.top(40)["head"].max() == 7 and len(scores.top(40)) == 20
    z = np.array(scores.figure(kind="sink").data[0].z, dtype=float)
    assert np.isnan(z[1, 4:]).all() and np.isfinite(z[[0, 2]]).all()
    scores.save(tmp_path / "heads.safetensors")
    loaded = HeadScoresResult.load(tmp_path / "heads.safetensors")
    assert loaded.mixers == scores.mixers and loaded.to_frame().equals(frame)
