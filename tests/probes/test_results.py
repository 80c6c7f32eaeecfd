"""Result objects: exact save/load, tables, figures (the Results of logit_lens.py and residual.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

import dynalens as dl
from dynalens.probes import LogitLens, LogitLensResult, ResidualNorms, ResidualNormsResult, Result
from dynalens.probes.figures import token_label, token_labels
from tests.tolerances import assert_close


@dataclass(kw_only=True, eq=False)
class Scores(Result):
    """A result with optional and nested plain fields, as later analyses will have."""

    scores: Tensor
    baseline: Tensor | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def top(self, k: int = 10) -> pd.DataFrame:
        return self.to_frame().nlargest(k, "score")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"score": self.scores.reshape(-1).tolist()})

    def figure(self, **options) -> go.Figure:
        return go.Figure(go.Bar(y=self.scores.reshape(-1).tolist()))


BASE = {"model_name": "m", "architecture": "rnn", "params": {"k": 2}, "version": dl.__version__}


@pytest.fixture()
def results(tiny_llama, tokens) -> list[Result]:
    return [ResidualNorms()(tiny_llama, tokens), LogitLens(k=3)(tiny_llama, tokens)]


def assert_same(a: Result, b: Result) -> None:
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, Tensor):
            assert x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()), field.name
        elif field.name == "prompts" and x is not None:
            assert torch.equal(x.tokens, y.tokens) and torch.equal(x.mask, y.mask), field.name
            assert (x.str_tokens, x.texts, x.pad_id) == (y.str_tokens, y.texts, y.pad_id), field.name
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


def test_round_trip_of_text_prompts_of_different_lengths(tiny_llama, tmp_path):
    prompts = dl.Prompts(tiny_llama, ["The cat", "A dog ran off to the park"])
    scores = Scores(**BASE, prompts=prompts.to("cpu"), scores=torch.randn(2, 3))
    scores.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors")
    assert_same(loaded, scores)
    assert loaded.prompts.texts == ["The cat", "A dog ran off to the park"] and loaded.prompts.is_padded


def test_round_trip_of_optional_tensors_nested_fields_and_no_prompts(tmp_path):
    scores = Scores(
        **BASE, prompts=None, scores=torch.randn(2, 3, dtype=torch.float64), extra={"k": [1, 2], "note": None},
    )  # fmt: skip
    scores.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors")
    assert_same(loaded, scores)
    assert loaded.baseline is None and loaded.prompts is None
    with pytest.raises(ValueError, match="computed from weights alone: it has no prompts"):
        loaded.str_tokens()


def test_load_checks_the_type_and_the_file(results, tmp_path):
    results[0].save(tmp_path / "norms.safetensors")
    with pytest.raises(TypeError, match="holds a ResidualNormsResult, not a LogitLensResult"):
        LogitLensResult.load(tmp_path / "norms.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a dynalens record"):
        Result.load(tmp_path / "plain.safetensors")


def test_fields_that_are_not_json_are_refused(tmp_path):
    bad = Scores(**BASE, prompts=None, scores=torch.zeros(1), extra={"when": object()})
    with pytest.raises(TypeError, match="a saved field must be a tensor"):
        bad.save(tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


def test_summary_shows_shapes_not_values(results, tokens):
    lens = results[1]
    summary = lens.summary()
    assert summary.startswith("LogitLensResult(model_name=")
    assert f"top_ids=Tensor[1, {tokens.shape[1]}, 3, 3]" in summary
    assert "params={'k': 3}" in summary


# ------------------------------------------------------------------- tables
def test_to_frame_columns_and_lengths(results, tokens):
    norms, lens = results
    pos = tokens.shape[1]
    frame = norms.to_frame()
    assert list(frame.columns) == ["prompt", "position", "token", "layer", "hook", "norm"]
    assert len(frame) == 3 * pos and frame["norm"].tolist() == norms.norms.reshape(-1).tolist()
    assert frame["layer"].tolist()[:3] == ["embed", "L0", "L1"] and frame["position"].tolist()[::3] == list(range(pos))
    frame = lens.to_frame()
    assert list(frame.columns) == [
        "prompt", "position", "input_token", "layer", "hook", "rank", "token", "token_id", "prob"
    ]
    assert len(frame) == 3 * pos * 3
    assert frame["token_id"].tolist() == lens.top_ids.reshape(-1).tolist()


def test_top_orders_by_salience(results):
    norms, lens = results
    top = norms.top(4)
    assert top["norm"].tolist() == sorted(norms.norms.reshape(-1).tolist(), reverse=True)[:4]
    top = lens.top(2, position=-1)
    assert top["position"].unique().tolist() == [len(lens.str_tokens()) - 1]
    assert top["rank"].tolist() == [0, 1] * 3
    assert top["prob"].tolist() == lens.top_probs[0, -1, :, :2].reshape(-1).tolist()
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        lens.top(4)


# ------------------------------------------------------------------ figures
def test_figures_are_labelled_heatmaps(results, tokens):
    norms, lens = results
    pos = tokens.shape[1]
    expected_shapes = {
        "norms": (norms.figure(), (3, pos)),
        "lens grid": (lens.figure(), (3, pos)),
        "lens at": (lens.figure(position=2), (3, 3)),
    }
    for name, (fig, shape) in expected_shapes.items():
        assert isinstance(fig, go.Figure), name
        (trace,) = fig.data
        assert trace.type == "heatmap" and np.shape(trace.z) == shape, name
        assert "%{x}" in trace.hovertemplate and "%{y}" in trace.hovertemplate, name  # the axes' tick text
        assert "%{z:.4~g}" in trace.hovertemplate and trace.customdata is None, name  # nothing per cell but z
    assert list(norms.figure().layout.xaxis.ticktext) == token_labels(norms.str_tokens())
    assert list(norms.figure().layout.yaxis.ticktext) == ["embed", "L0", "L1"]
    assert list(lens.figure(position=2).layout.xaxis.ticktext) == ["#1", "#2", "#3"]
    assert_close(np.array(lens.figure(position=2).data[0].z), lens.top_probs[0, 2].numpy())


def test_figures_draw_one_prompt_of_a_padded_batch():
    prompts = dl.Prompts.from_ids([[5, 6, 7, 8, 9], [10, 11]])
    norms = ResidualNormsResult(
        model_name="m", architecture="transformer", params={}, prompts=prompts, version=dl.__version__,
        norms=torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3), hook_names=["blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
    )  # fmt: skip
    z = np.array(norms.figure(prompt=1).data[0].z, dtype=float)
    assert_close(z, norms.norms[1, 3:].T.numpy())  # the real columns 3 and 4 only
    (shape,) = norms.figure(prompt=1, position=-1).layout.shapes
    assert (shape.x0, shape.x1) == (0.5, 1.5)
    frame = norms.to_frame()
    assert frame.query("prompt == 1")["position"].tolist() == [0, 0, 0, 1, 1, 1]
    assert frame.query("prompt == 1")["norm"].tolist() == norms.norms[1, 3:].reshape(-1).tolist()


def test_figure_options(results):
    norms, _ = results
    z = np.array(norms.figure(log=True).data[0].z, dtype=float)
    assert_close(z, np.log10(norms.norms[0].T.double().numpy()))
    (shape,) = norms.figure(position=-1).layout.shapes
    n = len(norms.str_tokens())
    assert (shape.x0, shape.x1) == (n - 1.5, n - 0.5)
    with pytest.raises(IndexError, match=f"its positions are 0 to {n - 1}"):
        norms.figure(position=n)


def test_token_labels_are_visible_and_html_safe():
    assert token_label("<|im_start|>") == "&lt;|im_start|&gt;"
    assert token_label(" the\n") == "␣the\\n"
