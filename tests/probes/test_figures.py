"""The shared heatmap: values sent once as float32, labels once as tick text, nothing per cell but numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from plotly.io.json import to_json_plotly

from dynalens.probes.figures import heatmap
from tests.tolerances import assert_close

VALUES = np.array([[1.0, 2.5e-3, 30.0], [4.0, np.nan, 0.0]])


def draw(**kwargs):
    return heatmap(VALUES, x_labels=["a", "b", "a"], y_labels=["L0", "L1"], x_title="token", y_title="layer",
                   value_name="norm", title="t", **kwargs)  # fmt: skip


def test_hover_reads_the_axes_and_values():
    (trace,) = draw().data
    assert trace.hovertemplate == "layer: %{y}<br>token: %{x}<br>norm: %{z:.4~g}<extra></extra>"
    assert trace.customdata is None and trace.text is None
    assert list(trace.x) == [0, 1, 2] and list(trace.y) == [0, 1]
    assert trace.z.dtype == np.float32
    assert_close(np.asarray(trace.z), VALUES, equal_nan=True)  # float32 of the values


def test_log_colours_by_log10_and_hovers_the_value():
    (trace,) = draw(log=True).data
    assert "%{customdata:.4~g}" in trace.hovertemplate
    assert trace.customdata.dtype == np.float32 and trace.customdata.shape == VALUES.shape
    assert_close(np.asarray(trace.customdata), VALUES, equal_nan=True)
    z = np.asarray(trace.z, dtype=np.float64)
    assert_close(z[0], np.log10(VALUES[0]))
    assert np.isnan(z[1, 1]) and np.isnan(z[1, 2])  # NaN and non-positive cells are left blank


def test_cell_values_are_formatted_by_plotly():
    (trace,) = draw(cell_format=".2f").data
    assert trace.texttemplate == "%{z:.2f}" and trace.text is None
    (trace,) = draw(text=np.array([["x", "y", "z"], ["u", "v", "w"]], dtype=object)).data
    assert trace.texttemplate == "%{text}" and trace.text[1][2] == "w"


@pytest.mark.parametrize("log", [False, True])
def test_sent_as_typed_arrays(log):
    sent = json.loads(to_json_plotly(draw(log=log)))["data"][0]
    assert sent["z"]["dtype"] == "f4" and sent["z"]["shape"] == "2, 3"
    assert ("customdata" in sent) == log
