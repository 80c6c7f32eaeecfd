"""Lyapunov exponents (QR method, Mamba closed form, RNN Jacobians) and float32 vs low-precision drift."""

from __future__ import annotations

import math

import pytest
import torch
from dynalens.kernels import ssd_scan
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.probes.analysis import AnalysisError
from dynalens.probes.results import Result
from dynalens.probes.stability import (
    LyapunovExponents,
    LyapunovExponentsResult,
    PrecisionDrift,
    PrecisionDriftResult,
    lyapunov_qr,
    rnn_step_jacobians,
)

RAGGED = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8], [9]]  # lengths 6, 2, 4, 1: a left-padded batch


def batch(n: int = 3, pos: int = 6, seed: int = 2) -> torch.Tensor:
    """``n`` prompts of ``pos`` random ids, valid for every conftest model."""
    return torch.randint(0, 50, (n, pos), generator=torch.Generator().manual_seed(seed))


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
    result = LyapunovExponents(0, k=4)(model, tokens)
    expected = torch.tensor([0.9, 0.5, 0.5, 0.5]).log()
    torch.testing.assert_close(result.exponents[0], expected, rtol=0, atol=2e-2)


def test_rnn_step_jacobians_match_torch_gru_cell(tiny_rnn, tokens):
    _, cache = tiny_rnn.run_with_cache(tokens, names_filter=[names.resid_pre(1), names.cell(1, "hidden")])
    x, hidden = cache[names.resid_pre(1)][0].double(), cache[names.cell(1, "hidden")][0].double()
    cell = tiny_rnn.blocks[1].cell
    jacobians = rnn_step_jacobians(cell, x)
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


def test_mamba_exponents_are_the_mean_log_decays_and_non_positive(tiny_mamba, tmp_path):
    ids = batch()
    result = LyapunovExponents(1, k=3)(tiny_mamba, ids)
    _, cache = tiny_mamba.run_with_cache(ids, names_filter=[names.mixer(1, "delta")])
    log_decay = cache[names.mixer(1, "delta")].double()[..., None] * tiny_mamba.blocks[1].mixer.A.double()
    expected = log_decay.mean(1).flatten(1).sort(dim=1, descending=True).values[:, :3]
    torch.testing.assert_close(result.exponents.double(), expected, rtol=1e-5, atol=1e-7)
    assert (result.exponents <= 0).all() and result.running.shape == (3, 6, 3)
    result.save(tmp_path / "lyap.safetensors")
    loaded = Result.load(tmp_path / "lyap.safetensors")
    assert isinstance(loaded, LyapunovExponentsResult)
    torch.testing.assert_close(loaded.running, result.running, rtol=0, atol=0)
    frame = result.to_frame()
    assert list(frame.columns) == ["prompt", "index", "exponent"] and len(frame) == 9
    assert result.top(1)["exponent"].iloc[0] == pytest.approx(float(result.exponents.max()))
    assert len(result.figure(prompt=2).data) == 3
    with pytest.raises(ValueError, match="k must lie in \\[1, state size = 128\\]"):
        LyapunovExponents(0, k=10_000).hooks(tiny_mamba)


def test_mamba2_exponents_are_each_heads_mean_log_decay_repeated_over_its_state(tiny_mamba2, tmp_path):
    ids = batch()
    cfg = tiny_mamba2.cfg
    result = LyapunovExponents(1, k=cfg.d_head * cfg.d_state + 2)(tiny_mamba2, ids)
    _, cache = tiny_mamba2.run_with_cache(ids, names_filter=[names.mixer(1, "dt")])
    per_head = (cache[names.mixer(1, "dt")].double() * tiny_mamba2.blocks[1].mixer.A.double()).mean(1)  # [b, h]
    ordered = per_head.sort(dim=1, descending=True).values
    torch.testing.assert_close(result.exponents[:, 0].double(), ordered[:, 0], rtol=1e-5, atol=1e-7)
    assert torch.equal(result.exponents[:, : cfg.d_head * cfg.d_state], result.exponents[:, :1].expand(3, 32))
    torch.testing.assert_close(result.exponents[:, -1].double(), ordered[:, 1], rtol=1e-5, atol=1e-7)
    assert result.layer_type == "mamba2" and (result.exponents <= 0).all()
    with pytest.raises(ValueError, match="k must lie in \\[1, state size = 128\\]"):
        LyapunovExponents(0, k=129).hooks(tiny_mamba2)


