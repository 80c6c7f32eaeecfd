"""Building models one thread at a time.

Building a model touches process-wide state: ``with torch.device("meta")``
sets torch's default device for every thread (``torch.get_default_device()``
reads one global), and transformers' ``from_pretrained`` builds under such
contexts. Two threads building at once (two dashboard tabs loading models)
can then put one model on the meta device, or leave the default device at
``meta`` for every later load of the process ("Cannot copy out of meta
tensor"). Every load and every meta-device build holds one re-entrant lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()


@contextmanager
def building() -> Iterator[None]:
    """Hold the process-wide model-building lock (re-entrant: a load inside a load is fine)."""
    with _LOCK:
        yield


@contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device (no initialisation), holding the building lock."""
    import torch  # here: `dynalens models` reads the zoo through this package without torch

    with _LOCK, torch.device("meta"):
        yield
