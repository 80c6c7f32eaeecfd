"""Token dynamics: the regime criterion against simulation, the limit ODE against the kernels and the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynalens.kernels import mixer_matrix
from dynalens.probes import residual_norms
from dynalens.probes.results import Result
from dynalens.probes.token_dynamics import (
    MambaRegimes,
    SelectiveSystem,
    mamba_regimes,
    psd_bc_rows,
    reorder_tokens,
    simulate_tokens,
    soft_sort,
    token_importance,
    token_trajectories,
)


def random_systems(n_systems: int, dim: int, n: int, seed: int) -> SelectiveSystem:
    """Random systems with one decay rate per channel (``A_d = -a_d I``, the paper's assumption)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    a = 0.5 + 1.5 * torch.rand(n_systems, dim, 1, generator=g, dtype=torch.float64)
    return SelectiveSystem(
        S_B=r(n_systems, n, dim), S_C=r(n_systems, n, dim), S_delta=r(n_systems, dim, dim),
        delta_bias=r(n_systems, dim), A=-a.expand(n_systems, dim, n).clone(),
    )


def random_tokens(n_systems: int, pos: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = 0.5 + 1.5 * torch.rand(n_systems, pos, dim, generator=g, dtype=torch.float64)
    return size * torch.randn(n_systems, pos, dim, generator=g, dtype=torch.float64).sign()


def test_random_1d_systems_converge_or_diverge_as_the_criterion_says_never_a_mix():
    system, x0 = random_systems(400, 1, 3, seed=0), random_tokens(400, 4, 1, seed=1)
    flow = simulate_tokens(system, x0)
    regimes = system.regimes()
    assert {"convergent", "divergent"} == set(regimes)
    expected = torch.tensor([1.0 if r == "divergent" else -1.0 for r in regimes], dtype=torch.float64)
    assert (flow.outcome != 0).all(), "every token is decided"
    assert (flow.outcome == expected[:, None]).all(), "all tokens of a system share the criterion's outcome"
    # Divergent tokens diverge at different rates: just before the first token is
    # decided, the tokens of a system have grown by pairwise different factors.
    log_growth = (flow.norms / flow.norms[0]).log()  # [step, system, pos]
    for s in torch.nonzero(expected > 0)[:, 0].tolist():
        before = int(torch.nonzero(log_growth[:, s].amax(dim=1) >= np.log(10))[0]) - 1
        rates = log_growth[before, s].sort().values
        assert (rates[1:] - rates[:-1] > 1e-6 * rates[-1]).all()


def test_fast_divergence_blows_up_in_finite_time_slow_divergence_is_logarithmic():
    base = random_systems(60, 1, 2, seed=9)
    # mu > 0, and |S_delta| >= 1 so that the asymptotic step size is reached within a factor of 100.
    S_delta = base.S_delta.sign() * (1 + base.S_delta.abs())
    system = SelectiveSystem(base.S_B, base.S_B * base.S_C.abs(), S_delta, base.delta_bias, base.A)
    x0 = random_tokens(60, 1, 1, seed=10)
    speed = [row[0] for row in system.divergence_speed(x0)]
    assert set(speed) == {"fast", "slow"}
    t10 = simulate_tokens(system, x0, growth=10.0).exit_time[:, 0]
    t100 = simulate_tokens(system, x0, growth=100.0).exit_time[:, 0]
    fast = torch.tensor([s == "fast" for s in speed])
    assert (t100[fast] / t10[fast] < 1.5).all()  # almost no time between 10x and 100x: a blow-up
    assert (t100[~fast] / t10[~fast] > 10).all()  # each further factor costs ever more time


def test_first_token_converges_like_c_over_sqrt_t():
    base = random_systems(20, 1, 2, seed=2)
    system = SelectiveSystem(base.S_B, -base.S_B * base.S_C.abs(), base.S_delta, base.delta_bias, base.A)
    assert set(system.regimes()) == {"convergent"}
    flow = simulate_tokens(system, random_tokens(20, 1, 1, seed=3), growth=1e3, rel_step=0.01)
    mu, b = system.mu[:, 0, 0], system.delta_bias[:, 0]
    c = 1 / torch.sqrt(2 * mu.abs() * F.softplus(b))  # x_1(t) sqrt(t) -> c
    last = flow.norms.shape[0] - 1
    measured = flow.norms[last, :, 0] * flow.times[last].sqrt()
    torch.testing.assert_close(measured, c, rtol=2e-2, atol=0)


def test_velocity_is_the_materialised_mixer_applied_to_the_tokens():
    system, x = random_systems(3, 4, 2, seed=4), random_tokens(3, 6, 4, seed=5)
    velocity = system.velocity(x)
    for s in range(3):
        xs = x[s]
        delta = F.softplus(xs @ system.S_delta[s].T + system.delta_bias[s]).T[None]  # [1, dim, pos]
        B, C = ((xs @ S.T).T[None] for S in (system.S_B[s], system.S_C[s]))
        M = mixer_matrix(delta, system.A[s], B, C)[0]  # [dim, pos, pos]
        torch.testing.assert_close(velocity[s], torch.einsum("dts,sd->td", M, xs), rtol=1e-10, atol=1e-12)


def test_mamba_layer_system_reproduces_the_models_scan(tiny_mamba, tokens):
    names = ["blocks.1.mixer.hook_conv", "blocks.1.mixer.hook_y"]
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter=names)
    u, y = (cache[name].double() for name in names)
    system = SelectiveSystem.from_mamba(tiny_mamba, 1)
    skip = tiny_mamba.blocks[1].mixer.D.double() * u
    torch.testing.assert_close(system.velocity(u) + skip, y, rtol=1e-4, atol=1e-5)


def test_psd_reparametrisation_excludes_the_convergent_regime():
    g = torch.Generator().manual_seed(6)
    U, log_scale = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    S_B, S_C = psd_bc_rows(U, log_scale)
    assert torch.linalg.eigvalsh(S_C.T @ S_B).min() > -1e-12
    base = random_systems(1, 5, 3, seed=7)
    psd = SelectiveSystem(S_B[None], S_C[None], base.S_delta, base.delta_bias, base.A)
    negated = SelectiveSystem(S_B[None], -S_C[None], base.S_delta, base.delta_bias, base.A)
    assert psd.regimes() == ["divergent"] and negated.regimes() == ["convergent"]


def test_mamba_regimes_from_weights(tiny_mamba, tmp_path):
    result = mamba_regimes(tiny_mamba)
    frame = result.to_frame()
    assert list(frame["layer"]) == [0, 1]
    for layer, regime in enumerate(result.regimes):
        system = SelectiveSystem.from_mamba(tiny_mamba, layer)
        sym = torch.linalg.eigvalsh((system.mu[0] + system.mu[0].T) / 2)
        assert regime == ("divergent" if sym.max() > 0 else "convergent")
        assert float(result.sym_max[layer]) == pytest.approx(float(sym.max()), rel=1e-5)
        # The non-zero spectrum of S_C^T S_B is that of S_B S_C^T.
        full = torch.linalg.eigvals(system.mu[0])
        nonzero = full[full.abs() > 1e-8].real.sort().values
        assert torch.allclose(result.eig_real[layer].double().sort().values, nonzero, atol=1e-5)
    result.save(tmp_path / "regimes.safetensors")
    loaded = Result.load(tmp_path / "regimes.safetensors")
    assert isinstance(loaded, MambaRegimes) and loaded.regimes == result.regimes
    assert len(result.figure().data) == 2


def test_soft_sort_tends_to_the_sorting_permutation():
    g = torch.Generator().manual_seed(8)
    scores, x = torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    P = soft_sort(scores, tau=1.0)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    order = scores.argsort(dim=-1, descending=True)
    hard = reorder_tokens(x, scores, tau=1e-4)
    torch.testing.assert_close(hard, torch.gather(x, 1, order[..., None].expand_as(x)))
    with pytest.raises(ValueError, match="tau"):
        soft_sort(scores, tau=0.0)


def test_importance_score_is_the_step_size_pre_activation(tiny_mamba, tokens):
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter=["blocks.0.mixer.hook_delta"])
    delta = cache["blocks.0.mixer.hook_delta"][0]
    for channel in (0, 5):
        readout = torch.zeros(tiny_mamba.cfg.d_inner)
        readout[channel] = 1.0
        result = token_importance(tiny_mamba, tokens, 0, readout=readout)
        torch.testing.assert_close(F.softplus(result.scores), delta[:, channel], rtol=1e-5, atol=1e-6)
    mean = token_importance(tiny_mamba, tokens, 0)
    assert mean.top(1)["score"].iloc[0] == pytest.approx(float(mean.scores.max()))


