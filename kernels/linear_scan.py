"""The linear recurrence ``h_t = a_t * h_{t-1} + x_t``: RNN and linear-attention building block."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from dynalens.kernels.autograd import LinearScanFn, accumulation_dtype
from dynalens.kernels.checks import Backend, check_backend, check_input, check_tensor
from dynalens.kernels.paths import auto_backend, compiled_path
from dynalens.kernels.reference import linear_scan_ref
from dynalens.kernels.scan_torch import linear_scan_torch

OP = "linear_scan"


def linear_scan(
    a: Float[Tensor, "b d l"],
    x: Float[Tensor, "b d l"],
    initial_state: Float[Tensor, "b d"] | None = None,
    *,
    backend: Backend = "auto",
) -> Float[Tensor, "b d l"]:
    """All states of ``h_t = a_t * h_{t-1} + x_t``, elementwise over ``(b, d)``.

    Parameters
    ----------
    a : Tensor, shape (b, d, l)
        Per-step decay (any sign; ``|a| <= 1`` keeps the scan stable).
    x : Tensor, shape (b, d, l)
        Per-step input.
    initial_state : Tensor, shape (b, d), optional
        ``h_{-1}``; zero when omitted.
    backend : {"auto", "ref", "torch", "numba", "triton"}
        ``"auto"`` takes Triton for CUDA tensors and numba otherwise.

    Returns
    -------
    Tensor, shape (b, d, l), dtype of ``x``
        ``h_0 ... h_{l-1}``; differentiable in ``a``, ``x`` and ``initial_state``.
        Accumulates in float32 (float64 for float64 inputs).

    Examples
    --------
    >>> a, x = torch.full((1, 1, 3), 0.5), torch.ones(1, 1, 3)
    >>> linear_scan(a, x)
    tensor([[[1.0000, 1.5000, 1.7500]]])
    """
    b, d, length = check_input(OP, "x", x)
    check_tensor(OP, "a", a, (b, d, length), "(b, d, l)", x.device)
    if initial_state is not None:
        check_tensor(OP, "initial_state", initial_state, (b, d), "(b, d)", x.device)
    check_backend(OP, backend)
    if backend == "auto":
        backend = auto_backend(x)
    if backend == "ref":
        return linear_scan_ref(a, x, initial_state)
    if backend == "torch":
        return linear_scan_torch(a, x, initial_state, accumulation_dtype(x)).to(x.dtype)
    return LinearScanFn.apply(compiled_path(OP, backend, x), a, x, initial_state)
