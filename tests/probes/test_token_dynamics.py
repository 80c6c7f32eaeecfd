"""Token dynamics: the regime criterion against simulation, the limit ODE against the kernels and the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynalens.kernels import mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import AnalysisError, run
from dynalens.probes.fixed_points import TrajectoryPCA
from dynalens.probes.mixer import MixerMatrix
from dynalens.probes.mixers import MixerComparison, RecurrenceJacobian
from dynalens.probes.results import Result
from dynalens.probes.ssd_dynamics import SSDSystem
from dynalens.probes.stability import LyapunovExponents
from dynalens.probes.token_dynamics import (
    MambaRegimes,
    MambaRegimesResult,
    SelectiveSystem,
    TokenImportance,
    TokenImportanceResult,
    TokenTrajectories,
    TokenTrajectoriesResult,
    psd_bc_rows,
    reorder_tokens,
    simulate_tokens,
    soft_sort,
)
from tests.tolerances import assert_close


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
        assert_close(velocity[s], torch.einsum("dts,sd->td", M, xs))


def test_mamba_layer_system_reproduces_the_models_scan(tiny_mamba, tokens):
    hooks = [names.mixer(1, "conv"), names.mixer(1, "y")]
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter=hooks)
    u, y = (cache[name].double() for name in hooks)
    system = SelectiveSystem.from_mamba(tiny_mamba, 1)
    skip = tiny_mamba.blocks[1].mixer.D.double() * u
    assert_close(system.velocity(u) + skip, y, dtype=torch.float32)  # y: the model's float32 scan


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
    result = MambaRegimes()(tiny_mamba)
    assert result.prompts is None and result.params == {"rtol": 1e-9}
    frame = result.to_frame()
    assert list(frame["layer"]) == [0, 1] and list(frame["layer_type"]) == ["mamba", "mamba"]
    assert result.group_regimes == [[regime] for regime in result.regimes]
    for layer, regime in enumerate(result.regimes):
        system = SelectiveSystem.from_mamba(tiny_mamba, layer)
        sym = torch.linalg.eigvalsh((system.mu[0] + system.mu[0].T) / 2)
        assert regime == ("divergent" if sym.max() > 0 else "convergent")
        assert_close(float(result.sym_max[layer]), float(sym.max()))
        # The non-zero spectrum of S_C^T S_B is that of S_B S_C^T.
        full = torch.linalg.eigvals(system.mu[0])
        nonzero = full[full.abs() > 1e-8].real.sort().values
        assert_close(result.eig_real[layer].double().sort().values, nonzero, dtype=torch.float32)
    result.save(tmp_path / "regimes.safetensors")
    loaded = Result.load(tmp_path / "regimes.safetensors")
    assert isinstance(loaded, MambaRegimesResult) and loaded.regimes == result.regimes
    assert loaded.definite == result.definite and loaded.prompts is None
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


def batch(n: int = 3, pos: int = 6, seed: int = 2) -> torch.Tensor:
    """``n`` prompts of ``pos`` random ids, valid for every conftest model."""
    return torch.randint(0, 50, (n, pos), generator=torch.Generator().manual_seed(seed))


RAGGED = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8], [9]]  # lengths 6, 2, 4, 1: a left-padded batch


def test_importance_score_is_the_step_size_pre_activation(tiny_mamba, tmp_path):
    ids = batch()
    _, cache = tiny_mamba.run_with_cache(ids, names_filter=[names.mixer(0, "delta")])
    delta = cache[names.mixer(0, "delta")]
    for channel in (0, 5):
        readout = torch.zeros(tiny_mamba.cfg.d_inner)
        readout[channel] = 1.0
        result = TokenImportance(0, readout=readout)(tiny_mamba, ids)
        assert_close(F.softplus(result.scores), delta[..., channel])
    mean = TokenImportance(0)(tiny_mamba, RAGGED)
    highest = max(float(mean.scores[p, -len(row):].max()) for p, row in enumerate(RAGGED))  # real tokens only
    assert mean.top(1)["score"].iloc[0] == pytest.approx(highest)
    for prompt, row in enumerate(RAGGED):
        n = len(row)
        torch.testing.assert_close(mean.permutation[prompt, -n:, -n:], soft_sort(mean.scores[prompt, -n:].double()).float())
        alone = TokenImportance(0)(tiny_mamba, [row])
        assert_close(mean.scores[prompt, -n:], alone.scores[0])
        assert_close(mean.permutation[prompt, -n:, -n:], alone.permutation[0])
        assert not mean.scores[prompt, : 6 - n].any() and not mean.permutation[prompt, : 6 - n].any()
    frame = mean.to_frame()
    assert list(frame.columns) == ["prompt", "position", "token", "score", "rank"]
    assert sorted(frame.loc[frame["prompt"] == 2, "rank"]) == list(range(4))
    top = frame.loc[frame["rank"] == 0].set_index("prompt")["position"]
    expected = [int(mean.scores[p, -len(row):].argmax()) for p, row in enumerate(RAGGED)]
    assert top.tolist() == expected
    mean.save(tmp_path / "importance.safetensors")
    loaded = Result.load(tmp_path / "importance.safetensors")
    assert isinstance(loaded, TokenImportanceResult)
    torch.testing.assert_close(loaded.permutation, mean.permutation, rtol=0, atol=0)
    with pytest.raises(ValueError, match="readout must have shape \\[d_inner\\] = \\[32\\]"):
        TokenImportance(0, readout=torch.ones(3)).hooks(tiny_mamba)


def test_mamba_analyses_reject_other_architectures(tiny_rnn, tiny_llama):
    with pytest.raises(AnalysisError, match="needs a selective SSM's B, C and step-size projections: it applies to "
                                            "mamba, mamba2, hybrid models, and this model is a rnn"):  # fmt: skip
        MambaRegimes()(tiny_rnn)
    with pytest.raises(AnalysisError, match="it applies to mamba, mamba2, hybrid models, and this model is a transformer"):
        TokenImportance(0)(tiny_llama, batch(1))
    with pytest.raises(TypeError, match="takes a Mamba, got a rnn"):
        SelectiveSystem.from_mamba(tiny_rnn, 0)


def test_trajectories_are_the_stream_norms_and_their_log_slope(any_model, tmp_path):
    ids = batch()
    result = TokenTrajectories()(any_model, ids)
    hooks = names.resid_stream(any_model.cfg.n_layers)
    _, cache = any_model.run_with_cache(ids, names_filter=hooks)
    expected = torch.stack([cache[name].norm(dim=-1) for name in hooks], dim=-1)
    assert_close(result.norms, expected)
    depth = np.arange(len(hooks))
    for b, p in ((0, 0), (2, 3)):
        slope = np.polyfit(depth, np.log(result.norms[b, p].double().numpy()), 1)[0]
        assert_close(float(result.growth[b, p]), slope)
    prompts = Prompts(any_model, ids)
    torch.testing.assert_close(TokenTrajectories().compute(cache, prompts).norms, result.norms)
    with pytest.raises(AnalysisError, match="cache does not hold"):
        TokenTrajectories().compute(any_model.run_with_cache(ids, names_filter=hooks[:1])[1], prompts)
    figure = result.figure(prompt=2)
    assert len(figure.data) == ids.shape[1]
    assert list(figure.data[0].x) == list(range(len(hooks)))  # layer indices; their names once, as tick text
    assert len(figure.layout.xaxis.ticktext) == len(hooks) and figure.layout.xaxis.ticktext[0] == "embed"


def test_trajectories_of_a_ragged_batch_are_each_prompts_own(any_model, tmp_path):
    result = TokenTrajectories()(any_model, RAGGED)
    for i, row in enumerate(RAGGED):
        n, alone = len(row), TokenTrajectories()(any_model, [row])
        assert_close(result.norms[i, -n:], alone.norms[0])
        assert_close(result.growth[i, -n:], alone.growth[0])
        assert not result.norms[i, : 6 - n].any() and not result.growth[i, : 6 - n].any()
    hooks = names.resid_stream(any_model.cfg.n_layers)
    frame = result.to_frame()
    assert list(frame.columns) == ["prompt", "position", "token", "layer", "layer_type", "norm", "growth"]
    assert len(frame) == (6 + 2 + 4 + 1) * len(hooks) and frame["layer"].iloc[0] == "embed"
    assert frame["layer_type"].iloc[0] == "embed" and frame["layer_type"].iloc[1] == result.layer_types[0]
    assert frame.groupby("prompt")["position"].max().tolist() == [5, 1, 3, 0]
    assert result.top(1)["growth"].iloc[0] == pytest.approx(float(frame["growth"].max()))
    result.save(tmp_path / "traj.safetensors")
    loaded = Result.load(tmp_path / "traj.safetensors")
    assert isinstance(loaded, TokenTrajectoriesResult) and loaded.hook_names == hooks
    torch.testing.assert_close(loaded.growth, result.growth, rtol=0, atol=0)


def test_one_forward_runs_the_mamba_analyses_as_each_alone(tiny_mamba):
    ids = RAGGED
    analyses = [TokenTrajectories(), TokenImportance(1), LyapunovExponents(1, k=2), MixerMatrix(0), MambaRegimes()]
    together = run(tiny_mamba, ids, analyses)
    assert list(together) == ["token_trajectories", "token_importance", "lyapunov_exponents", "mixer_matrix", "mamba_regimes"]
    for analysis in analyses:
        alone = analysis(tiny_mamba, ids)
        for field in ("norms", "scores", "running", "matrices", "sym_max"):
            if hasattr(alone, field):
                torch.testing.assert_close(getattr(together[analysis], field), getattr(alone, field))


def test_mamba_ar_regime_of_every_layer(zoo_model):
    model = zoo_model("mamba-ar")
    result = MambaRegimes()(model)
    frame = result.to_frame()
    print("\n" + frame.to_string())
    assert len(frame) == model.cfg.n_layers and set(result.regimes) <= {"convergent", "divergent", "stationary"}
    for layer, regime in enumerate(result.regimes):
        assert regime == ("divergent" if result.sym_max[layer] > 0 else "convergent")


def garbage_at_pads(cache, prompts: Prompts) -> None:
    """Overwrite every cached value at a pad position (query or key of a pattern) with large numbers."""
    pad = ~prompts.mask
    g = torch.Generator().manual_seed(0)
    for name in list(cache.keys()):
        t = cache[name]
        noise = 1e3 * torch.randn(t.shape, generator=g).to(t.dtype)
        if name.endswith("hook_pattern"):
            where = pad[:, None, :, None] | pad[:, None, None, :]
        else:
            where = pad.reshape(*pad.shape, *([1] * (t.dim() - 2)))
        t.copy_(torch.where(where, noise, t))


PAD_CASES = {
    "mixer": (("tiny_llama", "tiny_mamba", "tiny_rnn"), lambda: MixerMatrix(1)),
    "mixer-channels": (("tiny_mamba",), lambda: MixerMatrix(1, channels=[0, 7], include_skip=True)),
    "comparison": (("tiny_llama", "tiny_mamba", "tiny_rnn"), lambda: MixerComparison(1)),
    "jacobian": (("tiny_rnn",), lambda: RecurrenceJacobian(1)),
    "lyapunov": (("tiny_mamba", "tiny_mamba2", "tiny_rnn"), lambda: LyapunovExponents(1, k=2)),
    "lyapunov-hybrid": (("tiny_hybrid",), lambda: LyapunovExponents(2, k=2)),
    "trajectories": (("tiny_llama", "tiny_mamba", "tiny_mamba2", "tiny_hybrid", "tiny_rnn"), TokenTrajectories),
    "importance": (("tiny_mamba", "tiny_mamba2"), lambda: TokenImportance(1)),
    "importance-hybrid": (("tiny_hybrid",), lambda: TokenImportance(2)),
    "pca": (("tiny_rnn",), lambda: TrajectoryPCA(1, n_components=1)),
}


@pytest.mark.parametrize(
    "model_name, make",
    [(model, make) for models, make in PAD_CASES.values() for model in models],
    ids=[f"{case}-{model}" for case, (models, _) in PAD_CASES.items() for model in models],
)
def test_values_at_pad_positions_never_reach_a_result(model_name, make, request):
    model, analysis = request.getfixturevalue(model_name), make()
    prompts = Prompts(model, RAGGED)
    _, cache = model.run_with_cache(prompts, names_filter=analysis.hooks(model))
    clean = analysis.compute(cache, prompts)
    garbage_at_pads(cache, prompts)
    dirty = analysis.compute(cache, prompts)
    for field in dataclasses.fields(clean):
        value = getattr(clean, field.name)
        if isinstance(value, torch.Tensor):
            assert_close(getattr(dirty, field.name), value, msg=field.name)
    assert clean.to_frame().equals(dirty.to_frame())


# --------------------------------------------------------------------------- Mamba-2 and hybrids
def constructed_mamba2(signs: tuple[float, ...]):
    """A random HookedMamba2 with one group per sign whose ``in_proj`` C rows are ``sign`` times its B rows,
    so that ``mu_g = sign_g S_B^gT S_B^g`` is semi-definite of that sign."""
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    torch.manual_seed(3)
    cfg = Mamba2Config(d_model=8, n_layers=1, d_vocab=50, n_heads=2, d_head=8, d_state=4, n_groups=len(signs))
    model = HookedMamba2(cfg).eval()
    W = model.blocks[0].mixer.in_proj.weight
    start, gn = 2 * cfg.d_inner, cfg.n_groups * cfg.d_state
    with torch.no_grad():
        for g, sign in enumerate(signs):
            rows = slice(start + g * cfg.d_state, start + (g + 1) * cfg.d_state)
            W[start + gn + g * cfg.d_state : start + gn + (g + 1) * cfg.d_state] = sign * W[rows]
    return model


@pytest.mark.parametrize(
    "signs, regime, groups",
    [((-1.0,), "convergent", ["convergent"]), ((1.0,), "divergent", ["divergent"]),
     ((1.0, -1.0), "divergent", ["divergent", "convergent"])],
)  # fmt: skip
def test_mamba2_regime_follows_the_sign_of_each_groups_form(signs, regime, groups):
    result = MambaRegimes()(constructed_mamba2(signs))
    assert result.regimes == [regime] and result.group_regimes == [groups]
    assert result.definite == [len(set(signs)) == 1]
    assert result.layer_types == ["mamba2"] and result.delta0.shape == (1, 2)


@pytest.mark.parametrize("model_name, layers", [("tiny_mamba2", [0, 1]), ("tiny_hybrid", [0, 2])])
def test_mamba_regimes_of_mamba2_and_hybrid_ssm_layers(model_name, layers, request, tmp_path):
    model = request.getfixturevalue(model_name)
    result = MambaRegimes()(model)
    assert result.layers == layers and result.layer_types == ["mamba2"] * len(layers)
    for row, layer in enumerate(layers):
        mixer = model.blocks[layer].mixer
        system = SSDSystem.from_mixer(mixer)
        mu = system.mu[0]  # [group, d_inner, d_inner]
        sym = torch.linalg.eigvalsh((mu + mu.transpose(1, 2)) / 2)
        assert result.group_regimes[row] == ["divergent" if lam.max() > 0 else "convergent" for lam in sym]
        assert_close(float(result.sym_max[row]), float(sym.max()))
        full = torch.linalg.eigvals(mu).reshape(-1)  # the non-zero spectrum of each group's mu
        nonzero = full[full.abs() > 1e-8].real.sort().values
        assert_close(result.eig_real[row].double().sort().values, nonzero, dtype=torch.float32)
        torch.testing.assert_close(result.delta0[row], F.softplus(mixer.dt_bias.detach()))
    frame = result.to_frame()
    assert list(frame["layer"]) == layers and set(frame["layer_type"]) == {"mamba2"}
    result.save(tmp_path / "regimes.safetensors")
    loaded = Result.load(tmp_path / "regimes.safetensors")
    assert loaded.group_regimes == result.group_regimes and loaded.layers == layers
    assert [trace.name.split(" · ")[0] for trace in result.figure().data] == [f"L{layer}" for layer in layers]


def test_mamba2_importance_score_is_the_step_size_pre_activation(tiny_mamba2):
    ids = batch()
    _, cache = tiny_mamba2.run_with_cache(ids, names_filter=[names.mixer(1, "dt")])
    for head in (0, 3):
        readout = torch.zeros(tiny_mamba2.cfg.n_heads)
        readout[head] = 1.0
        result = TokenImportance(1, readout=readout)(tiny_mamba2, ids)
        torch.testing.assert_close(F.softplus(result.scores), cache[names.mixer(1, "dt")][..., head])
        assert result.layer_type == "mamba2"
    with pytest.raises(ValueError, match="readout must have shape \\[n_heads\\] = \\[4\\] at this mamba2 layer"):
        TokenImportance(0, readout=torch.ones(32)).hooks(tiny_mamba2)


def test_hybrid_analyses_read_its_ssm_layers_and_name_each_layers_type(tiny_hybrid):
    for analysis in (TokenImportance(1), LyapunovExponents(1)):
        with pytest.raises(AnalysisError, match="layer 1 of this hybrid is 'attention': its SSM layers are \\[0, 2\\]"):
            analysis(tiny_hybrid, RAGGED)
    trajectories = TokenTrajectories()(tiny_hybrid, RAGGED)
    assert trajectories.layer_types == ["mamba2", "attention", "mamba2"]
    frame = trajectories.to_frame()
    assert frame.loc[frame["layer"] == "L1", "layer_type"].unique().tolist() == ["attention"]
    assert LyapunovExponents(2)(tiny_hybrid, RAGGED).layer_type == "mamba2"


@pytest.mark.parametrize("model_name, layer", [("tiny_mamba2", 1), ("tiny_hybrid", 2)])
def test_one_forward_runs_the_ssd_analyses_as_each_alone(model_name, layer, request):
    model = request.getfixturevalue(model_name)
    analyses = [TokenTrajectories(), TokenImportance(layer), LyapunovExponents(layer, k=3), MambaRegimes()]
    together = run(model, RAGGED, analyses)
    for analysis in analyses:
        alone = analysis(model, RAGGED)
        for field in ("norms", "scores", "running", "sym_max"):
            if hasattr(alone, field):
                torch.testing.assert_close(getattr(together[analysis], field), getattr(alone, field))


def test_a_hybrids_mamba_layers_are_read_as_mamba_layers():
    """Jamba interleaves Mamba-1 (S6) layers with attention: the S6 criterion and closed form apply to them."""
    from transformers import JambaConfig, JambaForCausalLM

    from dynalens.models.hybrid import HookedHybrid

    torch.manual_seed(0)
    config = JambaConfig(
        vocab_size=50, hidden_size=32, pad_token_id=0, bos_token_id=None, eos_token_id=None, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
    )  # fmt: skip
    model = HookedHybrid.from_hf(JambaForCausalLM(config).eval())
    regimes = MambaRegimes()(model)
    assert regimes.layers == [0, 2] and regimes.layer_types == ["mamba", "mamba"]
    system = SelectiveSystem.from_mixer(model.blocks[2].mixer)
    sym = torch.linalg.eigvalsh((system.mu[0] + system.mu[0].T) / 2)
    assert_close(float(regimes.sym_max[1]), float(sym.max()))
    ids = batch(2, 5)
    result = LyapunovExponents(2, k=3)(model, ids)
    _, cache = model.run_with_cache(ids, names_filter=[names.mixer(2, "delta")])
    log_decay = cache[names.mixer(2, "delta")].double()[..., None] * model.blocks[2].mixer.A.double()
    expected = log_decay.mean(1).flatten(1).sort(dim=1, descending=True).values[:, :3]
    assert_close(result.exponents.double(), expected, dtype=torch.float32)
    assert result.layer_type == "mamba" and TokenImportance(0)(model, ids).layer_type == "mamba"
