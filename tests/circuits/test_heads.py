"""Head scores against TransformerLens' head detector, the full OV circuit and known answers."""

from __future__ import annotations

import pytest
import torch
from dynalens.circuits import HeadScores, copying_scores, induction_scores
from dynalens.circuits.heads import attention_scores, induction_targets, repeated_tokens
from dynalens.probes import mixer_matrices, sink_scores
from scipy.stats import spearmanr
from transformer_lens.head_detector import detect_head

WORDS = ["apple", "river", "stone", "cloud", "engine", "garden", "silver", "market", "window", "forest", "pencil", "doctor", "island", "ladder", "museum", "orange", "planet", "rocket", "summer", "tunnel"]


def test_induction_targets_known_answer():
    tokens = torch.tensor([[5, 7, 8, 5, 7]])
    target = induction_targets(tokens)[0]
    # query 3 (token 5) should attend to key 1 (after the earlier 5); query 4 (token 7) to key 2.
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[3, 1] = expected[4, 2] = True
    assert torch.equal(target, expected)


def test_attention_scores_average_only_queries_with_a_target():
    target = torch.zeros(1, 3, 3, dtype=torch.bool)
    target[0, 2, 0] = True
    pattern = torch.zeros(1, 2, 3, 3)
    pattern[0, 0, 2, 0] = 0.25
    pattern[0, 1, 2, 0] = 1.0
    assert attention_scores(pattern, target).tolist() == [0.25, 1.0]
    with pytest.raises(ValueError, match="no query has a target"):
        attention_scores(pattern, torch.zeros_like(target))


def test_repeated_tokens_use_the_models_bos(smollm2):
    tokens = repeated_tokens(smollm2, half_len=6, n_sequences=3)
    bos = smollm2.tokenizer.bos_token_id
    assert tokens.shape == (3, 13)
    assert (tokens[:, 0] == bos).all() and not (tokens[:, 1:] == bos).any()
    assert torch.equal(tokens[:, 1:7], tokens[:, 7:])


def test_scores_agree_with_transformer_lens_head_detector(smollm2):
    """Rank correlation over all 270 SmolLM2 heads with detect_head on the same prompt."""
    text = " ".join(WORDS + WORDS)
    ours = induction_scores(smollm2, text)
    for kind, name in (("induction", "induction_head"), ("prev_token", "previous_token_head")):
        theirs = detect_head(smollm2, text, name)
        rho = spearmanr(theirs.flatten(), ours.score(kind).flatten()).statistic
        assert rho >= 0.9, (kind, rho)
    assert torch.allclose(ours.sink, sink_scores(smollm2, text), atol=1e-6)


def test_copying_scores_match_the_full_vocab_circuit(attn2l):
    """Eigenvalues of the [vocab, vocab] OV circuit W_E W_V W_O W_U, computed directly."""
    w_e, w_u = attn2l.W_E.float(), attn2l.W_U.float()
    full = w_e @ attn2l.W_V.float() @ attn2l.W_O.float() @ w_u  # [layer, head, vocab, vocab]
    eig = torch.linalg.eigvals(full.double())
    expected = eig.sum(-1).real / eig.abs().sum(-1)
    ours = copying_scores(attn2l)
    assert ours.shape == (attn2l.cfg.n_layers, attn2l.cfg.n_heads)
    # attn2l-induction's pruned heads (weights ~4e-8) have no OV circuit to speak of: theirs is
    # 0 / 0 up to rounding, ours reads 0.
    live = eig.abs().sum(-1) > 1e-6
    assert live.any() and ours[~live].abs().max() < 0.01
    torch.testing.assert_close(ours.double()[live], expected[live], atol=1e-4, rtol=1e-4)


def test_copying_score_is_one_for_an_identity_ov_circuit():
    class Toy:
        class cfg:
            architecture = "transformer"

        W_E = torch.eye(4)
        W_U = torch.eye(4)
        W_V = torch.eye(4)[None, None, :, :2]  # one layer, one head: keep the first two directions
        W_O = torch.eye(4)[None, None, :2, :] * torch.tensor([1.0, -1.0, 0, 0])[:2, None]

    scores = copying_scores(Toy)
    assert scores.item() == pytest.approx(0.0)  # eigenvalues +1 and -1
    Toy.W_O = torch.eye(4)[None, None, :2, :]
    assert copying_scores(Toy).item() == pytest.approx(1.0)


