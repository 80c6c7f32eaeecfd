"""Every path of ``selective_scan`` against the sequential reference."""

import pytest
import torch

from dynalens.kernels import selective_scan, selective_scan_ref
from tests.tolerances import assert_gradients_close

LAYOUTS = [("shared", "shared"), ("grouped", "grouped"), ("fixed", "fixed"), ("grouped", "shared"), ("fixed", "shared")]
ALL = dict(D=True, z=True, delta_bias=True, initial_state=True)
OPTIONS = {
    "plain": dict(),
    "D": dict(D=True),
    "z": dict(z=True),
    "bias+softplus": dict(delta_bias=True, softplus=True),
    "initial_state": dict(initial_state=True),
    "all": dict(ALL, softplus=True),
}


def _args(inputs, D=False, z=False, delta_bias=False, initial_state=False, softplus=False):
    """Positional/keyword arguments of ``selective_scan`` with the chosen options on."""
    x = inputs
    return dict(
        u=x["u"], delta=x["delta"], A=x["A"], B=x["B"], C=x["C"],
        D=x["D"] if D else None, z=x["z"] if z else None, delta_bias=x["delta_bias"] if delta_bias else None,
        delta_softplus=softplus, initial_state=x["initial_state"] if initial_state else None,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids="-".join)
def test_forward_matches_reference_in_every_layout(backend, size, scan_inputs, assert_close, dtype, layout):
    args = _args(scan_inputs(**size, dtype=dtype, layout_B=layout[0], layout_C=layout[1]), **OPTIONS["all"])
    flags = dict(return_last_state=True, return_states=True)
    ref = selective_scan_ref(**args, **flags)
    ours = selective_scan(**args, **flags, backend=backend)
    assert ours[0].dtype == dtype
    for name, o, r in zip(("out", "last_state", "states"), ours, ref):
        assert o.shape == r.shape
        assert_close(o, r, dtype, name)


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_forward_matches_reference_with_each_option(backend, size, scan_inputs, assert_close, option):
    args = _args(scan_inputs(**size), **OPTIONS[option])
    assert_close(selective_scan(**args, backend=backend), selective_scan_ref(**args), torch.float32, option)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids="-".join)
