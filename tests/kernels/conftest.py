"""Fixtures for the kernel tests: inputs in every B/C layout, tolerances, paths.

Triton runs on CPU tensors only in its interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before ``triton`` is first imported; a plain run
does not collect the Triton cases, and ``test_triton_interpreter.py`` runs
them in a subprocess with the variable set.
"""

import os

import pytest
import torch
from tests.tolerances import SCAN, assert_close as table_close

# Triton's interpreter is slow: it gets tiny sizes and a short checkpoint chunk.
SIZES = {"triton": dict(b=2, d=6, n=3, l=11)}
DEFAULT_SIZE = dict(b=2, d=6, n=4, l=137)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "numba"] + (["triton"] if INTERPRETED else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each fast path; Triton with a 4-step chunk so several chunks are crossed."""
    if request.param == "triton":
        from dynalens.kernels import scan_triton

        monkeypatch.setattr(scan_triton, "CHUNK", 4)
    return request.param


@pytest.fixture
def size(backend):
    return SIZES.get(backend, DEFAULT_SIZE)


@pytest.fixture
def assert_close():
    """Compare with the table's tolerance of ``dtype`` (the dtype of the inputs) times :data:`SCAN`."""

    def check(ours, ref, dtype, what=""):
        table_close(ours.to(ref.dtype), ref, dtype, scale=SCAN[dtype], msg=what)

    return check


@pytest.fixture
def scan_inputs():
    """A factory of selective-scan inputs: ``layout`` is 'shared', 'grouped' or 'fixed' (for B and C)."""

    def make(b, d, n, l, dtype=torch.float32, layout_B="shared", layout_C="shared", seed=0):
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

        def bc(layout):
            return {"shared": (b, n, l), "grouped": (b, 3, n, l), "fixed": (d, n)}[layout]

        return dict(
            u=randn(b, d, l),
            delta=(0.1 + torch.rand(b, d, l, generator=g, dtype=torch.float64)).to(dtype),
            A=-(0.5 + torch.rand(d, n, generator=g, dtype=torch.float64)).to(dtype),
            B=randn(*bc(layout_B)),
            C=randn(*bc(layout_C)),
            D=randn(d),
            z=randn(b, d, l),
            delta_bias=(0.5 * randn(d)).to(dtype),
            initial_state=randn(b, d, n),
        )

    return make
