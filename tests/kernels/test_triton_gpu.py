"""The Triton scans on a CUDA GPU against the sequential reference in float64 on CPU.

Marked ``gpu``: deselected by default (``make test-gpu`` runs them) and failing,
not skipping, where no GPU is present. The inputs are drawn in float64 on CPU,
rounded to the tested dtype, and the reference runs on those rounded values
upcast to float64, so the comparison measures the kernel's arithmetic alone.
Sizes cross every masking edge: ``d`` not a multiple of the channel block,
``n`` not a power of two, ``l`` ending in a partial chunk, and ``l`` within one
chunk (the forward's single-launch case). Every output buffer is allocated
from a cache poisoned with NaN, so an element the kernels never write fails.
"""

import pytest
import torch

from dynalens.kernels import linear_scan, linear_scan_ref, scan_triton, selective_scan, selective_scan_ref

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
LAYOUTS = [("shared", "shared"), ("grouped", "grouped"), ("fixed", "fixed"), ("grouped", "shared"), ("fixed", "shared")]
OPTIONS = ["D", "z", "delta_bias", "initial_state"]
RETURNS = {"out": (False, False), "last": (True, False), "states": (False, True), "both": (True, True)}


@pytest.fixture(autouse=True)
def _poison_cuda_cache():
    """Fill the allocator's free blocks with NaN so unwritten outputs show."""
    big = torch.full((64 << 20,), float("nan"), device=CUDA)
    small = [torch.full((1 << 16,), float("nan"), device=CUDA) for _ in range(64)]
    del big, small
    yield


def _to(x: dict, dtype: torch.dtype, device: torch.device) -> dict:
    return {k: v.to(device=device, dtype=dtype) for k, v in x.items()}


