"""The PyTorch internals dynalens relies on, in one place (``torch`` pinned exactly).

- ``torch._standard_gamma``: gamma draws from a given ``torch.Generator``
  (``torch.distributions.Gamma`` samples from the global generator only), so a
  task's Dirichlet rows are reproducible from its seed: :func:`standard_gamma`.
- ``torch._C._storage_Use_Count``: how many tensors share a storage, so that
  a states buffer is reused only when no hook kept a view of it
  (``models/state_buffer.py``): :func:`storage_use_count`.

:func:`check` runs once on import and fails naming the pin when it is gone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynalens._pins import has, require

PIN = "torch==2.13.0"


def check() -> None:
    """Raise ``PinnedInternalsError`` naming :data:`PIN` if an internal above is missing."""
    require(PIN, {"torch._standard_gamma": has(torch, "_standard_gamma"),
                  "torch._C._storage_Use_Count": has(torch, "_C._storage_Use_Count")})


def standard_gamma(concentration: Tensor, generator: torch.Generator) -> Tensor:
    """Draws from ``Gamma(concentration, 1)``, elementwise, from ``generator``; the shape of ``concentration``."""
    return torch._standard_gamma(concentration, generator=generator)


def storage_use_count(tensor: Tensor) -> int:
    """How many references share the storage of ``tensor`` (views and detached tensors included)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


check()
