"""Mixer matrices (attention, materialised Mamba mixer, RNN Jacobian) and the DSF comparison across models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn


from dynalens.kernels import mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.rnn import HookedRNN
from dynalens.probes.analysis import AnalysisError, run
from dynalens.probes.mixer import MixerMatrix, MixerMatrixResult, linearise, pair_mask
from dynalens.probes.mixers import (
    MixerComparison,
    MixerComparisonResult,
    RecurrenceJacobian,
    RecurrenceJacobianResult,
    effective_rank,
    gram_singular_values,
    linear_attention,
    linear_attention_matrix,
    linear_attention_ssm_gap,
    offdiagonal_rank,
    recurrence_offdiagonal_singular_values,
)
from dynalens.probes.results import Result
from tests.tolerances import SCAN, assert_close

D_VOCAB = 50  # the vocabulary of the conftest Mamba and RNN


def batch(n: int = 3, pos: int = 6, seed: int = 2) -> torch.Tensor:
    """``n`` prompts of ``pos`` random ids, valid for every conftest model."""
    return torch.randint(0, D_VOCAB, (n, pos), generator=torch.Generator().manual_seed(seed))


RAGGED = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8], [9]]  # lengths 6, 2, 4, 1: a left-padded batch


def last(t: torch.Tensor, n: int, dims: tuple[int, ...]) -> torch.Tensor:
    """The last ``n`` entries of ``t`` along each axis in ``dims`` (a prompt's real positions)."""
    for d in dims:
        t = t.narrow(d, t.shape[d] - n, n)
    return t


def qkv(pos: int = 16, d_k: int = 4, d_v: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, pos, d, generator=g, dtype=torch.float64) for d in (d_k, d_k, d_v))


# --------------------------------------------------------------------------- tensor math
def test_linear_attention_equals_the_identity_state_ssm_in_float64():
    q, k, v = qkv()
    naive = torch.stack([
        torch.stack([sum((q[b, t] @ k[b, s]) * v[b, s] for s in range(t + 1)) for t in range(16)]) for b in range(2)
    ])
    assert_close(linear_attention(q, k, v), naive)
    gap = linear_attention_ssm_gap(q, k, v)
    assert gap["output"] <= 1e-10 and gap["matrix"] <= 1e-10
    # A real decay breaks it: the checker is not vacuous.
    decayed = mixer_matrix(torch.ones(2, 1, 16, dtype=torch.float64), -torch.ones(1, 4, dtype=torch.float64),
                           k.transpose(1, 2), q.transpose(1, 2))
    assert (decayed[:, 0] - linear_attention_matrix(q, k)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="d_k"):
        linear_attention_ssm_gap(q, k[..., :2], v)


def test_offdiagonal_rank_is_bounded_by_the_state_size():
    g = torch.Generator().manual_seed(1)
    b, d, n, pos = 1, 3, 4, 14
    delta = 0.1 + torch.rand(b, d, pos, generator=g, dtype=torch.float64)
    A = -(0.2 + torch.rand(d, n, generator=g, dtype=torch.float64))
    B, C = (torch.randn(b, n, pos, generator=g, dtype=torch.float64) for _ in range(2))
    M = mixer_matrix(delta, A, B, C, D=torch.ones(d, dtype=torch.float64))[0]
    assert [offdiagonal_rank(m) for m in M] == [n] * d
    q, k, _ = qkv(pos=12, d_k=3)
    assert offdiagonal_rank(linear_attention_matrix(q, k)[0]) == 3
    softmax = torch.softmax(q[0] @ k[0].T * 3 + torch.full((12, 12), -torch.inf).triu(1), dim=-1)
    assert offdiagonal_rank(softmax) > 3  # attention has no state bound


def test_effective_rank_known_answers():
    assert float(effective_rank(torch.eye(5))) == pytest.approx(5.0)
    assert float(effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(4)))) == pytest.approx(1.0)
    assert float(effective_rank(torch.zeros(3, 3))) == 0.0
    assert effective_rank(torch.eye(4).expand(2, 4, 4)).shape == (2,)


