"""dynalens: one hook vocabulary over transformers, Mamba and RNNs.

>>> import dynalens as dl
>>> model = dl.load("smollm2-135m")                       # doctest: +SKIP
>>> logits, cache = model.run_with_cache("Hello", names_filter=lambda n: "resid" in n)  # doctest: +SKIP

The names below load on first use (``dynalens/_lazy.py``): ``import dynalens``
imports neither torch nor TransformerLens, ``dl.load`` does.
"""

from typing import TYPE_CHECKING

from dynalens import _layout
from dynalens._lazy import attach
from dynalens._version import __version__

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
