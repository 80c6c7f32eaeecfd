"""The Triton SSD scan on a CUDA GPU against the sequential reference in float64 on CPU.

Marked ``gpu``: deselected by default (``make test-gpu`` runs them) and failing,
not skipping, where no GPU is present. Inputs are drawn in float64 on CPU and
rounded to the tested dtype; the reference runs on the rounded values upcast to
float64. Sizes cross the masking edges: ``p`` and ``n`` not powers of two,
``l`` ending in a partial chunk, and the Mamba-2-130m head shape.
"""

import pytest
import torch

from dynalens.kernels import ssd_scan, ssd_scan_ref
from tests.tolerances import SCAN, assert_close

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SHAPES = {"odd": dict(b=2, l=301, h=6, p=24, g=3, n=20), "130m-heads": dict(b=1, l=600, h=24, p=64, g=1, n=128)}


def make(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(
        x=randn(b, l, h, p), dt=randn(b, l, h) - 2.0, A=-torch.arange(1, h + 1, dtype=torch.float64) / 4,
        B=randn(b, l, g, n), C=randn(b, l, g, n), D=randn(h), z=randn(b, l, h, p), dt_bias=randn(h) * 0.1,
        initial_state=randn(b, h, p, n) * 0.1,
    )  # fmt: skip


def to(inputs: dict, dtype: torch.dtype, device: torch.device) -> dict:
    return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("states", ["all", "positions"])
def test_forward_matches_reference(dtype, shape, states):
    rounded = to(make(**SHAPES[shape]), dtype, torch.device("cpu"))
    flags = dict(dt_softplus=True, return_final_state=True)
    flags.update(return_states=True) if states == "all" else flags.update(state_positions=[0, 77, -1])
    ref = ssd_scan_ref(**to(rounded, torch.float64, torch.device("cpu")), **flags)
    ours = ssd_scan(**to(rounded, dtype, CUDA), **flags, backend="triton")
    for name, o, r in zip(("y", "final", "states"), ours, ref):
        assert o.is_cuda and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        assert_close(o.cpu().to(r.dtype), r, dtype, scale=SCAN[dtype], msg=name)


def test_gradients_match_the_pytorch_path_on_the_gpu():
    inputs = {k: v.requires_grad_() for k, v in to(make(**SHAPES["odd"]), torch.float32, CUDA).items()}
    grads = []
    for backend in ("triton", "torch"):
        y, final = ssd_scan(**inputs, dt_softplus=True, return_final_state=True, backend=backend)
        gen = torch.Generator(device=CUDA).manual_seed(1)
        loss = (y * torch.randn(y.shape, device=CUDA, generator=gen)).sum() + final.square().sum()
        grads.append(torch.autograd.grad(loss, list(inputs.values())))
    for name, g, r in zip(inputs, *grads):
        assert_close(g, r, scale=SCAN[torch.float32], msg=f"d{name}")  # the Triton kernel on the GPU
