"""Which path runs a scan: Triton for CUDA tensors, numba on CPU, PyTorch otherwise."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from torch import Tensor

_MODULES = {"numba": "dynalens.kernels.scan_numba", "triton": "dynalens.kernels.scan_triton"}


def available(backend: str) -> bool:
    """Whether the package behind a compiled ``backend`` is installed."""
    return importlib.util.find_spec(backend) is not None


def auto_backend(x: Tensor) -> str:
    """The fastest available path for tensors on ``x``'s device."""
    if x.is_cuda and available("triton"):
        return "triton"
    if x.device.type == "cpu" and available("numba"):
        return "numba"
    return "torch"


def compiled_path(op: str, backend: str, x: Tensor) -> ModuleType:
    """The kernel module of a compiled ``backend``; errors name what it needs."""
    if not available(backend):
        raise RuntimeError(f"{op}: backend {backend!r} needs the {backend} package; pass backend='torch'")
    if backend == "numba" and x.device.type != "cpu":
        raise ValueError(f"{op}: backend 'numba' takes CPU tensors, got {x.device}; use backend='triton' for CUDA")
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: backend 'triton' takes CUDA tensors, got {x.device}; "
            "on CPU use backend='numba', or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    return importlib.import_module(_MODULES[backend])
