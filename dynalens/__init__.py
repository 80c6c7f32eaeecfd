"""dynalens: one hook vocabulary over transformers, Mamba and RNNs.

>>> import dynalens as dl
>>> model = dl.load("smollm2-135m")                       # doctest: +SKIP
>>> logits, cache = model.run_with_cache("Hello", names_filter=lambda n: "resid" in n)  # doctest: +SKIP

The names below load on first use (``dynalens/_lazy.py``): ``import dynalens``
imports neither torch nor TransformerLens, ``dl.load`` does.

Importing dynalens before torch turns on PyTorch's transparent huge pages for
CPU tensors of 2 MB and more (``THP_MEM_ALLOC_ENABLE=1``, unless the variable
is already set): caches, states and logits are fresh allocations on every
forward, and 2 MB pages cut their first-touch cost about threefold (a fresh
390 MB tensor: 0.11 s → 0.04 s on a 2-core VM). ``THP_MEM_ALLOC_ENABLE=0``
turns it off; torch reads it once, at its first allocation.
"""

import os
from typing import TYPE_CHECKING

from dynalens import _layout
from dynalens._lazy import attach
from dynalens._version import __version__

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
_layout.install()  # a checkout: dynalens.<name> from the top-level folder <name>/

if TYPE_CHECKING:
    from dynalens import circuits, kernels, models, probes
    from dynalens.models import names
    from dynalens.models.loading import list_models, load
    from dynalens.models.prompts import Prompts
    from dynalens.models.validation import HookNameError
    from dynalens.probes.analysis import run
    from dynalens.probes.sweep import Sweep, sweep

__all__ = [
    "__version__", "circuits", "kernels", "models", "probes", "HookNameError", "Prompts", "list_models", "load",
    "names", "run", "sweep", "Sweep",
]

__getattr__, __dir__ = attach(__name__, __file__)
