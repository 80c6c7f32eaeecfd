"""The PyTorch internal dynalens relies on, in one place (``torch`` pinned exactly).

- ``torch._standard_gamma``: gamma draws from a given ``torch.Generator``
  (``torch.distributions.Gamma`` samples from the global generator only), so a
  task's Dirichlet rows are reproducible from its seed: :func:`standard_gamma`.

:func:`check` runs once on import and fails naming the pin when it is gone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynalens._pins import has, require

PIN = "torch==2.13.0"


def check() -> None:
    """Raise ``PinnedInternalsError`` naming :data:`PIN` if ``torch._standard_gamma`` is missing."""
    require(PIN, {"torch._standard_gamma": has(torch, "_standard_gamma")})


def standard_gamma(concentration: Tensor, generator: torch.Generator) -> Tensor:
    """Draws from ``Gamma(concentration, 1)``, elementwise, from ``generator``; the shape of ``concentration``."""
    return torch._standard_gamma(concentration, generator=generator)


check()