def _select(x: dict, options) -> dict:
    return {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C") or k in options}


def _run(x: dict, softplus: bool, returns: tuple[bool, bool], backend: str) -> tuple:
    out = selective_scan(**x, delta_softplus=softplus, return_last_state=returns[0], return_states=returns[1], backend=backend)
    return out if isinstance(out, tuple) else (out,)


def _compare(ours: tuple, ref: tuple, dtype, assert_close, what: str) -> None:
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o.device.type == "cuda" and o.shape == r.shape
        assert torch.isfinite(o).all(), f"{what}[{i}]: non-finite values (an unwritten element?)"
        assert_close(o.cpu(), r, dtype, f"{what}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids="-".join)
@pytest.mark.parametrize("l", [37, 300], ids=lambda l: f"l{l}")
def test_forward_matches_reference_in_every_layout(scan_inputs, assert_close, dtype, layout, l):
    x64 = scan_inputs(b=2, d=42, n=5, l=l, dtype=torch.float64, layout_B=layout[0], layout_C=layout[1])
    x64 = _to(x64, dtype, torch.device("cpu"))  # the tested dtype's rounding, shared by both sides
    ref = _run(_to(x64, torch.float64, torch.device("cpu")), True, (True, True), "ref")
    ours = _run(_to(x64, dtype, CUDA), True, (True, True), "triton")
    assert ours[0].dtype == dtype
    _compare(ours, ref, dtype, assert_close, "forward")


@pytest.mark.parametrize("options", [(), *[(o,) for o in OPTIONS], tuple(OPTIONS)], ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("softplus", [False, True], ids=["raw-delta", "softplus"])
@pytest.mark.parametrize("returns", RETURNS.values(), ids=RETURNS.keys())
def test_forward_with_each_option_and_return(scan_inputs, assert_close, options, softplus, returns):
    x = _select(scan_inputs(b=2, d=42, n=16, l=300, dtype=torch.float64), options)
    if not softplus and "delta_bias" in x:  # keep raw steps positive: a negative step grows the state past float32
        x["delta_bias"] = x["delta_bias"].abs()
    ref = _run(x, softplus, returns, "ref")
    ours = _run(_to(x, torch.float32, CUDA), softplus, returns, "triton")
    _compare(ours, ref, torch.float32, assert_close, "forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids="-".join)
@pytest.mark.parametrize("returns", RETURNS.values(), ids=RETURNS.keys())
def test_gradients_to_every_input_match_reference_autograd(scan_inputs, assert_close, dtype, layout, returns):
    x = scan_inputs(b=2, d=42, n=5, l=300, dtype=torch.float64, layout_B=layout[0], layout_C=layout[1])
    x = _to(_to(x, dtype, torch.device("cpu")), torch.float64, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    ref_out = _run({k: v.requires_grad_() for k, v in x.items()}, True, returns, "ref")
    weights = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref_out]
    ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref_out, weights)), list(x.values()))
    xc = {k: v.detach().to(CUDA, dtype).requires_grad_() for k, v in x.items()}
    ours_out = _run(xc, True, returns, "triton")
    loss = sum((o.double() * w.to(CUDA)).sum() for o, w in zip(ours_out, weights))
    ours = torch.autograd.grad(loss, list(xc.values()))
    for name, o, r in zip(x, ours, ref):
        assert o.dtype == dtype and torch.isfinite(o).all(), f"d{name}"
        # Gradients summed over l (dA, dD, d delta_bias, fixed dB/dC) scale with l; compare relative to their size.
        scale = max(1.0, r.abs().max().item() / 10)
        assert_close(o.cpu().double() / scale, r / scale, dtype, f"d{name}")


@pytest.mark.parametrize("chunk, block_d, num_warps", [(64, 16, 4), (128, 4, 2), (512, 1, 1)])
def test_forward_and_gradients_with_other_launch_parameters(scan_inputs, assert_close, monkeypatch, chunk, block_d,
                                                           num_warps):  # fmt: skip
    params = dict(CHUNK=chunk, BLOCK_D=block_d, NUM_WARPS=num_warps, BLOCK_D_BWD=block_d, NUM_WARPS_BWD=num_warps)
    for name, value in params.items():
        monkeypatch.setattr(scan_triton, name, value)
    x = scan_inputs(b=2, d=42, n=16, l=1100, dtype=torch.float64, layout_B="grouped", layout_C="shared")
    ref_out = _run({k: v.requires_grad_() for k, v in x.items()}, True, (True, False), "ref")
    xc = {k: v.detach().to(CUDA, torch.float32).requires_grad_() for k, v in x.items()}
    ours_out = _run(xc, True, (True, False), "triton")
    _compare(tuple(o.detach() for o in ours_out), tuple(r.detach() for r in ref_out), torch.float32, assert_close, "fwd")
    ref = torch.autograd.grad(ref_out[0].sum() + ref_out[1].sum(), list(x.values()))
    ours = torch.autograd.grad(ours_out[0].sum() + ours_out[1].sum(), list(xc.values()))
    for name, o, r in zip(x, ours, ref):
        scale = max(1.0, r.abs().max().item() / 10)
        assert_close(o.cpu().double() / scale, r / scale, torch.float32, f"d{name}")


def test_gradient_through_the_last_state_alone(scan_inputs, assert_close):
    x = scan_inputs(b=2, d=42, n=16, l=300, dtype=torch.float64)
    ref_last = _run({k: v.requires_grad_() for k, v in x.items()}, True, (True, False), "ref")[1]
    ref = torch.autograd.grad(ref_last.sum(), list(x.values()), allow_unused=True)
    xc = {k: v.detach().to(CUDA, torch.float32).requires_grad_() for k, v in x.items()}
    ours = torch.autograd.grad(_run(xc, True, (True, False), "triton")[1].sum(), list(xc.values()), allow_unused=True)
    for name, o, r in zip(x, ours, ref):
        # C, D and z do not reach the state: no gradient, or a zero one.
        r = torch.zeros_like(x[name]) if r is None else r
        o = torch.zeros_like(r) if o is None else o.cpu().double()
        scale = max(1.0, r.abs().max().item() / 10)
        assert_close(o / scale, r / scale, torch.float32, f"d{name}")


def test_mamba_size_forward_matches_reference_and_is_deterministic(assert_close):
    """``b=1, d=1536, n=16, l=2048`` (the benchmark's size): many programs and chunks at once."""
    g = torch.Generator().manual_seed(0)
    b, d, n, l = 1, 1536, 16, 2048
    x = dict(
        u=torch.randn(b, d, l, generator=g, dtype=torch.float64),
        delta=torch.randn(b, d, l, generator=g, dtype=torch.float64) - 4.0,
        A=-torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1),
        B=torch.randn(b, n, l, generator=g, dtype=torch.float64),
        C=torch.randn(b, n, l, generator=g, dtype=torch.float64),
        D=torch.ones(d, dtype=torch.float64),
        z=torch.randn(b, d, l, generator=g, dtype=torch.float64),
        delta_bias=torch.rand(d, generator=g, dtype=torch.float64) * 0.1,
    )
    ref = _run(x, True, (True, False), "ref")
    xc = _to(x, torch.float32, CUDA)
    ours = _run(xc, True, (True, False), "triton")
    _compare(ours, ref, torch.float32, assert_close, "forward")
    again = _run(xc, True, (True, False), "triton")
    for o, a in zip(ours, again):
        assert torch.equal(o, a), "two runs on the same inputs differ: a race"


def test_auto_backend_takes_triton_for_cuda_tensors(scan_inputs, monkeypatch):
    calls = []
    forward = scan_triton.selective_forward
    monkeypatch.setattr(scan_triton, "selective_forward", lambda *a: calls.append(1) or forward(*a))
    x = _to(scan_inputs(b=1, d=4, n=3, l=9, dtype=torch.float64), torch.float32, CUDA)
    selective_scan(**x)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "initial-state"])
def test_linear_scan_forward_and_gradients_match_reference(assert_close, dtype, with_h0):
    g = torch.Generator().manual_seed(0)
    b, d, l = 3, 50, 700
    a = (2 * torch.rand(b, d, l, generator=g, dtype=torch.float64) - 1).to(dtype).double()
    x = torch.randn(b, d, l, generator=g, dtype=torch.float64).to(dtype).double()
    h0 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).double() if with_h0 else None
    inputs = [t for t in (a, x, h0) if t is not None]
    w = torch.randn(b, d, l, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref = linear_scan_ref(*ref_in, *([None] * (3 - len(inputs))))
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    ours_in = [t.to(CUDA, dtype).requires_grad_() for t in inputs]
    ours = linear_scan(*ours_in, backend="triton")
    ours_grads = torch.autograd.grad((ours.double() * w.to(CUDA)).sum(), ours_in)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    assert_close(ours.cpu(), ref, dtype, "states")
    for name, o, r in zip(("da", "dx", "dh0"), ours_grads, ref_grads):
        assert torch.isfinite(o).all(), name
        assert_close(o.cpu(), r, dtype, name)
