"""DSF mixers: linear attention ↔ SSM equivalence, materialised Mamba mixer, ranks, RNN linearisation."""

from __future__ import annotations

import pytest
import torch
from dynalens.kernels import mixer_matrix
from dynalens.probes import mixer_matrices
from dynalens.probes.mixers import (
    MixerComparison,
    compare_mixers,
    effective_rank,
    linear_attention,
    linear_attention_matrix,
    linear_attention_ssm_gap,
    offdiagonal_rank,
    rnn_input_output_map,
)
from dynalens.probes.results import Result


def qkv(pos: int = 16, d_k: int = 4, d_v: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, pos, d, generator=g, dtype=torch.float64) for d in (d_k, d_k, d_v))


def test_linear_attention_equals_the_identity_state_ssm_in_float64():
    q, k, v = qkv()
    naive = torch.stack([
        torch.stack([sum((q[b, t] @ k[b, s]) * v[b, s] for s in range(t + 1)) for t in range(16)]) for b in range(2)
    ])
    torch.testing.assert_close(linear_attention(q, k, v), naive, rtol=1e-12, atol=1e-12)
    gap = linear_attention_ssm_gap(q, k, v)
    assert gap["output"] <= 1e-10 and gap["matrix"] <= 1e-10
    # A real decay breaks it: the checker is not vacuous.
    decayed = mixer_matrix(torch.ones(2, 1, 16, dtype=torch.float64), -torch.ones(1, 4, dtype=torch.float64),
                           k.transpose(1, 2), q.transpose(1, 2))
    assert (decayed[:, 0] - linear_attention_matrix(q, k)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="d_k"):
        linear_attention_ssm_gap(q, k[..., :2], v)


def test_materialised_mamba_mixer_times_input_is_the_models_scan_output(tiny_mamba, tokens):
    names = ["blocks.1.mixer.hook_conv", "blocks.1.mixer.hook_y"]
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter=names)
    u, y = cache[names[0]][0], cache[names[1]][0]  # [pos, d_inner]
    M = mixer_matrices(tiny_mamba, tokens, 1, channels=list(range(tiny_mamba.cfg.d_inner)), include_skip=True).matrices
    torch.testing.assert_close(torch.einsum("cts,sc->tc", M, u), y, rtol=1e-4, atol=1e-5)


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


def test_rnn_linearisation_agrees_with_the_explorers_jacobian_norms_and_its_state_bound(tiny_rnn, tokens):
    jac = rnn_input_output_map(tiny_rnn, tokens, 1)
    pos, d_h, _, d_in = jac.shape
    norms = jac.pow(2).sum(dim=(1, 3)).sqrt()
    torch.testing.assert_close(norms, mixer_matrices(tiny_rnn, tokens, 1).matrices[0], rtol=1e-4, atol=1e-6)
    assert norms.triu(1).abs().max() == 0  # causal
    blocks = jac.reshape(pos * d_h, pos * d_in)
    assert offdiagonal_rank(blocks, block=(d_h, d_in)) <= d_h < 2 * d_h
    with pytest.raises(ValueError, match="blocks"):
        offdiagonal_rank(blocks, block=(d_h, d_in + 1))


def test_compare_mixers_across_architectures(tiny_mamba, tiny_rnn, tiny_llama, tokens, tmp_path):
    result = compare_mixers({"mamba": tiny_mamba, "gru": tiny_rnn, "llama": tiny_llama}, tokens, layer=0)
    frame = result.to_frame()
    assert set(frame["architecture"]) == {"mamba", "rnn", "transformer"}
    assert result.architecture == "mixed" and result.matrices.shape == (3, 7, 7)
    bounded = frame.dropna(subset=["bound"])
    assert (bounded["offdiagonal_rank"] <= bounded["bound"]).all()
    assert (frame.loc[frame["architecture"] == "mamba", "bound"] == tiny_mamba.cfg.d_state).all()
    assert len(result.figure().data) == 3
    result.save(tmp_path / "cmp.safetensors")
    assert isinstance(Result.load(tmp_path / "cmp.safetensors"), MixerComparison)
    with pytest.raises(ValueError, match="empty"):
        compare_mixers({}, tokens)
