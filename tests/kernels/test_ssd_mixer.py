"""``ssd_mixer_matrix``: equal to the matrix materialised from the reference scan, causal, per-head selection."""

import math

import pytest
import torch

from dynalens.kernels import ssd_mixer_matrix, ssd_scan_ref
from tests.tolerances import SCAN, assert_close


def make(b=2, l=23, h=4, g=2, n=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return dict(
        dt=randn(b, l, h),
        A=-(0.5 + torch.rand(h, generator=gen, dtype=torch.float64)).to(dtype),
        B=randn(b, l, g, n),
        C=randn(b, l, g, n),
        D=randn(h),
        dt_bias=randn(h),
    )


def materialised_from_reference(inp):
    """Column ``s`` of ``M[b, i]`` is the reference's output for a unit impulse at step ``s`` (``p = 1``)."""
    b, l, h = inp["dt"].shape
    eye = torch.eye(l, dtype=inp["dt"].dtype)  # impulse s in row s of a batch of l
    x = eye[:, :, None, None].expand(l, l, h, 1).repeat(b, 1, 1, 1)  # (b·l, l, h, 1)

    def rep(t):
        return t.repeat_interleave(l, dim=0)

    y = ssd_scan_ref(
        x, rep(inp["dt"]), inp["A"], rep(inp["B"]), rep(inp["C"]), inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True
    )  # (b·l, l, h, 1): y[b·l + s, t, i] = M[b, i, t, s]
    return y[..., 0].view(b, l, l, h).permute(0, 3, 2, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("g", [1, 2, 4], ids=lambda g: f"g{g}")
def test_matrix_equals_the_one_materialised_from_the_reference(dtype, g):
    inp = make(g=g, dtype=dtype)
    M = ssd_mixer_matrix(**inp, dt_softplus=True, chunk_size=7)
    assert M.shape == (2, 4, 23, 23)
    assert_close(M, materialised_from_reference(inp).to(M.dtype), dtype, scale=SCAN[dtype])
    assert (M.triu(1) == 0).all()


def test_matrix_times_x_is_the_scan_output_for_every_head_dim_column():
    inp = make(dtype=torch.float32)
    x = torch.randn(2, 23, 4, 3, generator=torch.Generator().manual_seed(5))
    M = ssd_mixer_matrix(**inp, dt_softplus=True)
    y = ssd_scan_ref(x, inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert_close(torch.einsum("bits,bsiq->btiq", M, x), y, scale=SCAN[torch.float32])


def test_known_answer_one_head_one_state():
    # h_t = exp(-dt) h_{t-1} + dt x_t, y_t = h_t with dt = log 2: M[t, s] = log 2 · 2^-(t - s).
    dt = torch.full((1, 3, 1), math.log(2.0), dtype=torch.float64)
    ones = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    M = ssd_mixer_matrix(dt, -torch.ones(1, dtype=torch.float64), ones, ones)[0, 0]
    t = torch.arange(3)
    expected = math.log(2.0) * 0.5 ** (t[:, None] - t[None, :]).double()
    torch.testing.assert_close(M, expected.tril())


def test_selected_heads_match_the_full_matrix():
    inp = make()
    full = ssd_mixer_matrix(**inp)
    torch.testing.assert_close(ssd_mixer_matrix(**inp, heads=[3, 0]), full[:, [3, 0]])


def test_bad_arguments_are_errors():
    inp = make()
    with pytest.raises(ValueError, match=r"heads must lie in \[0, 3\]"):
        ssd_mixer_matrix(**inp, heads=[4])
    with pytest.raises(ValueError, match=r"heads must be a non-empty 1-d sequence of ints"):
        ssd_mixer_matrix(**inp, heads=[])
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        ssd_mixer_matrix(**inp, chunk_size=0)
    with pytest.raises(ValueError, match=r"D must have shape \(h,\): one skip per head"):
        ssd_mixer_matrix(**dict(inp, D=torch.ones(4, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"group count g = 3 must divide the head count h = 4"):
        ssd_mixer_matrix(**dict(inp, B=torch.ones(2, 23, 3, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"dt must be a 3-d tensor of shape \(b, l, h\)"):
        ssd_mixer_matrix(**dict(inp, dt=inp["dt"][0]))