def test_gradients_match_reference(backend, size, scan_inputs, assert_close, dtype, layout):
    inputs = scan_inputs(**size, dtype=dtype, layout_B=layout[0], layout_C=layout[1])
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    args = _args(inputs, **OPTIONS["all"])
    flags = dict(return_last_state=True, return_states=True)
    ref = selective_scan_ref(**args, **flags)
    weights = [torch.randn(r.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, r in enumerate(ref)]

    def grads(outputs):
        loss = sum((o.to(dtype) * w).sum() for o, w in zip(outputs, weights))
        return torch.autograd.grad(loss, list(inputs.values()))

    for name, g, r in zip(inputs, grads(selective_scan(**args, **flags, backend=backend)), grads(ref)):
        assert_close(g, r, dtype, f"d{name}")


def test_gradient_flows_through_the_last_state_alone(backend, size, scan_inputs, assert_close):
    inputs = {k: v.double().requires_grad_() for k, v in scan_inputs(**size).items()}
    args = _args(inputs, **OPTIONS["all"])
    _, last = selective_scan(**args, return_last_state=True, backend=backend)
    _, last_ref = selective_scan_ref(**args, return_last_state=True)
    ours, ref = (torch.autograd.grad(x.sum(), [inputs["B"], inputs["initial_state"]]) for x in (last, last_ref))
    for o, r in zip(ours, ref):
        assert_close(o, r, torch.float64, "last-state gradient")


@pytest.mark.parametrize("layout", ["shared", "grouped", "fixed"])
def test_gradcheck_float64(backend, scan_inputs, layout):
    inputs = scan_inputs(b=1, d=3, n=2, l=6, dtype=torch.float64, layout_B=layout, layout_C=layout)
    names = list(inputs)
    tensors = [inputs[k].requires_grad_() for k in names]

    def fn(*xs):
        args = _args(dict(zip(names, xs)), **OPTIONS["all"])
        return selective_scan(**args, return_last_state=True, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors, fast_mode=backend == "triton")


def test_auto_dispatch_uses_numba_on_cpu(scan_inputs, monkeypatch):
    from dynalens.kernels import scan_numba

    calls = []
    forward = scan_numba.selective_forward
    monkeypatch.setattr(scan_numba, "selective_forward", lambda *a: calls.append(1) or forward(*a))
    args = _args(scan_inputs(b=1, d=3, n=2, l=5))
    selective_scan(**args)
    assert calls


def test_single_output_is_a_tensor_and_extras_come_in_order(scan_inputs):
    args = _args(scan_inputs(b=1, d=3, n=2, l=5), initial_state=True)
    assert isinstance(selective_scan(**args), torch.Tensor)
    out, states = selective_scan(**args, return_states=True)
    out2, last, states2 = selective_scan(**args, return_last_state=True, return_states=True)
    assert states.shape == (1, 3, 5, 2) and last.shape == (1, 3, 2)
    torch.testing.assert_close(last, states[:, :, -1])
    torch.testing.assert_close(states2, states)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(u=torch.randn(2, 6)), r"u must be a 3-d tensor of shape \(b, d, l\)"),
        (dict(delta=torch.rand(2, 6, 9)), r"delta must have shape \(b, d, l\) = \(2, 6, 10\), got \(2, 6, 9\)"),
        (dict(A=torch.rand(5, 4)), r"A must have shape \(d, n\) with d = 6"),
        (dict(B=torch.rand(2, 4, 9)), r"B must be shared \(b, n, l\) = \(2, 4, 10\).*got \(2, 4, 9\)"),
        (dict(C=torch.rand(2, 4, 4, 10)), r"C must be .*grouped .*g dividing d = 6"),
        (dict(D=torch.rand(5)), r"D must have shape \(d,\) = \(6,\), got \(5,\)"),
        (dict(z=torch.rand(2, 6, 10, 1)), r"z must have shape \(b, d, l\)"),
        (dict(initial_state=torch.rand(2, 6)), r"initial_state must have shape \(b, d, n\) = \(2, 6, 4\)"),
    ],
)
def test_wrong_shapes_name_the_argument_and_the_expected_shape(scan_inputs, change, match):
    args = dict(_args(scan_inputs(b=2, d=6, n=4, l=10)), **change)
    with pytest.raises(ValueError, match=match):
        selective_scan(**args)