def test_weight_analyses_reject_other_architectures(tiny_rnn, tokens):
    with pytest.raises(TypeError, match="takes a Mamba, got a rnn"):
        mamba_regimes(tiny_rnn)
    with pytest.raises(TypeError, match="takes a Mamba"):
        token_importance(tiny_rnn, tokens, 0)


def test_trajectories_are_the_residual_norms_and_their_log_slope(any_model, tokens):
    result = token_trajectories(any_model, tokens)
    torch.testing.assert_close(result.norms, residual_norms(any_model, tokens).norms, rtol=1e-5, atol=1e-5)
    depth = np.arange(result.norms.shape[0])
    for p in (0, 3):
        slope = np.polyfit(depth, np.log(result.norms[:, p].double().numpy()), 1)[0]
        assert float(result.growth[p]) == pytest.approx(slope, rel=1e-4, abs=1e-6)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(any_model.cfg.n_layers)]
    _, cache = any_model.run_with_cache(tokens, names_filter=names)
    torch.testing.assert_close(token_trajectories(any_model, tokens, cache=cache).norms, result.norms)
    with pytest.raises(KeyError, match="cache lacks"):
        token_trajectories(any_model, tokens, cache={})
    assert len(result.figure().data) == tokens.shape[1]


def test_mamba_ar_regime_of_every_layer(zoo_model):
    model = zoo_model("mamba-ar")
    result = mamba_regimes(model)
    frame = result.to_frame()
    print("\n" + frame.to_string())
    assert len(frame) == model.cfg.n_layers and set(result.regimes) <= {"convergent", "divergent", "stationary"}
    for layer, regime in enumerate(result.regimes):
        assert regime == ("divergent" if result.sym_max[layer] > 0 else "convergent")
