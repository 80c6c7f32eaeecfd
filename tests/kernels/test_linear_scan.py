"""Every path of ``linear_scan`` against the sequential reference and a known answer."""

import pytest
import torch

from dynalens.kernels import linear_scan, linear_scan_ref


def _inputs(b, d, l, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (2 * torch.rand(b, d, l, generator=g, dtype=torch.float64) - 1).to(dtype)  # both signs
    x = torch.randn(b, d, l, generator=g, dtype=torch.float64).to(dtype)
    h0 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    return a, x, h0


def test_known_answer():
    a, x = torch.full((1, 1, 4), 0.5), torch.tensor([[[1.0, 0.0, 2.0, 0.0]]])
    expected = torch.tensor([[[3.5, 1.75, 2.875, 1.4375]]])  # from h_{-1} = 5
    for backend in ("ref", "torch", "numba"):
        torch.testing.assert_close(linear_scan(a, x, torch.tensor([[5.0]]), backend=backend), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "initial-state"])
def test_forward_matches_reference(backend, assert_close, dtype, with_h0):
    l = 11 if backend == "triton" else 300  # crosses the PyTorch path's 256-step chunks
    a, x, h0 = _inputs(2, 5, l, dtype)
    h0 = h0 if with_h0 else None
    ours = linear_scan(a, x, h0, backend=backend)
    assert ours.dtype == dtype
    assert_close(ours, linear_scan_ref(a, x, h0), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradients_match_reference(backend, assert_close, dtype):
    l = 11 if backend == "triton" else 300
    inputs = [t.requires_grad_() for t in _inputs(2, 5, l, dtype)]
    w = torch.randn(2, 5, l, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours = torch.autograd.grad((linear_scan(*inputs, backend=backend) * w).sum(), inputs)
    ref = torch.autograd.grad((linear_scan_ref(*inputs) * w).sum(), inputs)
    for name, o, r in zip(("da", "dx", "dh0"), ours, ref):
        assert_close(o, r, dtype, name)


def test_gradcheck_float64(backend):
    inputs = [t.requires_grad_() for t in _inputs(1, 2, 6, torch.float64)]
    assert torch.autograd.gradcheck(lambda *t: linear_scan(*t, backend=backend), inputs)


def test_wrong_shapes_are_errors():
    a, x, h0 = _inputs(2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match=r"a must have shape \(b, d, l\) = \(2, 3, 4\), got \(2, 3, 5\)"):
        linear_scan(torch.rand(2, 3, 5), x)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(b, d\) = \(2, 3\)"):
        linear_scan(a, x, torch.rand(2, 3, 1))
    with pytest.raises(ValueError, match=r"x must be a 3-d tensor"):
        linear_scan(a, x[0])
