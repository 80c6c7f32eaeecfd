"""``ssd_scan``: every path against the sequential reference, and against transformers' chunked scan.

The Triton cases are collected only under ``TRITON_INTERPRET=1``
(``test_triton_interpreter.py`` runs every ``triton`` case of this folder in
such a subprocess); they use 16-step chunks so several chunks are crossed.
"""

import os

import pytest
import torch

from dynalens.kernels import ssd_scan, ssd_scan_ref
from tests.tolerances import SCAN, assert_close, assert_gradients_close

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERPRETED else [])
CHUNKS = {"torch": 8, "triton": 16}
SIZE = dict(b=2, l=20, h=4, p=3, n=5)
GROUPS = [1, 2, 4]


def make(b, l, h, p, n, g=2, dtype=torch.float32, seed=0, D_per_channel=False):
    """SSD inputs drawn in float64 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    return dict(
        x=randn(b, l, h, p),
        dt=randn(b, l, h),
        A=-(0.5 + torch.rand(h, generator=gen, dtype=torch.float64)).to(dtype),
        B=randn(b, l, g, n),
        C=randn(b, l, g, n),
        D=randn(h, p) if D_per_channel else randn(h),
        z=randn(b, l, h, p),
        dt_bias=randn(h, scale=0.5),
        initial_state=randn(b, h, p, n),
    )


OPTIONS = {
    "plain": dict(),
    "D": dict(D=True),
    "D-per-channel": dict(D=True, D_per_channel=True),
    "z": dict(z=True),
    "bias+softplus": dict(dt_bias=True, softplus=True),
    "initial_state": dict(initial_state=True),
}
ALL = dict(D=True, z=True, dt_bias=True, initial_state=True, softplus=True)


def args_of(inputs, D=False, z=False, dt_bias=False, initial_state=False, softplus=False, D_per_channel=False):
    """Keyword arguments of ``ssd_scan`` with the chosen options on (raw dt becomes positive without softplus)."""
    x = inputs
    dt = x["dt"] if softplus else x["dt"].abs()
    return dict(
        x=x["x"], dt=dt, A=x["A"], B=x["B"], C=x["C"], D=x["D"] if D else None, z=x["z"] if z else None,
        dt_bias=x["dt_bias"] if dt_bias else None, dt_softplus=softplus,
        initial_state=x["initial_state"] if initial_state else None,
    )  # fmt: skip


def close(ours, ref, dtype, what=""):
    assert_close(ours.to(ref.dtype), ref, dtype, scale=SCAN[dtype], msg=what)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def run(backend, **kwargs):
    return ssd_scan(**kwargs, backend=backend, chunk_size=CHUNKS[backend])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", GROUPS, ids=lambda g: f"g{g}")
def test_forward_matches_reference(backend, dtype, g):
    args = args_of(make(**SIZE, g=g, dtype=dtype), **ALL)
    flags = dict(return_final_state=True, return_states=True)
    ref = ssd_scan_ref(**args, **flags)
    ours = run(backend, **args, **flags)
    assert ours[0].dtype == dtype and ours[1].dtype == ref[1].dtype
    for name, o, r in zip(("y", "final_state", "states"), ours, ref):
        assert o.shape == r.shape
        close(o, r, dtype, name)


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_forward_matches_reference_with_each_option(backend, option):
    opts = OPTIONS[option]
    args = args_of(make(**SIZE, D_per_channel=opts.get("D_per_channel", False)), **opts)
    close(run(backend, **args), ssd_scan_ref(**args), torch.float32, option)


@pytest.mark.parametrize(
    "positions",
    [[-1], [0, 17, -1, 7, 7], torch.tensor([[0, 15, 19], [19, 16, 3]])],
    ids=["last", "shared-with-negatives-and-repeats", "per-row"],
)
def test_states_at_chosen_positions(backend, positions):
    args = args_of(make(**SIZE, dtype=torch.float64), **ALL)
    y, final, states = run(backend, **args, return_final_state=True, state_positions=positions)
    _, every = ssd_scan_ref(**args, return_states=True)
    idx = torch.as_tensor(positions).expand(2, -1) % SIZE["l"]
    assert states.shape == (2, idx.shape[1], 4, 3, 5)
    close(states, every[torch.arange(2)[:, None], idx], torch.float64, "states")
    close(y, ssd_scan_ref(**args), torch.float64, "y")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 20, 100])
def test_result_does_not_depend_on_the_chunk_size(chunk_size):
    args = args_of(make(**SIZE, dtype=torch.float64), **ALL)
    ref = ssd_scan_ref(**args, return_final_state=True, return_states=True)
    ours = ssd_scan(**args, return_final_state=True, return_states=True, chunk_size=chunk_size, backend="torch")
    for o, r in zip(ours, ref):
        close(o, r, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_steps_whose_decays_underflow_match_the_reference(backend, dtype):
    """dt·|A| of tens per step: decays below exp(-80) are taken as 0 (no subnormal arithmetic), a change
    far below the tolerance, and a decay of exactly 1 (dt = 0) still keeps the state."""
    x = make(**SIZE, dtype=dtype)
    args = args_of(x, **ALL)
    args["A"] = args["A"] * 20
    args["dt"] = x["dt"] + 3.0
    flags = dict(return_final_state=True, return_states=True)
    for name, o, r in zip(("y", "final", "states"), run(backend, **args, **flags), ssd_scan_ref(**args, **flags)):
        assert torch.isfinite(o).all()
        close(o, r, dtype, name)


def test_matches_transformers_chunked_scan():
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    x = make(**SIZE, dtype=torch.float32)
    hf_y, hf_last = mamba2_chunk_scan(
        x["x"], x["dt"], x["A"], x["B"], x["C"], chunk_size=8, D=x["D"], dt_bias=x["dt_bias"],
        initial_states=x["initial_state"], dt_softplus=True, return_final_states=True,
    )  # fmt: skip
    y, last = ssd_scan(**args_of(x, D=True, dt_bias=True, initial_state=True, softplus=True), return_final_state=True)
    close(y, hf_y, torch.float32, "y")
    close(last, hf_last, torch.float32, "final state")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("states", ["all", "positions"])
def test_gradients_match_reference(backend, dtype, states):
    inputs = {k: v.requires_grad_() for k, v in make(**SIZE, dtype=dtype).items()}
    args = args_of(inputs, **ALL)
    flags = dict(return_final_state=True)
    flags.update(return_states=True) if states == "all" else flags.update(state_positions=[3, -1, 17])
    ref = ssd_scan_ref(**args, **flags)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.dtype) for r in ref]

    def grads(outputs):
        loss = sum((o.to(w.dtype) * w).sum() for o, w in zip(outputs, weights))
        return torch.autograd.grad(loss, list(inputs.values()))

    for name, g, r in zip(inputs, grads(run(backend, **args, **flags)), grads(ref)):
        close(g, r, dtype, f"d{name}")


def test_gradcheck_float64():
    inputs = make(b=1, l=9, h=2, p=2, n=2, g=1, dtype=torch.float64)
    names = list(inputs)

    def fn(*tensors):
        args = args_of(dict(zip(names, tensors)), **ALL)
        return ssd_scan(**args, return_final_state=True, state_positions=[4, -1], chunk_size=4)

    tensors = [inputs[k].requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


def test_gradient_through_the_final_state_alone(backend):
    inputs = {k: v.requires_grad_() for k, v in make(**SIZE, dtype=torch.float64).items()}
    args = args_of(inputs, **ALL)
    targets = [inputs["B"], inputs["dt"], inputs["initial_state"]]
    ours = torch.autograd.grad(run(backend, **args, return_final_state=True)[1].sum(), targets)
    ref = torch.autograd.grad(ssd_scan_ref(**args, return_final_state=True)[1].sum(), targets)
    for o, r in zip(ours, ref):
        close(o, r, torch.float64, "final-state gradient")


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("path", ["ref", "torch"])
def test_zero_dt_repeats_the_state_exactly(path, grad):
    """dt = 0 (after bias and softplus) at scattered positions, chunk boundaries included (with and without autograd)."""
    x = {k: v.requires_grad_(grad) for k, v in make(**SIZE, dtype=torch.float32).items()}
    zero = torch.zeros(2, SIZE["l"], 4, dtype=torch.bool)
    zero[0, [1, 2, 8, 16, 17, 19]] = True  # 8, 16: first steps of chunks; 19: the last step
    zero[1, [5, 15, 18], 1:3] = True  # 15: the last step of a chunk; some heads only
    dt = torch.where(zero, 0.0, x["dt"].abs())
    args = dict(args_of(x, D=True, z=True, initial_state=True), dt=dt)
    y, final, states = ssd_scan(**args, return_final_state=True, return_states=True, backend=path, chunk_size=8)
    rows, ts, heads = zero.nonzero(as_tuple=True)
    assert torch.equal(states[rows, ts, heads], states[rows, ts - 1, heads])
    assert torch.equal(final[0], states[0, -1]) and torch.equal(states[0, -1], states[0, -2])


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("path", ["ref", *BACKENDS])
def test_states_out_receives_every_state(path, grad):
    """The states land in ``states_out`` (returned as it) on every path; under autograd they still carry gradients."""
    inputs = {k: v.requires_grad_(grad) for k, v in make(**SIZE, dtype=torch.float64).items()}
    args = args_of(inputs, **ALL)
    out = torch.full((2, SIZE["l"], 4, 3, 5), torch.nan, dtype=torch.float64)
    chunk = {} if path == "ref" else dict(chunk_size=CHUNKS[path])
    flags = dict(return_final_state=True, return_states=True)
    y, final, states = ssd_scan(**args, **flags, states_out=out, backend=path, **chunk)
    y_ref, final_ref, states_ref = ssd_scan_ref(**args, **flags)
    assert states is out
    close(states, states_ref, torch.float64, "states")
    close(y, y_ref, torch.float64, "y")
    close(final, final_ref, torch.float64, "final state")
    if grad:
        targets = [inputs["x"], inputs["B"], inputs["initial_state"]]
        assert_gradients_close(states, states_ref, targets, torch.float64, "gradient through the states")


def test_leading_zero_dt_keeps_the_initial_state_and_matches_the_unpadded_run(backend):
    """Left padding: dt = 0 and arbitrary x, B, C at the first k steps."""
    x = make(**SIZE, dtype=torch.float32)
    args = args_of(x, **ALL)
    pads = 17  # crosses a chunk boundary on both paths
    dt = args["dt"].clone()
    dt[:, :pads] = -torch.inf  # softplus(-inf + bias) = 0 exactly
    padded = dict(args, dt=dt)
    y, final, states = run(backend, **padded, return_final_state=True, return_states=True)
    assert torch.equal(states[:, :pads], args["initial_state"][:, None].expand(-1, pads, -1, -1, -1))
    tail = {k: (v[:, pads:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
    y_ref, final_ref = ssd_scan_ref(**tail, return_final_state=True)
    close(y[:, pads:], y_ref, torch.float32, "y after the padding")
    close(final, final_ref, torch.float32, "final state")


def test_outputs_come_in_order():
    args = args_of(make(b=1, l=9, h=2, p=2, n=3, g=1), initial_state=True)
    assert isinstance(ssd_scan(**args), torch.Tensor)
    y, states = ssd_scan(**args, return_states=True)
    y2, last, at = ssd_scan(**args, return_final_state=True, state_positions=[-1])
    assert states.shape == (1, 9, 2, 2, 3) and last.shape == (1, 2, 2, 3) and at.shape == (1, 1, 2, 2, 3)
    torch.testing.assert_close(last, states[:, -1])
    torch.testing.assert_close(at[:, 0], last)
    torch.testing.assert_close(y2, y)


def test_auto_dispatch_takes_the_chunked_path_on_cpu(monkeypatch):
    from dynalens.kernels import ssd

    calls = []
    chunked = ssd.ssd_scan_torch
    monkeypatch.setattr(ssd, "ssd_scan_torch", lambda *a: calls.append(1) or chunked(*a))
    ssd_scan(**args_of(make(b=1, l=5, h=2, p=2, n=3, g=1)))
    assert calls


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, 10, 6)), r"x must be a 4-d tensor of shape \(b, l, h, p\)"),
        (dict(dt=torch.rand(2, 9, 6)), r"dt must have shape \(b, l, h\) = \(2, 10, 6\), got \(2, 9, 6\)"),
        (dict(A=torch.rand(6, 1)), r"A must have shape \(h,\) = \(6,\)"),
        (dict(B=torch.rand(2, 10, 4, 5)), r"group count g = 4 must divide the head count h = 6"),
        (dict(B=torch.rand(2, 10, 5)), r"B must have shape \(b, l, g, n\) = \(2, 10, g, n\)"),
        (dict(C=torch.rand(2, 10, 3, 4)), r"C must have shape \(b, l, g, n\) like B = \(2, 10, 3, 5\)"),
        (dict(D=torch.rand(5)), r"D must have shape \(h,\) or \(h, p\) = \(6,\), got \(5,\)"),
        (dict(D=torch.rand(6, 4)), r"D must have shape \(h,\) or \(h, p\) = \(6, 3\)"),
        (dict(z=torch.rand(2, 10, 6)), r"z must have shape \(b, l, h, p\)"),
        (dict(dt_bias=torch.rand(2, 6)), r"dt_bias must have shape \(h,\)"),
        (dict(initial_state=torch.rand(2, 6, 3)), r"initial_state must have shape \(b, h, p, n\) = \(2, 6, 3, 5\)"),
        (dict(state_positions=[10]), r"state_positions must lie in \[-10, 10\)"),
        (dict(state_positions=[0.5]), r"state_positions must be .* got dtype torch.float32"),
        (dict(state_positions=torch.zeros(3, 2, dtype=torch.long)), r"state_positions must be .*got shape \(3, 2\)"),
        (dict(state_positions=[1], return_states=True), r"pass state_positions or return_states=True, not both"),
        (dict(chunk_size=0), r"chunk_size must be a positive int"),
        (dict(states_out=torch.empty(2, 10, 6, 3, 5)), r"states_out is written only with return_states=True"),
        (dict(states_out=torch.empty(2, 10, 6, 3, 4), return_states=True),
         r"states_out must have shape \(b, l, h, p, n\) = \(2, 10, 6, 3, 5\), got \(2, 10, 6, 3, 4\)"),
        (dict(states_out=torch.empty(2, 10, 6, 3, 5, dtype=torch.float64), return_states=True),
         r"states_out must be a contiguous tensor of the states' dtype torch.float32, got torch.float64"),
        (dict(states_out=torch.empty(2, 10, 6, 5, 3).transpose(-1, -2), return_states=True),
         r"states_out must be .* torch.float32, got torch.float32, not contiguous"),
        (dict(backend="numba"), r"backend must be one of \('auto', 'ref', 'torch', 'triton'\)"),
    ],
)
def test_wrong_arguments_name_the_argument_and_what_is_accepted(change, match):
    inputs = make(b=2, l=10, h=6, p=3, n=5, g=3)
    kwargs = dict(args_of(inputs, **ALL), **change)
    with pytest.raises(ValueError, match=match):
        ssd_scan(**kwargs)


def test_wrong_dtype_device_and_triton_on_cpu_are_errors(monkeypatch):
    args = args_of(make(b=1, l=4, h=2, p=2, n=3, g=1))
    with pytest.raises(TypeError, match=r"dt must have a floating dtype .* got torch.int64"):
        ssd_scan(**dict(args, dt=args["dt"].long()))
    with pytest.raises(ValueError, match=r"B must be on the same device as the input \(cpu\), got meta"):
        ssd_scan(**dict(args, B=args["B"].to("meta")))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend 'triton' takes CUDA tensors"):
        ssd_scan(**args, backend="triton")
