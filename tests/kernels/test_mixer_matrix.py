"""``mixer_matrix``: ``M @ u`` is the scan output, causal, per-channel selection."""

import pytest
import torch

from dynalens.kernels import mixer_matrix, selective_scan_ref

LAYOUTS = [("shared", "shared"), ("grouped", "grouped"), ("fixed", "fixed"), ("fixed", "grouped")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids="-".join)
def test_matrix_times_u_is_the_scan_output(scan_inputs, assert_close, dtype, layout):
    x = scan_inputs(b=2, d=6, n=4, l=40, dtype=dtype, layout_B=layout[0], layout_C=layout[1])
    common = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
    M = mixer_matrix(x["delta"], x["A"], x["B"], x["C"], **common, chunk_size=7)
    assert M.shape == (2, 6, 40, 40)
    y = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], **common)
    assert_close((M @ x["u"].to(M.dtype)[..., None])[..., 0], y, dtype)
    assert (M.triu(1) == 0).all()


def test_known_answer_one_channel_one_state():
    # h_t = exp(-dt) h_{t-1} + dt u_t, y_t = h_t with dt = log 2: M[t, s] = log2 * 2^-(t - s).
    delta = torch.full((1, 1, 3), torch.log(torch.tensor(2.0)).item(), dtype=torch.float64)
    A, B, C = -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1)
    M = mixer_matrix(delta, A, B, C.double())[0, 0]
    t = torch.arange(3)
    expected = torch.log(torch.tensor(2.0, dtype=torch.float64)) * 0.5 ** (t[:, None] - t[None, :]).double()
    torch.testing.assert_close(M, expected.tril())


def test_selected_channels_match_the_full_matrix(scan_inputs):
    x = scan_inputs(b=1, d=6, n=4, l=30, layout_B="grouped", layout_C="shared")
    full = mixer_matrix(x["delta"], x["A"], x["B"], x["C"], x["D"])
    some = mixer_matrix(x["delta"], x["A"], x["B"], x["C"], x["D"], channels=[4, 1])
    torch.testing.assert_close(some, full[:, [4, 1]])


def test_bad_arguments_are_errors(scan_inputs):
    x = scan_inputs(b=1, d=6, n=4, l=10)
    args = (x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 5\]"):
        mixer_matrix(*args, channels=[6])
    with pytest.raises(ValueError, match=r"channels must be a non-empty 1-d sequence of ints"):
        mixer_matrix(*args, channels=[])
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        mixer_matrix(*args, chunk_size=0)
    with pytest.raises(ValueError, match=r"C must be shared \(b, n, l\)"):
        mixer_matrix(*args[:3], x["C"][..., :5])
