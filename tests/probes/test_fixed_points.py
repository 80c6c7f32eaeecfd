"""RNN fixed points (known answers, the zero-input attractor), trajectory PCA, kick neurons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.probes.fixed_points import (
    FixedPoints,
    find_fixed_points,
    iterate_cell,
    kick_neurons,
    recurrent_graph,
    trajectory_pca,
)
from dynalens.probes.results import Result
from scipy.optimize import brentq
from sklearn.decomposition import PCA


def elman(weight_hh: torch.Tensor) -> HookedRNN:
    """A bias-free tanh Elman layer with the given recurrent weight (our own test model)."""
    d = weight_hh.shape[0]
    model = HookedRNN(RNNConfig(d_model=d, n_layers=1, d_vocab=10, cell="tanh", bias=False)).eval()
    with torch.no_grad():
        model.blocks[0].cell.weight_hh.copy_(weight_hh)
    return model


def test_finds_all_nine_fixed_points_of_a_bistable_pair_and_which_are_stable(tmp_path):
    result = find_fixed_points(elman(2 * torch.eye(2)), n_starts=64)
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
    assert isinstance(Result.load(tmp_path / "fp.safetensors"), FixedPoints)


def test_jacobian_at_the_origin_has_the_recurrent_weights_eigenvalues():
    W = 0.4 * torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    result = find_fixed_points(elman(W), n_starts=16)
    assert result.points.norm(dim=1).min() < 1e-6
    origin = int(result.points.norm(dim=1).argmin())
    got = torch.complex(result.eig_real[origin], result.eig_imag[origin]).abs().sort().values
    torch.testing.assert_close(got, torch.linalg.eigvals(W).abs().sort().values, rtol=1e-5, atol=1e-6)


def test_zero_input_trajectories_converge_to_the_attractor_the_finder_finds():
    torch.manual_seed(5)
    model = HookedRNN(RNNConfig(d_model=8, n_layers=1, d_vocab=10, cell="lstm")).eval()
    g = torch.Generator().manual_seed(6)
    ends = iterate_cell(model, 0, 2 * torch.rand(16, 16, generator=g, dtype=torch.float64) - 1, 400)[-1]
    assert (ends - ends.mean(0)).norm(dim=1).max() < 1e-6  # one attractor
    result = find_fixed_points(model, 0, n_starts=32)
    stable = result.points[result.spectral_radius < 1].double()
    assert float((stable - ends[0]).norm(dim=1).min()) <= 1e-3


def test_trajectory_pca_matches_sklearn(tiny_rnn, tokens):
    result = trajectory_pca(tiny_rnn, tokens, 1, n_components=2)
    _, cache = tiny_rnn.run_with_cache(tokens, names_filter=["blocks.1.cell.hook_hidden"])
    hidden = cache["blocks.1.cell.hook_hidden"][0].double().numpy()
    pca = PCA(n_components=2).fit(hidden)
    reference = pca.transform(hidden)
    signs = np.sign((reference * result.coords.double().numpy()).sum(0))
    np.testing.assert_allclose(result.coords.double().numpy() * signs, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.explained.double().numpy(), pca.explained_variance_ratio_, rtol=1e-4)
    points = find_fixed_points(tiny_rnn, 1, n_starts=8)
    portrait = trajectory_pca(tiny_rnn, tokens, 1, fixed_points=points)
    assert portrait.fixed_coords.shape == (len(points.kinds), 2) and len(portrait.figure().data) == 2


def test_kick_neurons_rank_a_planted_driver_first(tiny_rnn):
    model = elman(0.1 * torch.randn(6, 6, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        model.blocks[0].cell.weight_hh[:, 4] *= 20  # unit 4 pushes every other unit hard
    result = kick_neurons(model)
    assert result.top(1)["neuron"].iloc[0] == 4
    # Gate blocks are combined by root sum of squares (GRU: three d x d blocks).
    W = tiny_rnn.blocks[0].cell.weight_hh.detach().double().reshape(3, 8, 8)
    graph = recurrent_graph(tiny_rnn, 0)
    assert graph[2][5]["weight"] == pytest.approx(float(W[:, 5, 2].pow(2).sum().sqrt()))
    assert not graph.has_edge(3, 3)


def test_rnn_analyses_reject_other_models_and_bad_states(tiny_mamba, tiny_rnn):
    with pytest.raises(TypeError, match="HookedRNN"):
        find_fixed_points(tiny_mamba)
    with pytest.raises(ValueError, match="state = 8"):
        iterate_cell(tiny_rnn, 0, torch.zeros(3, 5), 2)


def test_lstm_hmm_zero_input_trajectories_reach_the_attractor_the_finder_finds(zoo_model):
    model = zoo_model("lstm-hmm")
    g = torch.Generator().manual_seed(0)
    size = 2 * model.cfg.d_model
    ends = iterate_cell(model, 0, 2 * torch.rand(16, size, generator=g, dtype=torch.float64) - 1, 1000)[-1]
    assert (ends - ends.mean(0)).norm(dim=1).max() < 1e-6  # activity collapses to one point
    result = find_fixed_points(model, 0, n_starts=16)
    stable = result.points[result.spectral_radius < 1].double()
    distance = float((stable - ends.mean(0)).norm(dim=1).min())
    print(f"lstm-hmm zero-input attractor: finder distance {distance:.2e}, {len(result.kinds)} point(s)")
    assert distance <= 1e-3
