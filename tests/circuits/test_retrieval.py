"""Retrieval scores: the copy-paste rule and ROUGE-1 on known answers, the paper's loop on HF SmolLM2,
decoding-only masking against query zeroing in HF, the Mamba variant against a loop; SmolLM2 figures (slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import dynalens as dl
from dynalens.circuits import (
    NEEDLES,
    HeadAblation,
    HeadScores,
    Haystack,
    MixerRetrievalScores,
    MixerRetrievalScoresResult,
    NeedleScorer,
    RetrievalScores,
    RetrievalScoresResult,
    copy_paste_scores,
    head_hooks,
    make_haystack,
    make_haystacks,
    rouge1_recall,
)
from dynalens.circuits.retrieval import MAX_NEW_TOKENS, QUESTION
from dynalens.models import names
from dynalens.models import smollm2 as smollm2_builtin
from dynalens.models.prompts import Prompts
from dynalens.models.zoo import get_entry
from dynalens.probes.analysis import AnalysisError
from dynalens.probes.results import Result


def mixer_retrieval_scores(model, tokens, score_mask, source_mask=None, **options):
    return MixerRetrievalScores(score_mask, source_mask, **options)(model, tokens).scores


def test_copy_paste_rule_known_answer():
    # positions 2..4 hold the needle's answer (7, 8, 9); the model generates 7, 7, 9, 5.
    haystack = Haystack(torch.tensor([0, 5, 7, 8, 9, 6, 7, 8, 9]), (2, 5), "x")
    generated = torch.tensor([7, 7, 9, 5])
    top_keys = torch.tensor([[
        [2, 3, 4, 1],  # head 0: on the generated token at steps 0 and 2 -> 2/3
        [2, 2, 4, 2],  # head 1: step 1 generates 7 (not the needle's next token) and looks at a 7 -> 3/3
        [3, 3, 3, 3],  # head 2: on needle token 8, never generated -> 0
        [6, 7, 8, 1],  # head 3: on copies of the needle outside its span -> 0
    ]])  # fmt: skip
    scores = copy_paste_scores(top_keys, generated, haystack)
    torch.testing.assert_close(scores, torch.tensor([[2 / 3, 1.0, 0.0, 0.0]]))


def test_rouge1_recall_known_answers():
    assert rouge1_recall("eat a sandwich and sit", "I'd EAT a sandwich!") == pytest.approx(3 / 5)
    assert rouge1_recall("the cat and the hat", "the hat") == pytest.approx(2 / 5)  # counts with multiplicity
    assert rouge1_recall("Dolores Park, on a sunny day.", "dolores park on a sunny day") == 1.0
    assert rouge1_recall("...", "anything") == 0.0


def test_haystack_holds_the_needle_and_ends_with_the_question(smollm2):
    tokenizer = smollm2.tokenizer
    for depth in (0.0, 0.5, 1.0):
        hay = make_haystack(smollm2, NEEDLES[1], 80, depth, part=1)
        start, stop = hay.needle_span
        assert tokenizer.decode(hay.tokens[start:stop]) == NEEDLES[1].answer
        assert hay.tokens[0] == tokenizer.bos_token_id and hay.answer == NEEDLES[1].answer
        text = tokenizer.decode(hay.tokens[1:])
        assert NEEDLES[1].lead + NEEDLES[1].answer in text
        assert text.endswith(QUESTION.format(question=NEEDLES[1].question))
        assert hay.tokens.shape[0] - stop + start == 1 + 80 + len(tokenizer.encode(" " + NEEDLES[1].lead, add_special_tokens=False)) + len(
            tokenizer.encode(QUESTION.format(question=NEEDLES[1].question), add_special_tokens=False)
        )
    first = make_haystack(smollm2, NEEDLES[0], 80, 0.0)
    assert first.needle_span[0] == 1 + len(tokenizer.encode(" " + NEEDLES[0].lead, add_special_tokens=False))  # depth 0: right after BOS
    with pytest.raises(ValueError, match="depth must lie in"):
        make_haystack(smollm2, NEEDLES[0], 60, 1.5)
    with pytest.raises(ValueError, match="exceeds the"):
        make_haystack(smollm2, NEEDLES[0], 10**6, 0.5)


def test_haystacks_need_a_tokenizer(tiny_mamba_model):
    with pytest.raises(ValueError, match="no tokenizer"):
        make_haystack(tiny_mamba_model, NEEDLES[0], 60, 0.5)


def test_haystacks_cover_needles_lengths_and_depths(smollm2):
    hays = make_haystacks(smollm2, 12, context_tokens=[150, 300], needles=NEEDLES[:2])
    prompts = [h.tokens.shape[0] for h in hays]
    assert [h.answer for h in hays[:4]] == [NEEDLES[0].answer, NEEDLES[1].answer] * 2  # needles cycle first
    assert prompts[0] < prompts[2] and prompts[1] < prompts[3]  # then lengths
    assert hays[2].needle_span[0] < hays[6].needle_span[0] < hays[10].needle_span[0]  # then depths 0, 0.5, 1
    with pytest.raises(ValueError, match="context_tokens"):
        make_haystacks(smollm2, 2, context_tokens=[])


def _papers_loop(hf_model, tokenizer, haystack: Haystack) -> tuple[list[int], torch.Tensor]:
    """``retrieval_head_detection.py`` on the HuggingFace model: prefill all but the last prompt token,
    then greedy steps with the KV cache, scoring each head's top-1 attention with ``retrieval_calculate``."""
    config = hf_model.config
    scores = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    start, stop = haystack.needle_span
    prompt = haystack.tokens
    out = hf_model(prompt[None, :-1], use_cache=True)
    past, inp, generated = out.past_key_values, prompt[-1], []
    for _ in range(MAX_NEW_TOKENS):
        out = hf_model(inp.view(1, 1), past_key_values=past, use_cache=True, output_attentions=True)
        past, inp = out.past_key_values, out.logits[0, -1].argmax()
        generated.append(inp.item())
        for layer, attention in enumerate(out.attentions):
            for head in range(config.num_attention_heads):
                i = attention[0, head, -1].argmax().item()
                if start <= i < stop and inp.item() == prompt[i].item():
                    scores[layer, head] += 1 / (stop - start)
        text = tokenizer.decode(generated)
        if inp.item() == tokenizer.eos_token_id or ("\n" in tokenizer.decode([inp.item()]) and text.strip()):
            break  # the code stops at a newline; this adaptation once the answer has begun
    return generated, scores


