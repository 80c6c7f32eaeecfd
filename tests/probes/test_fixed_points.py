"""RNN fixed points (known answers, the zero-input attractor), trajectory PCA, kick neurons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.probes import fixed_points
from dynalens.probes.analysis import AnalysisError
from dynalens.probes.fixed_points import (
    FixedPoints,
    FixedPointsResult,
    KickNeurons,
    KickNeuronsResult,
    TrajectoryPCA,
    TrajectoryPCAResult,
    find_fixed_points,
    iterate_cell,
    recurrent_graph,
)
from dynalens.probes.results import Result
from scipy.optimize import brentq
from sklearn.decomposition import PCA
from tests.tolerances import assert_close


def elman(weight_hh: torch.Tensor) -> HookedRNN:
    """A bias-free tanh Elman layer with the given recurrent weight (our own test model)."""
    d = weight_hh.shape[0]
    model = HookedRNN(RNNConfig(d_model=d, n_layers=1, d_vocab=10, cell="tanh", bias=False)).eval()
    with torch.no_grad():
        model.blocks[0].cell.weight_hh.copy_(weight_hh)
    return model


def test_finds_all_nine_fixed_points_of_a_bistable_pair_and_which_are_stable(tmp_path):
    result = FixedPoints(n_starts=64)(elman(2 * torch.eye(2)))
    assert result.prompts is None and result.params["n_starts"] == 64
    h_star = brentq(lambda h: np.tanh(2 * h) - h, 0.5, 1.0)  # the non-zero root of h = tanh(2h)
    expected = {(a, b) for a in (-h_star, 0.0, h_star) for b in (-h_star, 0.0, h_star)}
    found = {tuple(round(v, 4) for v in p.tolist()) for p in result.points}
    assert found == {tuple(round(v, 4) for v in p) for p in expected}
    assert set(result.kinds) == {"fixed"}
    stable = result.points[torch.tensor(result.to_frame()["stable"].to_numpy())]
    assert len(stable) == 4 and (stable.abs() > 0.9).all()  # the four corners attract
    origin = int(result.points.norm(dim=1).argmin())
    torch.testing.assert_close(result.eig_real[origin], torch.tensor([2.0, 2.0]))  # dF/dh(0) = W_hh
    result.save(tmp_path / "fp.safetensors")
    loaded = Result.load(tmp_path / "fp.safetensors")
    assert isinstance(loaded, FixedPointsResult) and loaded.prompts is None and loaded.kinds == result.kinds
    torch.testing.assert_close(loaded.points, result.points, rtol=0, atol=0)


def test_jacobian_at_the_origin_has_the_recurrent_weights_eigenvalues():
    W = 0.4 * torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    result = FixedPoints(n_starts=16)(elman(W))
    assert result.points.norm(dim=1).min() < 1e-6
    origin = int(result.points.norm(dim=1).argmin())
    got = torch.complex(result.eig_real[origin], result.eig_imag[origin]).abs().sort().values
    assert_close(got, torch.linalg.eigvals(W).abs().sort().values)


def test_zero_input_trajectories_converge_to_the_attractor_the_finder_finds():
    torch.manual_seed(5)
    model = HookedRNN(RNNConfig(d_model=8, n_layers=1, d_vocab=10, cell="lstm")).eval()
    g = torch.Generator().manual_seed(6)
    cell = model.blocks[0].cell
    ends = iterate_cell(cell, 2 * torch.rand(16, 16, generator=g, dtype=torch.float64) - 1, 400)[-1]
    assert (ends - ends.mean(0)).norm(dim=1).max() < 1e-6  # one attractor
    result = FixedPoints(0, n_starts=32)(model)
    stable = result.points[result.spectral_radius < 1].double()
    assert float((stable - ends[0]).norm(dim=1).min()) <= 1e-3
    # The routine on the cell is what the experiment reports.
    found = find_fixed_points(cell, n_starts=32)
    torch.testing.assert_close(found.points.float(), result.points)


def batch(n: int = 3, pos: int = 7, seed: int = 2) -> torch.Tensor:
    """``n`` prompts of ``pos`` random ids, valid for every conftest model."""
    return torch.randint(0, 50, (n, pos), generator=torch.Generator().manual_seed(seed))


RAGGED = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]  # lengths 7, 2, 5: a left-padded batch


def test_trajectory_pca_matches_sklearn_per_prompt(tiny_rnn, tmp_path):
    result = TrajectoryPCA(1, n_components=2)(tiny_rnn, RAGGED)
    for prompt, row in enumerate(RAGGED):
        _, cache = tiny_rnn.run_with_cache([row], names_filter=[names.cell(1, "hidden")])
        hidden = cache[names.cell(1, "hidden")][0].double().numpy()
        pca = PCA(n_components=2).fit(hidden)
        reference = pca.transform(hidden)
        coords = result.coords[prompt, -len(row):].double().numpy()
        signs = np.sign((reference * coords).sum(0))
        assert_close(coords * signs, reference)
        assert_close(result.explained[prompt].double().numpy(), pca.explained_variance_ratio_)
        alone = TrajectoryPCA(1, n_components=2)(tiny_rnn, [row])
        assert_close(result.coords[prompt, -len(row):], alone.coords[0])
        defined = result.explained[prompt] > 1e-6  # a component of zero variance is any unit vector
        assert_close(result.components[prompt][defined], alone.components[0][defined])
        assert not result.coords[prompt, : 7 - len(row)].any()
    finder = FixedPoints(1, n_starts=8)
    points = finder(tiny_rnn).points
    portrait = TrajectoryPCA(1, fixed_points=points)(tiny_rnn, RAGGED)
    assert portrait.fixed_coords.shape == (3, len(points), 2) and len(portrait.figure(prompt=1).data) == 2
    expected = torch.einsum("bpd,bcd->bpc", points.double() - result.mean.double()[:, None], result.components.double())
    assert_close(portrait.fixed_coords.double(), expected, dtype=torch.float32)
    # The experiment itself as the parameter: run on the weights when the PCA is computed.
    by_experiment = TrajectoryPCA(1, fixed_points=finder)(tiny_rnn, RAGGED)
    torch.testing.assert_close(by_experiment.fixed_coords, portrait.fixed_coords)
    assert by_experiment.params["fixed_points"].startswith("FixedPoints(layer=1")
    frame = result.to_frame()
    assert list(frame.columns) == ["prompt", "position", "token", "pc1", "pc2"] and len(frame) == 14
    assert result.top(1)["prompt"].iloc[0] in (0, 1, 2)
    result.save(tmp_path / "pca.safetensors")
    loaded = Result.load(tmp_path / "pca.safetensors")
    assert isinstance(loaded, TrajectoryPCAResult)
    torch.testing.assert_close(loaded.coords, result.coords, rtol=0, atol=0)
    prompts = Prompts(tiny_rnn, RAGGED)
    analysis = TrajectoryPCA(1)
    _, own = tiny_rnn.run_with_cache(prompts, names_filter=analysis.hooks(tiny_rnn))
    torch.testing.assert_close(analysis.compute(own, prompts).coords, result.coords)


def test_shared_trajectory_pca_is_one_pca_over_every_prompt(tiny_rnn):
    result = TrajectoryPCA(0, n_components=3, shared=True)(tiny_rnn, RAGGED)
    hidden = np.concatenate([
        tiny_rnn.run_with_cache([row], names_filter=[names.cell(0, "hidden")])[1][names.cell(0, "hidden")][0].double().numpy()
        for row in RAGGED
    ])  # every prompt's real tokens, alone
    pca = PCA(n_components=3).fit(hidden)
    coords = result.to_frame()[["pc1", "pc2", "pc3"]].to_numpy()
    reference = pca.transform(hidden)
    assert_close(coords * np.sign((reference * coords).sum(0)), reference)
    assert_close(result.components[0], result.components[2])  # one prompt in two rows of a batch
    assert len(result.figure(prompt=None).data) == 3
    with pytest.raises(ValueError, match="n_components must lie in \\[1, 2\\]"):
        TrajectoryPCA(0, n_components=3)(tiny_rnn, RAGGED)


def test_kick_neurons_rank_a_planted_driver_first(tiny_rnn, tmp_path):
    model = elman(0.1 * torch.randn(6, 6, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        model.blocks[0].cell.weight_hh[:, 4] *= 20  # unit 4 pushes every other unit hard
    result = KickNeurons()(model)
    assert result.top(1)["neuron"].iloc[0] == 4 and result.prompts is None
    # Gate blocks are combined by root sum of squares (GRU: three d x d blocks).
    W = tiny_rnn.blocks[0].cell.weight_hh.detach().double().reshape(3, 8, 8)
    graph = recurrent_graph(tiny_rnn.blocks[0].cell)
    assert graph[2][5]["weight"] == pytest.approx(float(W[:, 5, 2].pow(2).sum().sqrt()))
    assert not graph.has_edge(3, 3)
    result.save(tmp_path / "kick.safetensors")
    loaded = Result.load(tmp_path / "kick.safetensors")
    assert isinstance(loaded, KickNeuronsResult) and loaded.to_frame().equals(result.to_frame())


def test_rnn_analyses_reject_other_models_and_bad_states(tiny_mamba, tiny_llama, tiny_rnn):
    for analysis in (FixedPoints(), KickNeurons()):
        with pytest.raises(AnalysisError, match="applies to rnn models, and this model is a mamba"):
            analysis(tiny_mamba)
    with pytest.raises(AnalysisError, match="needs a recurrent cell's hidden states: it applies to rnn models, and this model is a transformer"):
        TrajectoryPCA()(tiny_llama, batch(1))
    with pytest.raises(ValueError, match="state = 8"):
        iterate_cell(tiny_rnn.blocks[0].cell, torch.zeros(3, 5), 2)
    with pytest.raises(TypeError, match="expected an RNN cell"):
        find_fixed_points(tiny_rnn)
    with pytest.raises(ValueError, match="fixed_points must be a tensor \\[point, state\\] with state >= d_hidden = 8"):
        TrajectoryPCA(fixed_points=torch.zeros(3)).hooks(tiny_rnn)
    with pytest.raises(ValueError, match="a FixedPoints experiment or a tensor"):
        TrajectoryPCA(fixed_points=[0.0]).hooks(tiny_rnn)


def test_lstm_hmm_zero_input_trajectories_reach_the_attractor_the_finder_finds(zoo_model):
    model = zoo_model("lstm-hmm")
    g = torch.Generator().manual_seed(0)
    size = 2 * model.cfg.d_model
    ends = iterate_cell(model.blocks[0].cell, 2 * torch.rand(16, size, generator=g, dtype=torch.float64) - 1, 1000)[-1]
    assert (ends - ends.mean(0)).norm(dim=1).max() < 1e-6  # activity collapses to one point
    result = FixedPoints(0, n_starts=16)(model)
    stable = result.points[result.spectral_radius < 1].double()
    distance = float((stable - ends.mean(0)).norm(dim=1).min())
    print(f"lstm-hmm zero-input attractor: finder distance {distance:.2e}, {len(result.kinds)} point(s)")
    assert distance <= 1e-3


def test_a_search_on_the_same_weights_and_arguments_runs_once(monkeypatch):
    cell = elman(2 * torch.eye(2)).blocks[0].cell
    calls = []
    search = fixed_points._search
    monkeypatch.setattr(fixed_points, "_search", lambda *args: calls.append(args) or search(*args))
    first = find_fixed_points(cell, n_starts=8, seed=5)
    again = find_fixed_points(cell, n_starts=8, seed=5)
    assert len(calls) == 1 and torch.equal(again.points, first.points) and torch.equal(again.q, first.q)
    again.points.zero_()  # each caller gets its own tensors
    assert torch.equal(find_fixed_points(cell, n_starts=8, seed=5).points, first.points)
    find_fixed_points(cell, n_starts=8, seed=6)
    assert len(calls) == 2
    with torch.no_grad():
        cell.weight_hh.mul_(0.25)  # W = I/2: a contraction, the origin is the only fixed point
    moved = find_fixed_points(cell, n_starts=8, seed=5)
    assert len(calls) == 3 and len(moved.points) == 1 and float(moved.points.norm()) < 1e-6