def test_attn2l_induction_heads(attn2l, induction_task):
    """attn2l-induction composes two layers: a layer-0 previous-token head, read by a layer-1 induction
    head (its recipe prunes the other head of each layer); layer 0 holds no induction head."""
    batch = induction_task.sample(16, torch.Generator().manual_seed(3))
    scores = induction_scores(attn2l, batch.tokens)
    assert isinstance(scores, HeadScores) and scores.n_sequences == 16
    induction = scores.heads("induction", 0.5)
    assert len(induction) >= 1 and all(layer == 1 for layer, _ in induction)
    assert scores.induction[0].max() < 0.1
    top = scores.top(1).iloc[0]
    assert top["layer"] == 1 and top["induction"] > 0.7  # measured 0.80
    assert scores.prev_token[0].max() > 0.5  # the previous-token head the induction heads read


def test_head_scores_result_round_trip(attn2l, tmp_path):
    scores = induction_scores(attn2l, half_len=8, n_sequences=2)
    frame = scores.to_frame()
    assert list(frame.columns) == ["layer", "head", "induction", "prev_token", "copying", "sink"]
    assert len(frame) == attn2l.cfg.n_layers * attn2l.cfg.n_heads
    assert scores.top(3, by="prev_token")["prev_token"].is_monotonic_decreasing
    path = tmp_path / "heads.safetensors"
    scores.save(path)
    loaded = HeadScores.load(path)
    assert torch.equal(loaded.induction, scores.induction) and loaded.n_sequences == 2
    assert scores.figure(kind="copying").data[0].z.shape == (attn2l.cfg.n_layers, attn2l.cfg.n_heads)
    with pytest.raises(ValueError, match="kind must be one of"):
        scores.figure(kind="retrieval")


def test_mamba_scores_are_channel_scores_averaged_over_groups(tiny_mamba_model):
    tokens = repeated_tokens(tiny_mamba_model, half_len=5, n_sequences=2)
    scores = induction_scores(tiny_mamba_model, tokens, channel_groups=4)
    assert scores.architecture == "mamba" and scores.induction.shape == (1, 4)
    assert torch.isnan(scores.copying).all()
    # By hand, per channel: |M| with rows normalised, attention on the induction target, then group means.
    induction, sink = [], []
    for seq in tokens:
        m = mixer_matrices(tiny_mamba_model, seq[None], 0, channels=range(16)).matrices.abs()
        m = m / m.sum(-1, keepdim=True)
        induction.append(torch.stack([m[:, 6 + j, 2 + j] for j in range(5)], -1).mean(-1))
        sink.append(m[:, 1:, 0].mean(-1))
    group_mean = lambda per_channel: torch.stack(per_channel).mean(0).view(4, 4).mean(-1)
    torch.testing.assert_close(scores.induction[0], group_mean(induction))
    torch.testing.assert_close(scores.sink[0], group_mean(sink))
    with pytest.raises(ValueError, match="channel_groups must divide d_inner = 16"):
        induction_scores(tiny_mamba_model, tokens, channel_groups=3)


def test_head_scores_reject_rnns_and_bad_arguments(tiny_rnn_model, attn2l):
    with pytest.raises(TypeError, match="this model is a rnn"):
        induction_scores(tiny_rnn_model)
    with pytest.raises(ValueError, match="channel_groups is for Mamba"):
        induction_scores(attn2l, half_len=8, channel_groups=2)


def test_default_workload_fits_the_models_context(attn2l):
    scores = induction_scores(attn2l)  # 20 + 20 + BOS would not fit n_ctx = 33
    assert scores.tokens.shape[-1] == 1 + 2 * ((attn2l.cfg.n_ctx - 1) // 2) <= attn2l.cfg.n_ctx