# --------------------------------------------------------------------------- MixerMatrix against references
def test_attention_matrices_are_hf_attention_probabilities(tiny_llama, tiny_llama_hf):
    ids = batch()
    result = MixerMatrix(layer=1)(tiny_llama, ids)
    with torch.no_grad():
        expected = tiny_llama_hf(ids, output_attentions=True).attentions[1]
    assert result.group_labels == ["head 0", "head 1", "head 2", "head 3"]
    assert_close(result.matrices, expected)
    torch.testing.assert_close(result.matrices.sum(-1), torch.ones(3, 4, ids.shape[1]))
    assert torch.equal(result.matrices.triu(1), torch.zeros_like(result.matrices))


def test_ssm_matrix_times_u_is_the_layers_y_before_gating(tiny_mamba):
    ids, layer, d_inner = batch(), 1, tiny_mamba.cfg.d_inner
    result = MixerMatrix(layer, channels=range(d_inner), include_skip=True)(tiny_mamba, ids)
    _, cache = tiny_mamba.run_with_cache(ids, names_filter=[names.mixer(layer, "conv"), names.mixer(layer, "y")])
    u, y = cache[names.mixer(layer, "conv")], cache[names.mixer(layer, "y")]  # [b, pos, d_inner]
    # M u sums each output over the whole sequence, in another order than the scan that made y.
    assert_close(torch.einsum("bdqk,bkd->bqd", result.matrices, u), y, scale=SCAN[torch.float32])
    assert result.signed and result.group_labels[3] == "channel 3"
    figure = result.figure(prompt=2, group=3, log=True)  # signed values: log10 of their magnitude
    z = np.array(figure.data[0].z, dtype=float)
    assert_close(np.tril(10**z), result.matrices[2, 3].abs().numpy())
    assert figure.data[0].colorbar.title.text == "|M|"


def test_ssm_matrix_leaves_the_skip_off_by_default(tiny_mamba):
    ids = batch(2)
    with_skip = MixerMatrix(0, channels=[0, 5], include_skip=True)(tiny_mamba, ids).matrices
    without = MixerMatrix(0, channels=[0, 5])(tiny_mamba, ids).matrices
    D = tiny_mamba.blocks[0].mixer.D.detach()[[0, 5]]
    eye = torch.eye(ids.shape[1])
    assert_close(with_skip - without, (D[:, None, None] * eye).expand(2, -1, -1, -1))


def test_ssm_channel_groups_are_mean_magnitudes_of_their_channels(tiny_mamba):
    ids = batch(2)
    every = MixerMatrix(0, channels=range(tiny_mamba.cfg.d_inner))(tiny_mamba, ids).matrices
    grouped = MixerMatrix(0, channel_groups=4)(tiny_mamba, ids)
    expected = every.abs().reshape(2, 4, -1, *every.shape[2:]).mean(2)
    torch.testing.assert_close(grouped.matrices, expected)
    assert grouped.group_labels[1] == "channels 8-15" and not grouped.signed


@pytest.mark.parametrize("cell", ["tanh", "gru", "lstm"])
def test_rnn_jacobian_norms_match_torch_nn_jacobian(cell):
    torch.manual_seed(0)
    d_in, d_hidden, pos = 5, 6, 6
    torch_cls = {"tanh": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]
    rnn = torch_cls(d_in, d_hidden, num_layers=2, batch_first=True)
    model = HookedRNN.from_torch(rnn, nn.Embedding(D_VOCAB, d_in), nn.Linear(d_hidden, D_VOCAB))
    ids = torch.randint(0, D_VOCAB, (2, pos))
    x = model.embed(ids).detach()
    for layer in range(2):
        module = _single_layer(rnn, layer)
        result = MixerMatrix(layer)(model, ids)
        full = RecurrenceJacobian(layer)(model, ids)
        for b in range(2):
            jac = torch.autograd.functional.jacobian(lambda v: module(v)[0], x[b : b + 1])  # [1, pos, h, 1, pos, d]
            assert_close(full.of(b), jac[0, :, :, 0])
            expected = jac[0, :, :, 0].pow(2).sum(dim=(1, 3)).sqrt()  # ‖∂h_t/∂x_s‖, [t, s]
            assert_close(result.matrices[b, 0], expected)
        assert torch.equal(result.matrices.triu(1), torch.zeros_like(result.matrices))
        x = module(x)[0].detach()


