"""Result objects: exact save/load, tables, figures."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from dynalens.probes import (
    LogitLens,
    MixerMatrices,
    ResidualNorms,
    Result,
    logit_lens,
    mixer_matrices,
    residual_norms,
)
from dynalens.probes.figures import token_label, token_labels


@dataclass(kw_only=True, eq=False)
class Scores(Result):
    """A result with optional and nested plain fields, as later analyses will have."""

    scores: Tensor
    baseline: Tensor | None = None
    params: dict = dataclasses.field(default_factory=dict)

    def top(self, k: int = 10):
        raise NotImplementedError

    def to_frame(self):
        raise NotImplementedError

    def figure(self, **options):
        raise NotImplementedError


@pytest.fixture()
def results(tiny_llama, tokens) -> list[Result]:
    return [
        residual_norms(tiny_llama, tokens),
        logit_lens(tiny_llama, tokens, k=3),
        mixer_matrices(tiny_llama, tokens, 1),
    ]


def assert_same(a: Result, b: Result) -> None:
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), field.name
        else:
            assert x == y, field.name


# -------------------------------------------------------------- persistence
def test_save_load_round_trip_is_exact(results, tmp_path):
    for result in results:
        path = tmp_path / f"{type(result).__name__}.safetensors"
        result.save(path)
        assert_same(type(result).load(path), result)
        assert_same(Result.load(path), result)  # the file says which type it holds
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_round_trip_of_optional_tensors_and_nested_fields(tmp_path):
    scores = Scores(
        model_name="m", architecture="rnn", tokens=torch.tensor([3, 1]), str_tokens=["a", "b"],
        scores=torch.randn(2, 3, dtype=torch.float64), params={"k": [1, 2], "note": None},
    )
    scores.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors")
    assert_same(loaded, scores)
    assert loaded.baseline is None


def test_load_checks_the_type_and_the_file(results, tmp_path):
    results[0].save(tmp_path / "norms.safetensors")
    with pytest.raises(TypeError, match="holds a ResidualNorms result, not a LogitLens"):
        LogitLens.load(tmp_path / "norms.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a dynalens result file"):
        Result.load(tmp_path / "plain.safetensors")


def test_fields_that_are_not_json_are_refused(tmp_path):
    bad = Scores(
        model_name="m", architecture="rnn", tokens=torch.tensor([1]), str_tokens=["a"],
        scores=torch.zeros(1), params={"when": object()},
    )
    with pytest.raises(TypeError, match="must be plain JSON values"):
        bad.save(tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


def test_summary_shows_shapes_not_values(results):
    lens = results[1]
    summary = lens.summary()
    assert summary.startswith("LogitLens(model_name=")
    assert f"top_ids=Tensor[3, {len(lens.str_tokens)}, 3]" in summary
    assert f"str_tokens=[{len(lens.str_tokens)} items]" in summary


# ------------------------------------------------------------------- tables
def test_to_frame_columns_and_lengths(results, tokens):
    norms, lens, mixer = results
    pos = tokens.shape[1]
    frame = norms.to_frame()
    assert list(frame.columns) == ["layer", "hook", "position", "token", "norm"]
    assert len(frame) == 3 * pos and frame["norm"].tolist() == norms.norms.reshape(-1).tolist()
    frame = lens.to_frame()
    assert list(frame.columns) == [
        "layer", "hook", "position", "input_token", "rank", "token", "token_id", "prob"
    ]
    assert len(frame) == 3 * pos * 3
    frame = mixer.to_frame()
    assert list(frame.columns) == [
        "group", "query_position", "query_token", "key_position", "key_token", "value"
    ]
    assert len(frame) == 4 * pos * (pos + 1) // 2
    assert (frame["key_position"] <= frame["query_position"]).all()


def test_top_orders_by_salience(results):
    norms, lens, mixer = results
    top = norms.top(4)
    assert top["norm"].tolist() == sorted(norms.norms.reshape(-1).tolist(), reverse=True)[:4]
    top = lens.top(2, position=-1)
    assert top["position"].unique().tolist() == [len(lens.str_tokens) - 1]
    assert top["rank"].tolist() == [0, 1] * 3
    assert top["prob"].tolist() == lens.top_probs[:, -1, :2].reshape(-1).tolist()
    top = mixer.top(5)
    largest = sorted(mixer.matrices.abs().reshape(-1).tolist(), reverse=True)[:5]
    assert top["value"].abs().tolist() == largest
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        lens.top(4)


# ------------------------------------------------------------------ figures
def test_figures_are_labelled_heatmaps(results, tokens):
    norms, lens, mixer = results
    pos = tokens.shape[1]
    expected_shapes = {
        "norms": (norms.figure(), (3, pos)),
        "lens grid": (lens.figure(), (3, pos)),
        "lens at": (lens.figure(position=2), (3, 3)),
        "mixer": (mixer.figure(group=3), (pos, pos)),
    }
    for name, (fig, shape) in expected_shapes.items():
        assert isinstance(fig, go.Figure), name
        (trace,) = fig.data
        assert trace.type == "heatmap" and np.shape(trace.z) == shape, name
        assert "%{customdata[2]}" in trace.hovertemplate, name
    assert list(norms.figure().layout.xaxis.ticktext) == token_labels(norms.str_tokens)
    assert list(norms.figure().layout.yaxis.ticktext) == ["embed", "L0", "L1"]
    assert list(lens.figure(position=2).layout.xaxis.ticktext) == ["#1", "#2", "#3"]
    z = np.array(mixer.figure(group=3).data[0].z, dtype=float)
    np.testing.assert_allclose(np.tril(z), mixer.matrices[3].numpy(), rtol=1e-6)
    assert np.isnan(z[np.triu_indices(pos, 1)]).all()  # the causal mask is blank


def test_figure_options(results):
    norms, _, mixer = results
    z = np.array(norms.figure(log=True).data[0].z, dtype=float)
    np.testing.assert_allclose(z, np.log10(norms.norms.double().numpy()), rtol=1e-6)
    (shape,) = norms.figure(position=-1).layout.shapes
    assert (shape.x0, shape.x1) == (len(norms.str_tokens) - 1.5, len(norms.str_tokens) - 0.5)
    with pytest.raises(IndexError, match="valid positions are 0 to"):
        norms.figure(position=len(norms.str_tokens))
    with pytest.raises(IndexError, match="valid groups are 0 to 3"):
        mixer.figure(group=4)


def test_token_labels_are_visible_and_html_safe():
    assert token_label("<|im_start|>") == "&lt;|im_start|&gt;"
    assert token_label(" the\n") == "␣the\\n"
