"""One batching for every architecture: a left-padded row equals its unpadded run.

Ragged batches of 1 to 5 prompts of different lengths, on a transformer (RoPE
through the Bridge, and learned absolute positions), a Mamba, a Mamba-2 and
RNNs of every cell: the logits, every cached hook at the real positions, and greedy
``generate`` each equal running one prompt at a time (1e-5, float32).
"""

from __future__ import annotations

import pytest
import torch

from dynalens.models import HookedMamba, HookedRNN, MambaConfig, RNNConfig, names
from dynalens.models.prompts import Prompts
from tests.tolerances import assert_close

VOCAB = 50
LENGTHS = {1: [4], 2: [2, 6], 3: [5, 1, 3], 5: [3, 7, 1, 5, 2]}


def rnn(cell: str, residual: bool = True) -> HookedRNN:
    torch.manual_seed(0)
    cfg = RNNConfig(d_model=8, n_layers=2, d_vocab=VOCAB, cell=cell, residual=residual, final_norm="rmsnorm")
    return HookedRNN(cfg).eval()


MODELS = ["tiny_llama", "tiny_gpt2", "tiny_mamba", "tiny_mamba2", "rnn-tanh", "rnn-gru", "rnn-lstm", "rnn-lstm-plain"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    if request.param.startswith("rnn-"):
        cell = request.param.split("-")[1]
        return rnn(cell, residual=not request.param.endswith("plain"))
    return request.getfixturevalue(request.param)


def rows(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def real_part(batched: torch.Tensor, single: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """``batched`` (one row, padded to ``width``) cut to the real positions on every position axis.

    Left padding puts the ``n`` real positions last, so every axis of size
    ``width`` where the unpadded run has ``n`` is cut to its last ``n``
    (both axes of an attention pattern).
    """
    for dim, (a, b) in enumerate(zip(batched.shape, single.shape)):
        if a != b and a == width and b == n:
            batched = batched.narrow(dim, width - n, n)
    return batched


@pytest.mark.parametrize("n_prompts", sorted(LENGTHS))
def test_padded_rows_equal_unpadded_runs_at_every_hook(model, n_prompts):
    prompts = Prompts(model, rows(LENGTHS[n_prompts]))
    width = prompts.tokens.shape[1]
    logits, cache = model.run_with_cache(prompts)
    assert cache.prompts is prompts
    for i, single in enumerate(prompts):
        n = int(prompts.lengths[i])
        single_logits, single_cache = model.run_with_cache(single.tokens)
        assert_close(prompts.real(logits, i), single_logits[0])
        compared = 0
        for name, value in single_cache.items():
            padded = cache[name]
            if padded.shape[0] != len(prompts) or value.shape[0] != 1:
                continue  # broadcast entries (rotary tables) have no row per prompt
            got = real_part(padded[i], value[0], width, n)
            assert_close(got, value[0], msg=name)
            compared += 1
        assert compared >= 3 * model.cfg.n_layers


@pytest.mark.parametrize("n_prompts", [2, 5])
def test_greedy_generate_of_a_ragged_batch_equals_one_prompt_at_a_time(model, n_prompts):
    prompts = Prompts(model, rows(LENGTHS[n_prompts], seed=1))
    out = model.generate(prompts, 6)
    assert out.shape == (n_prompts, prompts.tokens.shape[1] + 6)
    assert torch.equal(out[:, : prompts.tokens.shape[1]], prompts.tokens)  # the padded prompt, as given
    for i, single in enumerate(prompts):
        expected = model.generate(single.tokens, 6)[0]
        assert torch.equal(out[i][prompts.offsets[i] :], expected)


def test_generate_with_a_mask_equals_greedy_full_recompute(tiny_llama):
    """The Bridge's KV-cached steps with the extended mask equal recomputing the whole padded batch."""
    prompts = Prompts(tiny_llama, ["The Eiffel Tower is in the city of", "Rome is", "A B C D"])
    out = tiny_llama.generate(prompts, 5, return_type="tokens")
    tokens, mask = prompts.tokens, prompts.mask
    for _ in range(5):
        logits = tiny_llama(tokens, attention_mask=mask)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, tokens)


def test_text_generation_of_a_ragged_batch_equals_each_text_alone(tiny_llama):
    texts = ["The Eiffel Tower is in the city of", "Rome is"]
    together = tiny_llama.generate(texts, 4)
    assert together == [tiny_llama.generate(text, 4) for text in texts]
    assert all(text.startswith(prompt) for text, prompt in zip(together, texts))
    assert "<|endoftext|>" not in together[1]  # no pads in the strings


def test_lists_and_masks_are_the_same_batch_on_every_entry_point(any_model):
    batch = rows([5, 2, 4])
    prompts = Prompts(any_model, batch)
    expected = any_model(prompts)
    assert_close(any_model(batch), expected)
    assert_close(any_model(prompts.tokens, attention_mask=prompts.mask.long()), expected)
    assert torch.equal(any_model.to_tokens(batch), prompts.tokens)
    logits, cache = any_model.run_with_cache(batch, names_filter=[names.resid_post(0)])
    assert_close(logits, expected)
    assert torch.equal(cache.prompts.tokens, prompts.tokens)
    hooked = any_model.run_with_hooks(prompts, fwd_hooks=[(names.resid_post(0), lambda x, hook: x)])
    assert_close(hooked, expected)


def word_tokenizer():
    """An offline tokenizer: words ``w0 .. w48``, ``[UNK]`` and ``[PAD]``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"[UNK]": VOCAB - 2, "[PAD]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.parametrize("arch", ["transformer", "mamba", "rnn"])
def test_strings_become_a_left_padded_batch_everywhere(arch, tiny_llama, tiny_mamba):
    if arch == "transformer":
        model, texts = tiny_llama, ["The Eiffel Tower is in", "Rome"]
    else:
        model = rnn("gru") if arch == "rnn" else tiny_mamba
        model = type(model)(model.cfg, tokenizer=word_tokenizer()).eval()
        model.load_state_dict((rnn("gru") if arch == "rnn" else tiny_mamba).state_dict())
        texts = ["w1 w2 w3 w4", "w5"]
    prompts = Prompts(model, texts)
    tokens = model.to_tokens(texts)
    assert torch.equal(tokens, prompts.tokens)
    assert torch.equal(tokens[1, -1:], model.to_tokens(texts[1])[0, -1:])  # real tokens last
    assert (tokens[1, : int(prompts.offsets[1])] == prompts.pad_id).all()
    logits = model(texts)
    assert_close(prompts.real(logits, 1), model(texts[1])[0])
    generated = model.generate(texts, 3)
    assert generated == [model.generate(text, 3) for text in texts]


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.tensor([[1, 0, 1]]), "pad on the left"),
        (torch.tensor([[0, 0, 0]]), "at least one real token"),
        (torch.tensor([[1, 1]]), "shape"),
        (torch.tensor([[2, 1, 1]]), "only 0"),
    ],
)
def test_bad_masks_are_clear_errors(any_model, mask, match):
    tokens = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=match):
        any_model(tokens, attention_mask=mask)


# ------------------------------------------------------------------- Mamba
def test_mamba_pads_have_zero_delta_and_leave_both_states_as_they_were(tiny_mamba):
    prompts = Prompts(tiny_mamba, rows([6, 2]))
    _, cache = tiny_mamba.run_with_cache(prompts, names_filter=lambda n: "delta" in n or "ssm_state" in n)
    pads = ~prompts.mask
    for layer in range(tiny_mamba.cfg.n_layers):
        assert cache[names.mixer(layer, "delta")][pads].abs().max() == 0  # Δ = 0 shown by the hook
        states = cache[names.mixer(layer, "ssm_state")][1]
        assert states[: int(prompts.offsets[1])].abs().max() == 0  # the state stays at its start
    _, state = tiny_mamba(prompts, return_state=True)
    for i, single in enumerate(prompts):
        _, alone = tiny_mamba(single.tokens, return_state=True)
        for layer in range(tiny_mamba.cfg.n_layers):
            assert_close(state.ssm[layer][i], alone.ssm[layer][0])
            assert_close(state.conv[layer][i], alone.conv[layer][0])


def test_mamba_padded_continuation_from_a_state_equals_the_unpadded_one(tiny_mamba):
    """Pads after a state: the conv window runs from the previous inputs straight into the real tokens."""
    prefix = torch.tensor(rows([5, 5], seed=3))
    chunk = Prompts(tiny_mamba, rows([4, 1], seed=4))
    _, state = tiny_mamba(prefix, return_state=True)
    logits = tiny_mamba(chunk, state=state)
    for i, single in enumerate(chunk):
        expected = tiny_mamba(torch.cat([prefix[i : i + 1], single.tokens], dim=1))[:, prefix.shape[1] :]
        assert_close(chunk.real(logits, i), expected[0])


# -------------------------------------------------------------------- RNNs
@pytest.mark.parametrize("cell", ["tanh", "gru", "lstm"])
def test_rnn_pad_steps_carry_the_state(cell):
    model = rnn(cell)
    prompts = Prompts(model, rows([6, 3]))
    names_filter = lambda n: n.endswith("hook_hidden") or n.endswith("hook_cell")  # noqa: E731
    _, cache = model.run_with_cache(prompts, names_filter=names_filter)
    for name, value in cache.items():
        assert value[1, : int(prompts.offsets[1])].abs().max() == 0, name  # zeros: the initial state
    _, state = model(prompts, return_state=True)
    _, alone = model(prompts[1].tokens, return_state=True)
    for part, part_alone in zip(state if cell == "lstm" else (state,), alone if cell == "lstm" else (alone,)):
        assert_close(part[:, 1], part_alone[:, 0])