def _single_layer(rnn: nn.RNNBase, layer: int) -> nn.RNNBase:
    """Layer ``layer`` of a stacked torch RNN as a one-layer module of the same class."""
    d_in = rnn.input_size if layer == 0 else rnn.hidden_size
    single = type(rnn)(d_in, rnn.hidden_size, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{layer}"))
    return single


# --------------------------------------------------------------------------- Mamba-2 and hybrids
@pytest.mark.parametrize(("fixture", "layer"), [("tiny_mamba2", 1), ("tiny_hybrid", 2)])
def test_ssd_matrix_times_x_is_the_layers_y_before_gating(fixture, layer, request):
    """Each head's ``M`` (with ``D``) times the cached ``x`` is the scan's own ``y`` at every real position."""
    model = request.getfixturevalue(fixture)
    prompts = Prompts(model, RAGGED)
    result = MixerMatrix(layer, include_skip=True)(model, prompts)
    n_heads = model.blocks[layer].mixer.cfg.n_heads
    assert result.group_labels == [f"head {h}" for h in range(n_heads)] and result.signed and result.value_name == "M"
    _, cache = model.run_with_cache(prompts, names_filter=[names.mixer(layer, "x"), names.mixer(layer, "y")])
    x, y = cache[names.mixer(layer, "x")], cache[names.mixer(layer, "y")]  # [b, pos, h, p]
    mixed = torch.einsum("bhqk,bkhp->bqhp", result.matrices, x)
    # M x sums each output over the sequence in another order than the chunked scan that made y.
    assert_close(mixed[prompts.mask], y[prompts.mask], scale=SCAN[torch.float32])
    # Without the skip the diagonal loses exactly D; other heads picked keep their matrices.
    some = MixerMatrix(layer, heads=[2, 0])(model, prompts)
    assert some.group_labels == ["head 2", "head 0"]
    D = model.blocks[layer].mixer.D.detach()[[2, 0]]
    diagonal = (result.matrices[:, [2, 0]] - some.matrices).diagonal(dim1=2, dim2=3)  # [b, head, pos]
    torch.testing.assert_close(diagonal, D[None, :, None] * prompts.mask[:, None].float())
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(some.matrices[..., off], result.matrices[:, [2, 0]][..., off], rtol=0, atol=0)


def test_hybrid_attention_layer_shows_hf_attention_probabilities(tiny_hybrid, tiny_hybrid_hf):
    ids = batch(2, 6)
    result = MixerMatrix(layer=1)(tiny_hybrid, ids)
    with torch.no_grad():
        (expected,) = tiny_hybrid_hf(ids, output_attentions=True).attentions  # Bamba's one attention layer
    assert result.group_labels == [f"head {h}" for h in range(4)] and result.value_name == "attention"
    assert_close(result.matrices, expected)
    compare = MixerComparison(layer=1)(tiny_hybrid, ids).to_frame()
    assert compare["bound"].isna().all() and len(compare) == 2 * 4  # softmax attention has no state bound


def test_a_layer_with_attention_and_an_ssm_shows_both():
    """Falcon-H1's parallel mixers: the attention heads' patterns first, then each SSD head's ``M`` (``M x = y``)."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from dynalens.models.hybrid import HookedHybrid

    torch.manual_seed(0)
    config = FalconH1Config(
        vocab_size=D_VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, mamba_d_ssm=48, mamba_n_heads=4, mamba_d_head=12, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=8, ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.3], ssm_in_multiplier=0.7,
    )  # fmt: skip
    hf = FalconH1ForCausalLM(config).eval()
    hf.set_attn_implementation("eager")
    model = HookedHybrid.from_hf(hf)
    assert model.layer_types == ["attention+mamba2"]
    prompts = Prompts(model, RAGGED)
    result = MixerMatrix(0, include_skip=True)(model, prompts)
    assert result.group_labels == [f"attention head {h}" for h in range(4)] + [f"mamba2 head {h}" for h in range(4)]
    assert result.value_name == "attention | M" and result.signed
    hooks = [names.pattern(0), names.mixer(0, "x"), names.mixer(0, "y")]
    _, cache = model.run_with_cache(prompts, names_filter=hooks)
    torch.testing.assert_close(result.matrices[:, :4], cache[hooks[0]] * pair_mask(prompts))
    mixed = torch.einsum("bhqk,bkhp->bqhp", result.matrices[:, 4:], cache[hooks[1]])
    assert_close(mixed[prompts.mask], cache[hooks[2]][prompts.mask], scale=SCAN[torch.float32])  # M x vs the scan
    bounds = MixerComparison(0)(model, prompts).to_frame().groupby("group")["bound"].first()
    assert bounds.isna().sum() == 4 and (bounds.dropna() == 8).all()


def test_mixer_comparison_of_ssd_heads_is_bounded_by_d_state(tiny_mamba2, tiny_hybrid):
    ids = batch(2, 12)
    for model, layer in ((tiny_mamba2, 0), (tiny_hybrid, 0)):
        n = model.blocks[layer].mixer.cfg.d_state
        compare = MixerComparison(layer, channels=3)
        frame = compare(model, ids).to_frame()
        assert frame["group"].tolist() == ["head 0", "head 1", "head 2"] * 2 and (frame["bound"] == n).all()
        assert (frame["offdiagonal_rank"] <= n).all() and (frame["offdiagonal_rank"] >= 1).all()
        heads = MixerMatrix(layer, heads=[0, 1, 2])(model, ids)
        assert_close(frame["effective_rank"][:3], [float(effective_rank(m)) for m in heads.matrix(0)])


def test_mamba2_and_hybrid_options_say_where_they_apply(tiny_mamba2, tiny_hybrid, tiny_mamba):
    with pytest.raises(ValueError, match="channels is for Mamba layers; layer 0 of this mamba2 mixes with mamba2"):
        MixerMatrix(0, channels=[1]).hooks(tiny_mamba2)
    with pytest.raises(ValueError, match="heads is for Mamba-2 layers; layer 0 of this mamba mixes with mamba"):
        MixerMatrix(0, heads=[1]).hooks(tiny_mamba)
    with pytest.raises(ValueError, match="include_skip is for SSM layers; layer 1 of this hybrid mixes with attention"):
        MixerMatrix(1, include_skip=True).hooks(tiny_hybrid)
    with pytest.raises(IndexError, match="valid heads are 0 to 3"):
        MixerMatrix(0, heads=[4]).hooks(tiny_mamba2)
    with pytest.raises(ValueError, match="heads is empty"):
        MixerMatrix(2, heads=[]).hooks(tiny_hybrid)
    assert MixerMatrix(1).hooks(tiny_hybrid) == [names.pattern(1)]
    assert MixerMatrix(2).hooks(tiny_hybrid) == [names.mixer(2, part) for part in ("dt", "B", "C")]


# --------------------------------------------------------------------------- protocol: batches, caches, files
@pytest.fixture(params=["tiny_llama", "tiny_mamba", "tiny_mamba2", "tiny_hybrid", "tiny_rnn"])
def model(request: pytest.FixtureRequest):
    """Each of the five architectures in turn."""
    return request.getfixturevalue(request.param)


def test_mixer_matrix_ragged_batch_equals_each_prompt_alone_and_a_cache_of_your_own(model, tmp_path):
    analysis = MixerMatrix(layer=1)
    result = analysis(model, RAGGED)
    assert result.matrices.shape[:1] == (4,) and result.matrices.shape[2:] == (6, 6)
    for i, row in enumerate(RAGGED):
        alone = analysis(model, [row])
        assert_close(result.matrix(i), alone.matrix(0))
        pad = 6 - len(row)
        assert not result.matrices[i, :, :pad].any() and not result.matrices[i, :, :, :pad].any()
    prompts = Prompts(model, RAGGED)
    _, cache = model.run_with_cache(prompts, names_filter=analysis.hooks(model))
    torch.testing.assert_close(analysis.compute(cache, prompts).matrices, result.matrices)
    frame = result.to_frame()
    assert frame.groupby("prompt")["query_position"].max().tolist() == [5, 1, 3, 0]
    assert len(frame) == len(result.group_labels) * sum(n * (n + 1) // 2 for n in (6, 2, 4, 1))  # causal entries
    row = frame.iloc[int(frame["value"].abs().idxmax())]
    assert result.top(1)["value"].iloc[0] == row["value"]
    assert result.params["layer"] == 1 and result.architecture == model.cfg.architecture
    result.save(tmp_path / "mixer.safetensors")
    loaded = Result.load(tmp_path / "mixer.safetensors")
    assert isinstance(loaded, MixerMatrixResult) and loaded.group_labels == result.group_labels
    torch.testing.assert_close(loaded.matrices, result.matrices, rtol=0, atol=0)
    assert loaded.str_tokens(2) == result.str_tokens(2) and loaded.prompts.key() == result.prompts.key()


def test_bad_arguments_say_what_is_accepted(any_model, tiny_llama, tiny_mamba):
    with pytest.raises(IndexError, match="valid layers are 0 to 1"):
        MixerMatrix(layer=2)(any_model, batch(1))
    with pytest.raises(ValueError, match="channel_groups is for Mamba layers; layer 0 of this transformer mixes with attention"):
        MixerMatrix(0, channel_groups=2)(tiny_llama, batch(1))
    with pytest.raises(ValueError, match="divide d_inner = 32"):
        MixerMatrix(0, channel_groups=5).hooks(tiny_mamba)  # before any forward
    with pytest.raises(IndexError, match="valid channels are 0 to 31"):
        MixerMatrix(0, channels=[40])(tiny_mamba, batch(1))
    with pytest.raises(ValueError, match="not both"):
        MixerMatrix(0, channels=[1], channel_groups=2)(tiny_mamba, batch(1))


def test_analyses_leave_weights_and_hooks_as_they_were(any_model):
    before = {k: v.clone() for k, v in any_model.state_dict().items()}
    run(any_model, batch(2), [MixerMatrix(0), MixerComparison(1)])
    after = any_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in any_model.hook_dict.values())
    assert all(p.grad is None for p in any_model.parameters())


# --------------------------------------------------------------------------- the linearised RNN
def test_rnn_linearisation_agrees_with_the_mixer_norms_and_its_state_bound(tiny_rnn, tmp_path):
    result = RecurrenceJacobian(1)(tiny_rnn, RAGGED)
    assert_close(result.norms, MixerMatrix(1)(tiny_rnn, RAGGED).matrices[:, 0])
    assert result.norms.triu(1).abs().max() == 0  # causal
    d_h = tiny_rnn.cfg.d_model
    for prompt, row in enumerate(RAGGED):
        assert offdiagonal_rank(result.blocks(prompt), block=(d_h, d_h)) <= d_h
        alone = RecurrenceJacobian(1)(tiny_rnn, [row])
        assert_close(result.of(prompt), alone.of(0))
        assert not result.jacobian[prompt, : 6 - len(row)].any() and not result.jacobian[prompt, :, :, : 6 - len(row)].any()
    with pytest.raises(ValueError, match="blocks"):
        offdiagonal_rank(result.blocks(0), block=(d_h, d_h + 1))
    assert set(result.to_frame()["prompt"]) == {0, 1, 2, 3} and len(result.figure(prompt=1).data) == 1
    result.save(tmp_path / "jac.safetensors")
    loaded = Result.load(tmp_path / "jac.safetensors")
    assert isinstance(loaded, RecurrenceJacobianResult)
    torch.testing.assert_close(loaded.jacobian, result.jacobian, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["tanh", "gru", "lstm"])
def test_rnn_mixer_structure_equals_dense_svds_of_the_torch_nn_jacobian(cell):
    torch.manual_seed(1)
    d_in, d_hidden, pos = 4, 3, 9
    rnn = {"tanh": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](d_in, d_hidden, batch_first=True)
    model = HookedRNN.from_torch(rnn, nn.Embedding(D_VOCAB, d_in), nn.Linear(d_hidden, D_VOCAB))
    ids = torch.randint(0, D_VOCAB, (2, pos))
    frame = MixerComparison(0)(model, ids).to_frame()
    reference = copy.deepcopy(rnn).double()
    size = 2 * d_hidden if cell == "lstm" else d_hidden
    for b in range(2):
        x = model.embed(ids[b : b + 1]).detach().double()
        jac = torch.autograd.functional.jacobian(lambda v: reference(v)[0], x)[0, :, :, 0]  # [pos, h, pos, d_in]
        M = jac.reshape(pos * d_hidden, pos * d_in)
        row = frame[frame["prompt"] == b].iloc[0]
        assert row["effective_rank"] == pytest.approx(float(effective_rank(M)), rel=1e-9)
        assert row["offdiagonal_rank"] == offdiagonal_rank(M, block=(d_hidden, d_in)) and row["bound"] == size
        blocks = recurrence_offdiagonal_singular_values(linearise(model.blocks[0].cell, x[0]))
        assert len(blocks) == pos - 1
        for t, sigma in enumerate(blocks, start=1):
            dense = torch.linalg.svdvals(M[t * d_hidden :, : t * d_in])[: len(sigma)]
            torch.testing.assert_close(sigma, dense, rtol=0, atol=1e-12)
            assert len(sigma) == min(size, t * d_in, (pos - t) * d_hidden)


def test_gram_singular_values_are_the_svd_above_the_gram_resolution():
    g = torch.Generator().manual_seed(4)
    sigma = torch.logspace(0, -4, 25, dtype=torch.float64)  # four decades
    for rows, cols in ((40, 25), (25, 40), (30, 60)):
        U = torch.linalg.qr(torch.randn(rows, 25, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(cols, 25, generator=g, dtype=torch.float64)).Q
        M = (U * sigma) @ V.T
        found = gram_singular_values(M)
        assert found.shape == (min(rows, cols),)
        torch.testing.assert_close(found[:25], sigma, rtol=1e-7, atol=0)
        assert (found[25:] < 1e-7).all()
    torch.testing.assert_close(gram_singular_values(torch.eye(6)), torch.ones(6, dtype=torch.float64))


def test_recurrence_jacobian_needs_an_rnn(tiny_llama, tiny_mamba):
    for model, arch in ((tiny_llama, "transformer"), (tiny_mamba, "mamba")):
        with pytest.raises(AnalysisError, match=f"a recurrent cell to linearise: it applies to rnn models, and this model is a {arch}"):
            RecurrenceJacobian(0)(model, batch(1))


# --------------------------------------------------------------------------- comparison across models
def test_compare_mixers_across_architectures(tiny_mamba, tiny_rnn, tiny_llama, tmp_path):
    ids = batch(2, 7)
    compare = MixerComparison(layer=0)
    parts = {"mamba": compare(tiny_mamba, ids), "gru": compare(tiny_rnn, ids), "llama": compare(tiny_llama, ids)}
    result = MixerComparisonResult.join(parts)
    frame = result.to_frame()
    assert set(frame["architecture"]) == {"mamba", "rnn", "transformer"} and set(frame["prompt"]) == {0, 1}
    assert result.architecture == "mixed" and result.matrices.shape == (3, 2, 7, 7)
    assert result.names == ["mamba", "gru", "llama"] and result.model_name == "mamba | gru | llama"
    bounded = frame.dropna(subset=["bound"])
    assert (bounded["offdiagonal_rank"] <= bounded["bound"]).all()
    assert (frame.loc[frame["architecture"] == "mamba", "bound"] == tiny_mamba.cfg.d_state).all()
    assert len(frame.loc[frame["architecture"] == "transformer"]) == 2 * 4  # prompts × heads
    # The statistics are those of the mixer matrices themselves.
    heads = MixerMatrix(0)(tiny_llama, ids)
    expected = [float(effective_rank(m)) for m in heads.matrix(1)]
    got = frame.query("architecture == 'transformer' and prompt == 1")["effective_rank"].tolist()
    assert_close(got, expected)
    torch.testing.assert_close(result.matrices[2], heads.matrices.mean(1))
    assert len(result.figure(prompt=1).data) == 3
    result.save(tmp_path / "cmp.safetensors")
    loaded = Result.load(tmp_path / "cmp.safetensors")
    assert isinstance(loaded, MixerComparisonResult) and loaded.to_frame().equals(frame)
    with pytest.raises(ValueError, match="empty"):
        MixerComparisonResult.join({})
    with pytest.raises(ValueError, match="other token ids"):
        MixerComparisonResult.join({"a": parts["mamba"], "b": compare(tiny_rnn, ids[:, :5])})
    with pytest.raises(ValueError, match="channels must be a positive integer"):
        MixerComparison(channels=0).hooks(tiny_mamba)


@pytest.mark.parametrize("layer", [0, 1])
def test_mixer_comparison_ragged_batch_equals_each_prompt_alone(model, layer):
    compare = MixerComparison(layer=layer)
    result = compare(model, RAGGED)
    frame = result.to_frame()
    for i, row in enumerate(RAGGED):
        alone = compare(model, [row])
        assert_close(last(result.matrices[:, i], len(row), (1, 2)), alone.matrices[:, 0])
        mine = frame[frame["prompt"] == i].drop(columns="prompt").reset_index(drop=True)
        theirs = alone.to_frame().drop(columns="prompt")
        assert (mine["offdiagonal_rank"] == theirs["offdiagonal_rank"]).all()
        assert_close(mine["effective_rank"], theirs["effective_rank"])