def ssd_model():
    """A 1-layer Mamba-2 (2 heads of 4, d_state 2) with step sizes near 1 and decays -0.2 and -1.5."""
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    torch.manual_seed(0)
    model = HookedMamba2(Mamba2Config(d_model=4, n_layers=1, d_vocab=50, n_heads=2, d_head=4, d_state=2)).eval()
    with torch.no_grad():
        model.blocks[0].mixer.dt_bias.copy_(torch.tensor([0.5, 1.5]))
        model.blocks[0].mixer.A_log.copy_(torch.tensor([0.2, 1.5]).log())
    return model


def test_ssd_state_jacobian_is_a_scalar_per_head_and_its_qr_exponents_are_the_closed_form():
    model = ssd_model()
    mixer = model.blocks[0].mixer
    h, p, n = 2, 4, 2
    ids = torch.randint(0, 50, (1, 256), generator=torch.Generator().manual_seed(0))
    hooks = [names.mixer(0, part) for part in ("x", "B", "C", "dt")]
    _, cache = model.run_with_cache(ids, names_filter=hooks)
    x, B, C, dt = (cache[name][0].double() for name in hooks)
    A = mixer.A.detach().double()

    def step(t: int, states: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """One step of the SSD recurrence from ``states`` [k, h, p, n] (the kernels' reference)."""
        k = states.shape[0]
        expand = lambda v: v[t : t + 1][None].expand(k, *v[t : t + 1].shape)
        return ssd_scan(inputs.expand(k, 1, h, p), expand(dt), A, expand(B), expand(C), initial_state=states,
                        return_final_state=True, backend="ref")[1]  # fmt: skip

    dim, eps = h * p * n, 1e-4
    closed = lambda t: torch.diag(torch.exp(dt[t] * A).repeat_interleave(p * n))
    for t in (0, 100, 255):  # central differences on the state at a random point, the input as cached
        base = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        around = base + eps * torch.cat([torch.eye(dim), -torch.eye(dim)]).double()
        moved = step(t, around.reshape(-1, h, p, n), x[t : t + 1]).reshape(2 * dim, dim)
        jacobian = ((moved[:dim] - moved[dim:]) / (2 * eps)).T
        torch.testing.assert_close(jacobian, closed(t), rtol=0, atol=1e-9)

    # The QR method through the recurrence itself (J_t Q: one step from Q's columns on a zero input).
    apply = lambda t, Q: step(t, Q.T.reshape(-1, h, p, n), torch.zeros(1, h, p, dtype=torch.float64)).reshape(-1, dim).T
    reference, _ = lyapunov_qr(apply, dim, 256, k=dim)
    result = LyapunovExponents(0, k=dim)(model, ids)
    assert float(result.exponents[0, 0] - result.exponents[0, -1]) > 1.0  # two well-separated heads
    torch.testing.assert_close(result.exponents[0].double(), reference, rtol=0, atol=0.01)
    assert float(result.exponents[0].double().sum()) == pytest.approx(float(reference.sum()), rel=1e-6)


@pytest.mark.parametrize(
    "model_name, layer", [("tiny_mamba", 1), ("tiny_mamba2", 1), ("tiny_hybrid", 2), ("tiny_rnn", 1)]
)
def test_lyapunov_ragged_batch_equals_each_prompt_alone_and_a_cache_of_your_own(model_name, layer, request):
    model, analysis = request.getfixturevalue(model_name), LyapunovExponents(layer, k=2)
    result = analysis(model, RAGGED)
    assert result.running.shape == (4, 6, 2)
    for i, row in enumerate(RAGGED):
        alone = analysis(model, [row])
        torch.testing.assert_close(result.running[i, -len(row):], alone.running[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.exponents[i], alone.exponents[0], rtol=1e-5, atol=1e-6)
        assert not result.running[i, : 6 - len(row)].any()
    prompts = Prompts(model, RAGGED)
    _, cache = model.run_with_cache(prompts, names_filter=analysis.hooks(model))
    torch.testing.assert_close(analysis.compute(cache, prompts).exponents, result.exponents)


def test_lyapunov_needs_a_state_recurrence(tiny_llama, tokens):
    with pytest.raises(AnalysisError, match="needs a state recurrence: it applies to mamba, mamba2, hybrid, rnn models, and this model is a transformer"):
        LyapunovExponents(0)(tiny_llama, tokens)


def test_precision_drift_starts_at_the_rounding_of_the_embedding_and_leaves_the_model_alone(tiny_mamba, tmp_path):
    ids = batch()
    before = {k: v.clone() for k, v in tiny_mamba.state_dict().items()}
    result = PrecisionDrift()(tiny_mamba, ids)
    embed = tiny_mamba.embed.weight[ids].double()
    rounding = (embed.bfloat16().double() - embed).norm(dim=-1) / embed.norm(dim=-1)
    torch.testing.assert_close(result.drift[..., 0].double(), rounding, rtol=1e-4, atol=1e-7)
    assert result.drift.shape == (3, ids.shape[1], tiny_mamba.cfg.n_layers + 1)
    assert (result.drift > 0).all() and (result.drift < 0.1).all()
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in tiny_mamba.state_dict().items())
    assert list(result.per_layer().index) == ["embed", "L0", "L1"]
    frame = result.to_frame()
    assert list(frame.columns) == ["prompt", "position", "token", "layer", "layer_type", "drift"]
    assert len(frame) == 3 * 6 * 3 and list(frame["layer_type"].iloc[:3]) == ["embed", "mamba", "mamba"]
    row = frame.query("prompt == 2 and position == 4 and layer == 'L1'")["drift"]
    assert float(row.iloc[0]) == pytest.approx(float(result.drift[2, 4, 2]))
    result.save(tmp_path / "drift.safetensors")
    loaded = Result.load(tmp_path / "drift.safetensors")
    assert isinstance(loaded, PrecisionDriftResult) and loaded.dtype == "bfloat16"
    torch.testing.assert_close(loaded.drift, result.drift, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bfloat16"):
        PrecisionDrift(dtype=torch.float32)(tiny_mamba, ids)


def test_precision_drift_runs_on_every_architecture_a_ragged_batch_as_its_prompts(any_model):
    analysis = PrecisionDrift(dtype=torch.float16)
    result = analysis(any_model, RAGGED)
    assert result.dtype == "float16" and torch.isfinite(result.drift).all()
    assert 0 < float(result.drift.max()) < math.inf
    for i, row in enumerate(RAGGED):
        alone = analysis(any_model, [row]).drift[0]
        torch.testing.assert_close(result.drift[i, -len(row):], alone, rtol=1e-5, atol=1e-5)
        assert not result.drift[i, : 6 - len(row)].any()
    assert result.to_frame().groupby("prompt")["position"].max().tolist() == [5, 1, 3, 0]


def test_mamba_ar_layers_are_lyapunov_stable_and_drift_is_reported_against_a_transformer(zoo_model):
    mamba, transformer = zoo_model("mamba-ar"), zoo_model("attn2l-induction")
    vocab = min(mamba.cfg.d_vocab, transformer.cfg.d_vocab)
    length = min(64, transformer.cfg.n_ctx or 64)
    tokens = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    exponents = [LyapunovExponents(layer)(mamba, tokens).exponents[:, 0].tolist() for layer in range(mamba.cfg.n_layers)]
    print(f"\nmamba-ar top Lyapunov exponent per layer (two prompts): {exponents}")
    assert all(e <= 0 for layer in exponents for e in layer)
    for name, model in (("mamba-ar", mamba), ("attn2l-induction", transformer)):
        drift = PrecisionDrift()(model, tokens).per_layer()
        print(f"{name} float32 vs bfloat16 drift per layer: {drift.round(5).to_dict()}")
        assert drift.notna().all() and (drift > 0).all()