def test_wrong_dtype_device_and_backend_are_errors(scan_inputs, monkeypatch):
    args = _args(scan_inputs(b=2, d=6, n=4, l=10))
    with pytest.raises(TypeError, match=r"A must be real"):
        selective_scan(**dict(args, A=args["A"].to(torch.complex64)))
    with pytest.raises(TypeError, match=r"delta must have a floating dtype .* got torch.int64"):
        selective_scan(**dict(args, delta=args["delta"].long()))
    with pytest.raises(ValueError, match=r"B must be on the same device as the input \(cpu\), got meta"):
        selective_scan(**dict(args, B=args["B"].to("meta")))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        selective_scan(**args, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend 'triton' takes CUDA tensors"):
        selective_scan(**args, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids="-".join)
def test_numba_channel_blocks_match_reference(scan_inputs, assert_close, dtype, layout):
    """d = 42 channels: three blocks of 16 lanes (the last partial), groups of 14 straddling the blocks."""
    inputs = scan_inputs(b=2, d=42, n=5, l=70, dtype=dtype, layout_B=layout[0], layout_C=layout[1])
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    args = _args(inputs, **OPTIONS["all"])
    flags = dict(return_last_state=True, return_states=True)
    ref = selective_scan_ref(**args, **flags)
    ours = selective_scan(**args, **flags, backend="numba")
    for name, o, r in zip(("out", "last_state", "states"), ours, ref):
        assert_close(o, r, dtype, name)
    weights = [torch.randn(r.shape, generator=torch.Generator().manual_seed(i), dtype=dtype) for i, r in enumerate(ref)]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), list(inputs.values())) for out in (ours, ref)]
    for name, g, r in zip(inputs, *grads):
        assert_close(g, r, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_numba_takes_positive_A(scan_inputs, assert_close, dtype):
    """A real A may have positive entries (growing states): the float32 exp2 is not limited to dt·A <= 0."""
    inputs = scan_inputs(b=2, d=42, n=5, l=70, dtype=dtype)
    inputs["A"] = (torch.rand(42, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.1 - 1.0).to(dtype)
    assert (inputs["A"] > 0).any()
    args = _args(inputs, **OPTIONS["all"])
    flags = dict(return_last_state=True, return_states=True)
    for name, o, r in zip(("out", "last_state", "states"), selective_scan(**args, **flags, backend="numba"), selective_scan_ref(**args, **flags)):
        assert_close(o, r, dtype, name)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("time_major", [True, False], ids=["time-major", "channel-major"])
@pytest.mark.parametrize("path", ["ref", "torch", "numba"])
def test_states_out_receives_every_state(scan_inputs, assert_close, monkeypatch, path, time_major, grad):
    """The states land in ``states_out`` (returned as it) on every path and in either memory layout; the numba
    path without autograd writes a time-major one in place; under autograd the states still carry gradients."""
    from dynalens.kernels import scan_numba

    inputs = {k: v.requires_grad_(grad) for k, v in scan_inputs(b=2, d=20, n=5, l=70, dtype=torch.float64).items()}
    args = _args(inputs, **OPTIONS["all"])
    buffer = torch.full((2, 70, 20, 5) if time_major else (2, 20, 70, 5), torch.nan, dtype=torch.float64)
    out = buffer.transpose(1, 2) if time_major else buffer
    given = []
    forward = scan_numba.selective_forward
    monkeypatch.setattr(scan_numba, "selective_forward", lambda *a, **kw: given.append(kw) or forward(*a, **kw))
    flags = dict(return_last_state=True, return_states=True)
    ours = selective_scan(**args, **flags, states_out=out, backend=path)
    ref = selective_scan_ref(**args, **flags)
    assert ours[2] is out
    in_place = path == "numba" and time_major and not grad
    assert [kw["states"].data_ptr() for kw in given if "states" in kw] == ([buffer.data_ptr()] if in_place else [])
    assert_close(buffer.transpose(1, 2) if time_major else buffer, ref[2], torch.float64, "states in the buffer")
    for name, o, r in zip(("out", "last_state", "states"), ours, ref):
        assert_close(o, r, torch.float64, name)
    if grad:
        targets = [inputs["u"], inputs["B"], inputs["initial_state"]]
        assert_gradients_close(ours[2], ref[2], targets, torch.float64, "gradient through the states")


def test_numba_states_are_time_major(scan_inputs):
    _, states = selective_scan(**_args(scan_inputs(b=2, d=20, n=5, l=30)), return_states=True, backend="numba")
    assert states.shape == (2, 20, 30, 5) and states.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(states_out=torch.empty(2, 6, 10, 4)), r"states_out is written only with return_states=True"),
        (dict(states_out=torch.empty(2, 6, 10, 3), return_states=True),
         r"states_out must have shape \(b, d, l, n\) = \(2, 6, 10, 4\), got \(2, 6, 10, 3\)"),
        (dict(states_out=torch.empty(2, 6, 10, 4, dtype=torch.float64), return_states=True),
         r"states_out must be a tensor of the states' dtype torch.float32, got torch.float64"),
    ],
)  # fmt: skip
def test_states_out_errors_name_what_is_accepted(scan_inputs, change, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_args(scan_inputs(b=2, d=6, n=4, l=10)), **change)
