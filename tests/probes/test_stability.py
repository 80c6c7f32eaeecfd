"""Lyapunov exponents (QR method, Mamba closed form, RNN Jacobians) and float32 vs low-precision drift."""

from __future__ import annotations

import math

import pytest
import torch
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.probes.results import Result
from dynalens.probes.stability import (
    LyapunovExponents,
    lyapunov_exponents,
    lyapunov_qr,
    precision_drift,
    rnn_step_jacobians,
)

EIGENVALUES = torch.tensor([0.9, -0.5, 0.2, 1.1], dtype=torch.float64)


def symmetric_with(eigenvalues: torch.Tensor, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64)).Q
    return Q @ torch.diag(eigenvalues) @ Q.T


def test_qr_method_recovers_the_log_moduli_of_a_constant_jacobian():
    J = symmetric_with(EIGENVALUES)
    exponents, running = lyapunov_qr(lambda t, Q: J @ Q, 4, 2000, k=4)
    expected = EIGENVALUES.abs().log().sort(descending=True).values
    torch.testing.assert_close(exponents, expected, rtol=0, atol=5e-3)
    assert running.shape == (2000, 4)
    with pytest.raises(ValueError, match="k"):
        lyapunov_qr(lambda t, Q: Q, 4, 10, k=5)


def test_rnn_exponents_of_a_linear_regime_relu_cell_are_its_log_eigenvalues():
    model = HookedRNN(RNNConfig(d_model=4, n_layers=1, d_vocab=10, cell="relu")).eval()
    # A test model of our own: W_hh = 0.9 on the all-ones direction and -0.5 across
    # it, and a large bias keep every unit active (h ~ 1000 * ones), so J_t = W_hh.
    ones = torch.full((4, 4), 0.25)
    with torch.no_grad():
        model.blocks[0].cell.weight_hh.copy_(0.9 * ones - 0.5 * (torch.eye(4) - ones))
        model.blocks[0].cell.bias_ih.fill_(100.0)
    tokens = torch.randint(0, 10, (1, 600), generator=torch.Generator().manual_seed(0))
    result = lyapunov_exponents(model, tokens, 0, k=4)
    expected = torch.tensor([0.9, 0.5, 0.5, 0.5]).log()
    torch.testing.assert_close(result.exponents, expected, rtol=0, atol=2e-2)


def test_rnn_step_jacobians_match_torch_gru_cell(tiny_rnn, tokens):
    jacobians = rnn_step_jacobians(tiny_rnn, tokens, 1)
    _, cache = tiny_rnn.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre", "blocks.1.cell.hook_hidden"])
    x, hidden = cache["blocks.1.hook_resid_pre"][0].double(), cache["blocks.1.cell.hook_hidden"][0].double()
    cell = tiny_rnn.blocks[1].cell
    reference = torch.nn.GRUCell(8, 8).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, name).copy_(getattr(cell, name))
    previous = torch.cat([torch.zeros(1, 8, dtype=torch.float64), hidden[:-1]])
    for t in range(tokens.shape[1]):
        expected = torch.autograd.functional.jacobian(lambda h, x_t=x[t]: reference(x_t[None], h[None])[0], previous[t])
        torch.testing.assert_close(jacobians[t], expected, rtol=1e-5, atol=1e-6)
    # The QR method's exponents sum to the mean log-volume change.
    exponents, _ = lyapunov_qr(lambda t, Q: jacobians[t] @ Q, 8, tokens.shape[1], k=8)
    assert float(exponents.sum()) == pytest.approx(float(torch.linalg.slogdet(jacobians).logabsdet.mean()), rel=1e-9)


def test_mamba_exponents_are_the_mean_log_decays_and_non_positive(tiny_mamba, tokens, tmp_path):
    result = lyapunov_exponents(tiny_mamba, tokens, 1, k=3)
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter=["blocks.1.mixer.hook_delta"])
    log_decay = cache["blocks.1.mixer.hook_delta"][0].double()[:, :, None] * tiny_mamba.blocks[1].mixer.A.double()
    expected = log_decay.mean(0).flatten().sort(descending=True).values[:3]
    torch.testing.assert_close(result.exponents.double(), expected, rtol=1e-5, atol=1e-7)
    assert (result.exponents <= 0).all()
    result.save(tmp_path / "lyap.safetensors")
    assert isinstance(Result.load(tmp_path / "lyap.safetensors"), LyapunovExponents)
    with pytest.raises(ValueError, match="k must lie"):
        lyapunov_exponents(tiny_mamba, tokens, 0, k=10_000)


def test_lyapunov_rejects_a_transformer(tiny_llama, tokens):
    with pytest.raises(TypeError, match="no state recurrence"):
        lyapunov_exponents(tiny_llama, tokens, 0)


def test_precision_drift_starts_at_the_rounding_of_the_embedding_and_leaves_the_model_alone(tiny_mamba, tokens):
    before = {k: v.clone() for k, v in tiny_mamba.state_dict().items()}
    result = precision_drift(tiny_mamba, tokens)
    embed = tiny_mamba.embed.weight[tokens[0]].double()
    rounding = (embed.bfloat16().double() - embed).norm(dim=-1) / embed.norm(dim=-1)
    torch.testing.assert_close(result.drift[0].double(), rounding, rtol=1e-4, atol=1e-7)
    assert result.drift.shape == (tiny_mamba.cfg.n_layers + 1, tokens.shape[1])
    assert (result.drift > 0).all() and (result.drift < 0.1).all()
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in tiny_mamba.state_dict().items())
    assert list(result.per_layer().index) == ["embed", "L0", "L1"]
    with pytest.raises(ValueError, match="bfloat16"):
        precision_drift(tiny_mamba, tokens, dtype=torch.float32)


def test_precision_drift_runs_on_every_architecture(any_model, tokens):
    result = precision_drift(any_model, tokens, dtype=torch.float16)
    assert result.dtype == "float16" and torch.isfinite(result.drift).all()
    assert 0 < float(result.drift.max()) < math.inf


def test_mamba_ar_layers_are_lyapunov_stable_and_drift_is_reported_against_a_transformer(zoo_model):
    mamba, transformer = zoo_model("mamba-ar"), zoo_model("attn2l-induction")
    vocab = min(mamba.cfg.d_vocab, transformer.cfg.d_vocab)
    length = min(64, transformer.cfg.n_ctx or 64)
    tokens = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    exponents = [float(lyapunov_exponents(mamba, tokens, layer).exponents[0]) for layer in range(mamba.cfg.n_layers)]
    print(f"\nmamba-ar top Lyapunov exponent per layer: {exponents}")
    assert all(e <= 0 for e in exponents)
    for name, model in (("mamba-ar", mamba), ("attn2l-induction", transformer)):
        drift = precision_drift(model, tokens).per_layer()
        print(f"{name} float32 vs bfloat16 drift per layer: {drift.round(5).to_dict()}")
        assert drift.notna().all() and (drift > 0).all()
