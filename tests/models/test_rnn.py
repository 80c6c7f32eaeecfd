"""HookedRNN against torch.nn.RNN / GRU / LSTM, its hooks, save/load and generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynalens.models.rnn import CELLS, HookedRNN, RNNConfig
from dynalens.models.validation import HookNameError
from tests.tolerances import assert_close

VOCAB, D_IN, D_HIDDEN = 13, 5, 8
TORCH_CLASSES = {
    "tanh": (nn.RNN, nn.RNNCell, {"nonlinearity": "tanh"}),
    "relu": (nn.RNN, nn.RNNCell, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, nn.GRUCell, {}),
    "lstm": (nn.LSTM, nn.LSTMCell, {}),
}


def torch_rnn(cell: str, n_layers: int, batch_first: bool = True, bias: bool = True) -> nn.Module:
    cls, _, kwargs = TORCH_CLASSES[cell]
    return cls(D_IN, D_HIDDEN, num_layers=n_layers, batch_first=batch_first, bias=bias, **kwargs)


def random_model(cell: str = "tanh", **kwargs) -> HookedRNN:
    cfg = dict(d_model=D_HIDDEN, n_layers=2, d_vocab=VOCAB, cell=cell) | kwargs
    return HookedRNN(RNNConfig(**cfg)).eval()


def tokens(batch: int = 2, pos: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def run_torch(rnn: nn.Module, x: torch.Tensor, state):
    """A torch.nn RNN on batch-first ``x``, whatever its own layout; output batch-first."""
    if rnn.batch_first:
        return rnn(x, state)
    out, final = rnn(x.transpose(0, 1), state)
    return out.transpose(0, 1), final


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_modules(cell, n_layers, batch_first):
    torch.manual_seed(0)
    rnn = torch_rnn(cell, n_layers, batch_first)
    embedding, unembed = nn.Embedding(VOCAB, D_IN), nn.Linear(D_HIDDEN, VOCAB)
    model = HookedRNN.from_torch(rnn, embedding, unembed)
    toks = tokens(3, 7)
    h0 = torch.randn(n_layers, 3, D_HIDDEN)
    state = (h0, torch.randn(n_layers, 3, D_HIDDEN)) if cell == "lstm" else h0

    logits, cache = model.run_with_cache(toks, state=state)
    _, final = model(toks, state=state, return_state=True)

    with torch.no_grad():
        x = embedding(toks)
        for layer in range(n_layers):
            # The first layer+1 layers of the same module give layer `layer`'s sequence.
            prefix = torch_rnn(cell, layer + 1, batch_first)
            prefix.load_state_dict(
                {k: v for k, v in rnn.state_dict().items() if int(k.rsplit("_l", 1)[1]) <= layer}
            )
            prefix_state = tuple(s[: layer + 1] for s in as_tuple(state))
            out, _ = run_torch(prefix, x, prefix_state if cell == "lstm" else prefix_state[0])
            assert_close(cache[f"blocks.{layer}.cell.hook_hidden"], out)
        ref_out, ref_final = run_torch(rnn, x, state)
    assert_close(logits, unembed(ref_out))
    for ours, ref in zip(as_tuple(final), as_tuple(ref_final), strict=True):
        assert_close(ours, ref)


@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_without_bias_and_zero_state(cell):
    torch.manual_seed(1)
    rnn = torch_rnn(cell, 2, bias=False)
    embedding = nn.Embedding(VOCAB, D_IN)
    model = HookedRNN.from_torch(rnn, embedding)
    assert model.blocks[0].cell.bias_ih is None
    toks = tokens()
    _, final = model(toks, return_state=True)
    with torch.no_grad():
        out, ref_final = rnn(embedding(toks))
    _, cache = model.run_with_cache(toks, names_filter="blocks.1.cell.hook_hidden")
    assert_close(cache["blocks.1.cell.hook_hidden"], out)
    for ours, ref in zip(as_tuple(final), as_tuple(ref_final), strict=True):
        assert_close(ours, ref)


@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_torch_cell(cell):
    torch.manual_seed(2)
    rnn = torch_rnn(cell, 1)
    model = HookedRNN.from_torch(rnn, d_vocab=VOCAB)
    _, cell_cls, kwargs = TORCH_CLASSES[cell]
    ref = cell_cls(D_IN, D_HIDDEN, **kwargs)
    ref.load_state_dict({k.removesuffix("_l0"): v for k, v in rnn.state_dict().items()})
    x, h = torch.randn(4, D_IN), torch.randn(4, D_HIDDEN)
    state = (h, torch.randn(4, D_HIDDEN)) if cell == "lstm" else h
    ours = model.blocks[0].cell.step(x, state)
    with torch.no_grad():
        expected = ref(x, state)
    for a, b in zip(as_tuple(ours), as_tuple(expected), strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_step_is_differentiable(cell):
    cell_module = random_model(cell, n_layers=1).double().blocks[0].cell
    x = torch.randn(2, D_HIDDEN, dtype=torch.float64, requires_grad=True)
    h = torch.rand(2, D_HIDDEN, dtype=torch.float64, requires_grad=True)
    if cell == "lstm":
        c = torch.randn(2, D_HIDDEN, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, h, c: cell_module.step(x, (h, c)), (x, h, c))
    else:
        assert torch.autograd.gradcheck(cell_module.step, (x, h))


def test_step_iterated_equals_forward():
    model = random_model("lstm", n_layers=1)
    toks = tokens(2, 5)
    _, cache = model.run_with_cache(toks)
    cell = model.blocks[0].cell
    state = cell.initial_state(2, cache["hook_embed"])
    for t in range(5):
        state = cell.step(cache["hook_embed"][:, t], state)
        # the step projects one position, the forward all at once: equal up to float rounding
        assert_close(state[0], cache["blocks.0.cell.hook_hidden"][:, t])
        assert_close(state[1], cache["blocks.0.cell.hook_cell"][:, t])


def test_from_torch_copies_weights():
    rnn = torch_rnn("gru", 2, batch_first=False)
    embedding = nn.Embedding(VOCAB, D_IN)
    model = HookedRNN.from_torch(rnn, embedding)
    ours = {p.data_ptr() for p in model.parameters()}
    assert ours.isdisjoint(p.data_ptr() for p in [*rnn.parameters(), *embedding.parameters()])
    before = model(tokens())
    with torch.no_grad():
        for p in [*rnn.parameters(), *embedding.parameters()]:
            p.add_(1.0)
    torch.testing.assert_close(model(tokens()), before, atol=0, rtol=0)
    assert model.cfg.cell == "gru" and model.cfg.d_embed == D_IN and not model.training


def test_from_torch_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="bidirectional"):
        HookedRNN.from_torch(nn.GRU(D_IN, D_HIDDEN, bidirectional=True), d_vocab=VOCAB)
    with pytest.raises(ValueError, match="proj_size"):
        HookedRNN.from_torch(nn.LSTM(D_IN, D_HIDDEN, proj_size=3), d_vocab=VOCAB)
    with pytest.raises(TypeError, match="nn.RNN, nn.GRU or nn.LSTM"):
        HookedRNN.from_torch(nn.Linear(D_IN, D_HIDDEN), d_vocab=VOCAB)
    with pytest.raises(ValueError, match="vocabulary size"):
        HookedRNN.from_torch(nn.GRU(D_IN, D_HIDDEN))
    with pytest.raises(ValueError, match="disagree"):
        HookedRNN.from_torch(nn.GRU(D_IN, D_HIDDEN), nn.Embedding(VOCAB, D_IN), d_vocab=VOCAB + 1)
    with pytest.raises(ValueError, match="input_size"):
        HookedRNN.from_torch(nn.GRU(D_IN, D_HIDDEN), nn.Embedding(VOCAB, D_IN + 1))


# ---------------------------------------------------------------- save/load


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <unk> the cat sat on a mat and dog ran far away".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize(
    "options",
    [
        dict(cell="lstm"),
        dict(cell="gru", residual=True, final_norm="layernorm", tie_embeddings=True),
        dict(cell="relu", bias=False, final_norm="rmsnorm", d_embed=3),
    ],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, options):
    model = random_model(**options)
    for p in model.parameters():  # norms start at ones/zeros; make every weight informative
        nn.init.normal_(p)
    model.save_pretrained(tmp_path)
    loaded = HookedRNN.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(loaded(tokens()), model(tokens()))
    if model.cfg.tie_embeddings:
        assert loaded.unembed.weight is loaded.embed.weight
    assert loaded.tokenizer is None


def test_save_load_keeps_tokenizer_and_model_type(tmp_path):
    from dynalens.models.io import read_json

    model = HookedRNN(RNNConfig(d_model=D_HIDDEN, n_layers=1, d_vocab=13, cell="gru"), word_tokenizer())
    model.save_pretrained(tmp_path)
    assert read_json(tmp_path / "config.json")["model_type"] == "dynalens-rnn"
    loaded = HookedRNN.from_pretrained(tmp_path)
    assert loaded.to_tokens("the cat sat").tolist() == [[2, 3, 4]]
    assert torch.equal(loaded("the cat sat"), model("the cat sat"))


def test_from_pretrained_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HookedRNN.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="dynalens-rnn"):
        HookedRNN.from_pretrained(tmp_path)


# -------------------------------------------------------------------- hooks


def expected_hooks(cell: str, n_layers: int) -> set[str]:
    gates = {
        "tanh": [], "relu": [],
        "gru": ["reset_gate", "update_gate", "new_gate"],
        "lstm": ["cell", "input_gate", "forget_gate", "cell_gate", "output_gate"],
    }[cell]
    per_layer = ["hook_resid_pre", "cell.hook_hidden", "hook_mixer_out", "hook_resid_post"]
    per_layer += [f"cell.hook_{g}" for g in gates]
    names = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "hook_logits"}
    return names | {f"blocks.{l}.{n}" for l in range(n_layers) for n in per_layer}


@pytest.mark.parametrize("cell", CELLS)
def test_hook_names_and_shapes(cell):
    model = random_model(cell, d_embed=3)
    assert set(model.hook_dict) == expected_hooks(cell, 2)
    logits, cache = model.run_with_cache(tokens(2, 6))
    assert set(cache.keys()) == expected_hooks(cell, 2)
    for name, value in cache.items():
        if name in ("hook_embed", "blocks.0.hook_resid_pre"):
            assert value.shape == (2, 6, model.cfg.d_embed), name
        elif name == "hook_logits":
            assert value.shape == (2, 6, VOCAB)
        elif name == "ln_final.hook_scale":
            assert value.shape == (2, 6, 1)
        else:
            assert value.shape == (2, 6, D_HIDDEN), name
    assert torch.equal(cache["hook_logits"], logits)
    assert model.cfg.architecture == model.architecture == "rnn"
    assert model.cfg.d_hidden == model.cfg.d_model == D_HIDDEN


@pytest.mark.parametrize("residual", [False, True])
def test_residual_stream_bookkeeping(residual):
    model = random_model("gru", residual=residual)
    _, cache = model.run_with_cache(tokens())
    for layer in range(2):
        hidden = cache[f"blocks.{layer}.cell.hook_hidden"]
        assert torch.equal(cache[f"blocks.{layer}.hook_mixer_out"], hidden)
        expected = cache[f"blocks.{layer}.hook_resid_pre"] + hidden if residual else hidden
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], expected)
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])


def test_final_norm_and_unembedding_read_the_last_resid_post():
    model = random_model("lstm", final_norm="layernorm")
    logits, cache = model.run_with_cache(tokens())
    resid = cache["blocks.1.hook_resid_post"]
    normalized = torch.nn.functional.layer_norm(resid, (D_HIDDEN,), *model.ln_final.norm.parameters())
    assert_close(cache["ln_final.hook_normalized"], normalized)
    assert_close(normalized @ model.W_U + model.b_U, logits)
    assert_close(model.unembed(model.ln_final(resid)), logits)


@pytest.mark.parametrize("name", ["blocks.1.hook_resid_post", "blocks.1.hook_mixer_out"])
def test_editing_stream_hooks_changes_logits(name):
    model = random_model("lstm", final_norm="none")
    clean = model(tokens())
    zeroed = model.run_with_hooks(tokens(), fwd_hooks=[(name, lambda x, hook: torch.zeros_like(x))])
    # With the last layer's output zeroed and no final norm, the logits are the unembedding bias.
    assert_close(zeroed, model.b_U.expand_as(zeroed))
    assert not torch.allclose(zeroed, clean)


def test_editing_gates_only_observes():
    model = random_model("lstm")
    clean = model(tokens())
    edited = model.run_with_hooks(
        tokens(), fwd_hooks=[("blocks.0.cell.hook_forget_gate", lambda x, hook: torch.zeros_like(x))]
    )
    assert torch.equal(edited, clean)


def test_unknown_hook_name_lists_close_names():
    model = random_model("lstm")
    with pytest.raises(HookNameError, match="blocks.0.cell.hook_hidden"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.cell.hook_hiden", lambda x, hook: x)])
    with pytest.raises(HookNameError, match="blocks.1.cell.hook_forget_gate"):
        model.run_with_cache(tokens(), names_filter=["blocks.1.cell.hook_forgetgate"])
    with pytest.raises(HookNameError, match="Closest valid names"):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)]):
            pass
    gru = random_model("gru")
    with pytest.raises(HookNameError):
        gru.run_with_cache(tokens(), names_filter="blocks.0.cell.hook_cell")


def test_hooks_removed_after_exception_in_hook():
    model = random_model("tanh")
    clean = model(tokens())

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.cell.hook_hidden", boom)])
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert torch.equal(model(tokens()), clean)


# --------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    model = random_model("lstm")
    with pytest.raises(ValueError, match=r"out of range.*\[0, 12\]"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="empty prompt"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="no tokenizer"):
        model("the cat")
    with pytest.raises(ValueError, match="tuple"):
        model(tokens(), state=torch.zeros(2, 2, D_HIDDEN))
    with pytest.raises(ValueError, match=r"\[n_layers, batch, d_model\]"):
        random_model("gru")(tokens(), state=torch.zeros(1, 2, D_HIDDEN))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cell="transformer"), "cell must be one of"),
        (dict(final_norm="batchnorm"), "final_norm must be one of"),
        (dict(residual=True, d_embed=3), "d_embed == d_model"),
        (dict(d_model=0), "d_model must be a positive integer"),
    ],
)
def test_config_validation(options, message):
    with pytest.raises(ValueError, match=message):
        RNNConfig(**(dict(d_model=D_HIDDEN, n_layers=1, d_vocab=VOCAB) | options))


def test_config_dict_round_trip():
    cfg = RNNConfig(d_model=D_HIDDEN, n_layers=2, d_vocab=VOCAB, cell="gru", final_norm="rmsnorm")
    assert RNNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["d_embed"] == D_HIDDEN


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_greedy_generate_equals_recomputing_forward(cell):
    model = random_model(cell)
    prompt = tokens(2, 4)
    generated = model.generate(prompt, max_new_tokens=6)
    expected = prompt
    for _ in range(6):
        nxt = model(expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_returned_state_is_the_hooked_last_hidden(cell):
    model = random_model(cell)
    v = torch.full((D_HIDDEN,), 0.5)

    def set_last(x, hook):
        x = x.clone()
        x[:, -1] = v
        return x

    hooks = [("blocks.1.cell.hook_hidden", set_last)]
    if cell == "lstm":
        hooks.append(("blocks.1.cell.hook_cell", set_last))
    with model.hooks(fwd_hooks=hooks):
        _, state = model(tokens(), return_state=True)
    for part in as_tuple(state):
        assert torch.equal(part[1], v.expand(2, D_HIDDEN))
    _, clean_state = model(tokens(), return_state=True)
    assert not torch.equal(as_tuple(clean_state)[0][1], as_tuple(state)[0][1])


def test_hook_on_new_hidden_steers_later_tokens():
    model = random_model("tanh", n_layers=1)
    prompt = tokens(2, 4, seed=3)
    direction = torch.randn(D_HIDDEN, generator=torch.Generator().manual_seed(4))

    def push_first_new_token():
        calls = []

        def push(x, hook):  # call 1 is the prompt, call 2 the first new token
            calls.append(x.shape[1])
            return x + 2 * direction if len(calls) == 2 else x

        return push

    clean = model.generate(prompt, max_new_tokens=8)
    via_hidden = model.generate(prompt, 8, fwd_hooks=[("blocks.0.cell.hook_hidden", push_first_new_token())])
    # The same edit on mixer_out gives that step the same logits but leaves the carried state alone.
    via_output = model.generate(prompt, 8, fwd_hooks=[("blocks.0.hook_mixer_out", push_first_new_token())])
    assert torch.equal(via_hidden[:, :5], clean[:, :5])  # before the edit
    assert torch.equal(via_hidden[:, :6], via_output[:, :6])  # the edited step: same logits
    assert not torch.equal(via_hidden[:, 6:], via_output[:, 6:])  # later: the recurrence was steered


def test_analyses_do_not_change_weights():
    model = random_model("lstm", final_norm="layernorm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    model.run_with_cache(tokens())
    model.generate(tokens(), 5, fwd_hooks=[("blocks.1.cell.hook_hidden", lambda x, hook: x + 1)])
    model.generate(tokens(), 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