@torch.no_grad()
def test_retrieval_scores_match_the_papers_loop_on_huggingface(smollm2, tmp_path):
    hf_model = AutoModelForCausalLM.from_pretrained(
        smollm2_builtin.cached_folder(), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    hays = make_haystacks(smollm2, 1, context_tokens=80)  # the San Francisco needle at depth 0.5
    ret = RetrievalScores(hays)(smollm2)
    assert isinstance(ret, RetrievalScoresResult) and ret.params["haystacks"] == 1
    assert torch.equal(ret.prompts.tokens[0], hays[0].tokens) and ret.prompt_tokens == [len(hays[0].tokens)]
    for i, hay in enumerate(hays):
        generated, expected = _papers_loop(hf_model, smollm2.tokenizer, hay)
        assert ret.responses[i] == smollm2.tokenizer.decode(generated, skip_special_tokens=True).strip()
        torch.testing.assert_close(ret.haystack_scores[i], expected)
    assert ret.recall.item() > 0.9  # SmolLM2 answers from the needle
    torch.testing.assert_close(ret.scores, ret.haystack_scores[0])
    assert 0 < ret.fraction < 0.25 and ret.heads()[0] == tuple(ret.top(1)[["layer", "head"]].iloc[0])
    ret.save(tmp_path / "ret.safetensors")
    loaded = Result.load(tmp_path / "ret.safetensors")
    assert isinstance(loaded, RetrievalScoresResult)
    assert torch.equal(loaded.scores, ret.scores) and loaded.responses == ret.responses
    assert all(
        torch.equal(a.tokens, b.tokens) and a.needle_span == b.needle_span and a.answer == b.answer
        for a, b in zip(loaded.haystacks(), hays, strict=True)
    )
    assert ret.figure().data[0].z.shape == (30, 9)


def test_haystacks_the_model_does_not_retrieve_are_left_out(smollm2):
    good = make_haystacks(smollm2, 1, context_tokens=80)[0]
    tokens, (start, stop) = good.tokens.clone(), good.needle_span
    tokens[start:stop] = torch.tensor(smollm2.tokenizer.encode(" the", add_special_tokens=False) * (stop - start))
    lost = Haystack(tokens, good.needle_span, good.answer)  # the needle is gone: nothing to copy
    ret = RetrievalScores([good, lost])(smollm2)
    assert ret.recall[0] > 0.5 >= ret.recall[1] and ret.retrieved == 1
    torch.testing.assert_close(ret.scores, ret.haystack_scores[0])
    assert ret.prompts.is_padded is False and len(ret.to_frame()) == 2 * 270  # both as long: one batch
    frame = ret.to_frame()
    assert frame.loc[frame["prompt"] == 1, "retrieved"].eq(False).all()
    alone = RetrievalScores([lost])(smollm2)  # a haystack's scores do not depend on the others decoded
    torch.testing.assert_close(alone.haystack_scores[0], ret.haystack_scores[1])
    with pytest.raises(ValueError, match="min_recall"):
        RetrievalScores([good], min_recall=1.0)(smollm2)


def test_haystacks_of_different_lengths_are_ragged_prompts(tiny_llama, tmp_path):
    """The result's prompts are the haystacks, left-padded; each haystack's scores equal its run alone."""
    hays = make_haystacks(tiny_llama, 2, context_tokens=[4, 12])  # two needles: 52 and 51 tokens
    ret = RetrievalScores(hays)(tiny_llama)
    assert ret.prompt_tokens == [len(h.tokens) for h in hays] and ret.prompts.is_padded
    assert ret.haystack_scores.shape == (2, 2, 4) and len(ret.responses) == 2
    for i, hay in enumerate(hays):
        alone = RetrievalScores([hay])(tiny_llama)
        torch.testing.assert_close(ret.haystack_scores[i], alone.haystack_scores[0])
        assert ret.responses[i] == alone.responses[0]
    ret.save(tmp_path / "ret.safetensors")
    loaded = Result.load(tmp_path / "ret.safetensors")
    for a, b in zip(loaded.haystacks(), hays, strict=True):
        assert torch.equal(a.tokens, b.tokens) and a.needle_span == b.needle_span and a.answer == b.answer
    assert loaded.to_frame().equals(ret.to_frame())


def test_retrieval_scores_need_attention_heads(tiny_mamba_model, tiny_rnn_model):
    for model, arch in ((tiny_mamba_model, "mamba"), (tiny_rnn_model, "rnn")):
        with pytest.raises(AnalysisError, match=f"RetrievalScores needs attention heads.*this model is a {arch}"):
            RetrievalScores(1)(model)


@torch.no_grad()
def test_decoding_only_masking_equals_zeroed_queries_in_huggingface(tiny_llama, tiny_llama_dir):
    """The paper masks a head by zeroing its query at decoding steps (the prefill stops one token early)."""
    heads = [(1, 0), (1, 3), (0, 2)]
    prompt = torch.randint(5, 1000, (12,), generator=torch.Generator().manual_seed(0))

    def our_logits(fwd_hooks):
        steps = []  # each forward's last-row logits: the prompt pass, then one per new token
        keep = ("unembed.hook_out", lambda logits, hook: steps.append(logits[0, -1].clone()))
        out = tiny_llama.generate(prompt[None], 6, fwd_hooks=[*fwd_hooks, keep], return_type="tokens")
        return out[0, 12:], torch.stack(steps)

    ours, masked = our_logits(head_hooks(tiny_llama, heads, "mask", last_queries=1))
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    d_head, decoding = hf.config.head_dim, [False]

    def zero_queries(heads_of_layer):
        def hook(module, args, output):
            if decoding[0]:
                output = output.clone()
                for h in heads_of_layer:
                    output[..., h * d_head : (h + 1) * d_head] = 0.0
            return output

        return hook

    handles = [
        hf.model.layers[layer].self_attn.q_proj.register_forward_hook(zero_queries([h for lh, h in heads if lh == layer]))
        for layer in {lh for lh, _ in heads}
    ]
    try:
        past, expected = hf(prompt[None, :-1], use_cache=True).past_key_values, []
        decoding[0] = True
        for token in [prompt[-1], *ours[:-1]]:  # the same tokens, so the logits of every step compare
            out = hf(token.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            expected.append(out.logits[0, -1])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(masked, torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert ours.tolist() == torch.stack(expected).argmax(-1).tolist()
    assert (masked - our_logits(())[1]).abs().max() > 1e-3  # masking changed the decoding steps


def test_masking_every_head_breaks_the_needle(smollm2):
    """Sanity of the scorer: masking all heads of the copying layers destroys the answer."""
    scorer = NeedleScorer(smollm2, n_haystacks=1, context_tokens=80)
    heads = [(layer, head) for layer in range(14, 26) for head in range(9)]
    effect = HeadAblation(heads, scorer, method="mask", last_queries=scorer.answer_queries, trials=1)(smollm2)
    assert effect.scores[0, 0] > 0.8 and effect.scores[0, 1] < 0.5


def _ssm_matrices_by_loop(model, seq, layer):
    """``M[c, t, s] = C_t · exp(sum_{r=s+1..t} Δ_r[c] A[c]) Δ_s[c] B_s``, entry by entry from the cached Δ, B, C."""
    hooks = [names.mixer(layer, x) for x in ("delta", "B", "C")]
    _, cache = model.run_with_cache(seq[None], names_filter=hooks)
    delta, B, C = (cache[name][0].double() for name in hooks)
    A = model.blocks[layer].mixer.A.double()
    pos, d_inner = delta.shape
    M = torch.zeros(d_inner, pos, pos, dtype=torch.float64)
    for t in range(pos):
        for s in range(t + 1):
            decay = torch.exp(delta[s + 1 : t + 1].sum(0)[:, None] * A)
            M[:, t, s] = (C[t] * decay * delta[s][:, None] * B[s]).sum(-1)
    return M


def _mixer_retrieval_by_loop(model, tokens, score_mask, source_mask, groups):
    predictions = model(tokens).argmax(-1)
    scores = torch.zeros(model.cfg.n_layers, model.cfg.d_inner)
    for layer in range(model.cfg.n_layers):
        for b, seq in enumerate(tokens):
            M = _ssm_matrices_by_loop(model, seq, layer).abs()
            queries = [q for q in range(len(seq) - 1) if score_mask[b, q]]
            for q in queries:
                if predictions[b, q] != seq[q + 1]:
                    continue
                for c in range(model.cfg.d_inner):
                    k = M[c, q].argmax().item()
                    if source_mask[b, k] and seq[k] == seq[q + 1]:
                        scores[layer, c] += 1 / len(queries) / len(tokens)
    return scores.view(model.cfg.n_layers, groups, -1).mean(-1)


@torch.no_grad()
def test_mixer_retrieval_scores_match_a_loop_on_a_tiny_mamba(tiny_mamba_model):
    prompt = torch.randint(3, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens = tiny_mamba_model.generate(prompt, max_new_tokens=10)  # greedy
    score_mask = torch.zeros_like(tokens, dtype=torch.bool)
    score_mask[:, 5:-1] = True  # the greedy steps: the model's top-1 token is always the next one
    source_mask = torch.zeros_like(score_mask)
    source_mask[:, :6] = True  # copied from the prompt only
    scores = mixer_retrieval_scores(tiny_mamba_model, tokens, score_mask, source_mask, channel_groups=4)
    expected = _mixer_retrieval_by_loop(tiny_mamba_model, tokens, score_mask, source_mask, 4)
    torch.testing.assert_close(scores, expected)
    assert scores.max() > 0  # some channel copies a prompt token back


@torch.no_grad()
def test_mamba_scores_on_the_zoo_associative_recall_model(tiny_llama):
    model, task = dl.load("mamba-ar"), get_entry("mamba-ar").make_task()
    # Induction scores: per channel from the loop's |M| (rows normalised), then channel-group means.
    tokens = dl.circuits.repeated_tokens(model, half_len=5, n_sequences=2)
    induction = HeadScores()(model, tokens).induction
    for layer in range(model.cfg.n_layers):
        per_channel = []
        for seq in tokens:
            M = _ssm_matrices_by_loop(model, seq, layer).abs()
            M = M / M.sum(-1, keepdim=True)
            per_channel.append(torch.stack([M[:, 6 + j, 2 + j] for j in range(5)], -1).mean(-1))
        expected = torch.stack(per_channel).mean(0).view(8, -1).mean(-1).float()
        torch.testing.assert_close(induction[layer], expected, rtol=1e-4, atol=1e-6)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    context = torch.zeros_like(batch.score_mask)
    context[:, : 2 * task.n_pairs] = True  # the key-value pairs the answers are read from
    scores = mixer_retrieval_scores(model, batch.tokens, batch.score_mask, context)
    assert scores.shape == (model.cfg.n_layers, 8) and ((scores >= 0) & (scores <= 1)).all()
    expected = _mixer_retrieval_by_loop(model, batch.tokens, batch.score_mask, context, 8)
    torch.testing.assert_close(scores, expected)
    with pytest.raises(AnalysisError, match="MixerRetrievalScores needs SSM mixer matrices.*this model is a transformer"):
        mixer_retrieval_scores(tiny_llama, batch.tokens, batch.score_mask)
    with pytest.raises(ValueError, match="tokens' shape"):
        mixer_retrieval_scores(model, batch.tokens, batch.score_mask[:, :-1])


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["tiny_mamba_model", "tiny_mamba2", "tiny_hybrid"])
def test_mixer_retrieval_batch_equals_per_prompt_and_round_trips(fixture, tiny_rnn_model, tmp_path, request):
    """Each prompt's scores in a ragged batch equal its own run (its rows of the masks); the cache path and
    save/load give the same result."""
    model = request.getfixturevalue(fixture)
    groups = {"channel_groups": 4} if model.cfg.architecture == "mamba" else {}
    gen = torch.Generator().manual_seed(3)
    starts = [torch.randint(3, 16, (n,), generator=gen).tolist() for n in (6, 3, 5)]
    out = model.generate(starts, 8, return_type="tokens")  # greedy: each row from its own end
    rows = [start + out[i, -8:].tolist() for i, start in enumerate(starts)]
    prompts = Prompts(model, rows)
    score_mask = torch.zeros_like(prompts.mask)
    score_mask[:, -9:-1] = True  # the greedy steps (a padded layout, like the prompts): the top-1 is the next token
    source_mask = prompts.mask.clone()  # anywhere in the prompt (the greedy run repeats tokens)
    source_mask[:, -1] = False
    analysis = MixerRetrievalScores(score_mask, source_mask, **groups)
    together = analysis(model, rows)
    assert isinstance(together, MixerRetrievalScoresResult) and together.steps.tolist() == [8, 8, 8]
    assert together.scores.nan_to_num().max() > 0  # some channel copies an earlier token
    for i, row in enumerate(rows):
        real = prompts.real(score_mask, i)[None], prompts.real(source_mask, i)[None]
        alone = MixerRetrievalScores(*real, **groups)(model, [row])
        torch.testing.assert_close(together.prompt_scores[i], alone.prompt_scores[0], equal_nan=True)
    _, cache = model.run_with_cache(prompts, names_filter=analysis.hooks(model))
    torch.testing.assert_close(analysis.compute(cache, prompts).prompt_scores, together.prompt_scores, equal_nan=True)
    together.save(tmp_path / "mixer.safetensors")
    loaded = Result.load(tmp_path / "mixer.safetensors")
    assert loaded.mixers == together.mixers and loaded.to_frame().equals(together.to_frame())
    assert loaded.params["score_mask"] == score_mask.int().tolist()
    frame = together.to_frame()
    assert list(frame.columns) == ["prompt", "layer", "group", "mixer", "score"]
    assert len(frame) == 3 * sum(map(len, together.mixers)) and not frame["score"].isna().any()
    with pytest.raises(AnalysisError, match="MixerRetrievalScores needs SSM mixer matrices.*rnn"):
        MixerRetrievalScores()(tiny_rnn_model, rows)


def _ssd_matrices_by_loop(model, seq, layer):
    """``M[h, t, s] = C_t · B_s exp(sum_{r=s+1..t} dt_r[h] A[h]) dt_s[h]`` (head ``h``'s group), entry by entry."""
    hooks = [names.mixer(layer, x) for x in ("dt", "B", "C")]
    _, cache = model.run_with_cache(seq[None], names_filter=hooks)
    dt, B, C = (cache[name][0].double() for name in hooks)  # [pos, h], [pos, g, n]
    mixer = model.blocks[layer].mixer
    A, per_group = mixer.A.double(), mixer.cfg.n_heads // mixer.cfg.n_groups
    pos, n_heads = dt.shape
    M = torch.zeros(n_heads, pos, pos, dtype=torch.float64)
    for h in range(n_heads):
        g = h // per_group
        for t in range(pos):
            for s in range(t + 1):
                M[h, t, s] = (C[t, g] @ B[s, g]) * torch.exp(dt[s + 1 : t + 1, h].sum() * A[h]) * dt[s, h]
    return M


@torch.no_grad()
def test_mixer_retrieval_scores_of_ssd_heads_match_a_loop(tiny_mamba2, tiny_hybrid):
    """Mamba-2: each head copy-pastes when its ``|M|`` row's top key holds the next token; a hybrid scores its
    attention heads from their patterns the same way."""
    gen = torch.Generator().manual_seed(0)
    for model in (tiny_mamba2, tiny_hybrid):
        prompt = torch.randint(3, 50, (2, 5), generator=gen)
        tokens = model.generate(prompt, max_new_tokens=8)  # greedy: the model's top-1 is the next token
        score_mask = torch.zeros_like(tokens, dtype=torch.bool)
        score_mask[:, 4:-1] = True
        result = MixerRetrievalScores(score_mask)(model, tokens)
        for layer, mixers in enumerate(result.mixers):
            expected = torch.zeros(len(mixers))
            for b, seq in enumerate(tokens):
                if mixers[0] == "attention":
                    _, cache = model.run_with_cache(seq[None], names_filter=[names.pattern(layer)])
                    M = cache[names.pattern(layer)][0]
                else:
                    M = _ssd_matrices_by_loop(model, seq, layer).abs()
                for q in range(4, len(seq) - 1):
                    hit = [seq[int(M[h, q].argmax())] == seq[q + 1] for h in range(len(mixers))]
                    expected += torch.tensor(hit, dtype=torch.float) / (len(seq) - 5) / len(tokens)
            torch.testing.assert_close(result.scores[layer, : len(mixers)], expected)
        assert result.scores.nan_to_num().max() > 0  # some head copies an earlier token
    assert result.mixers == [["mamba2"] * 8, ["attention"] * 4, ["mamba2"] * 8]
    assert torch.isnan(result.scores[1, 4:]).all()


@pytest.mark.slow
def test_smollm2_retrieval_heads_are_sparse_and_causal(smollm2):
    """The Retrieval Head paper's checks on SmolLM2-135M (figures: benchmarks/RESULTS.md, section heads)."""
    ret = RetrievalScores(18, context_tokens=(1000, 2000))(smollm2)  # 3 needles x 2 lengths x 3 depths
    print(f"retrieval heads: {len(ret.heads())} of 270 ({ret.fraction:.1%}); recall {ret.recall.mean():.3f}")
    assert ret.retrieved >= 5  # 6 in the benchmark's run: SmolLM2 misses most needles at 2000 tokens
    # The paper's "< 5%" is not met on this 135M model: 16 of 270 heads (5.9%, bootstrap 95% interval 5.2-6.7%)
    # on the 1000-3000-token grid (benchmarks/RESULTS.md, section heads). This checks sparsity at 8% and that
    # the retrieval heads sit in the late-middle layers 17-24, as they do there.
    assert ret.fraction < 0.08 and all(17 <= layer <= 24 for layer, _ in ret.heads())
    scorer = NeedleScorer(smollm2, n_haystacks=2, context_tokens=1000)
    effect = HeadAblation(
        ret.top(10), scorer, method="mask", last_queries=scorer.answer_queries, exclude=ret.top(100), trials=2,
    )(smollm2)  # fmt: skip
    print(effect.to_frame())
    frame = effect.to_frame().set_index("condition")
    assert frame.loc["effect", "mean"] > 3 * max(frame.loc["control_effect", "mean"], 0.02)
