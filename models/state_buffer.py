"""One buffer for every SSM layer's ``hook_ssm_state`` within a forward, reused when nothing else holds it.

Forming every state of a layer writes ``b·l·h·p·n`` floats (0.4 GB for the
Mamba-2-130m shape at l = 512); on CPU, the first touch of a fresh buffer of
that size costs more in page faults than computing the states. Inside
:func:`sharing_states` (each model's forward), a layer whose states nothing
but the layer holds once its hooks have run hands their memory to the next
layer. Holders are counted, not assumed: the tensor's Python references and
its storage's use count, so that whatever a hook kept (the tensor, a view, a
``detach()`` as the cache keeps, a NumPy array over it) keeps the buffer
from reuse, and what a user holds is never overwritten.

The buffer is made outside inference mode, so that its version counter
tells whether a hook edited the states in place (inference tensors have
none).

Inside :func:`states_into`, a layer whose state hook is named there forms
its states straight into the tensor given for it (when it fits) instead:
a caller that keeps every state somewhere (an activation store's file
buffer) spares the copy from the cache and the first touch of a fresh
buffer. Such a tensor is never handed on to another layer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

import torch
from torch import Tensor

from dynalens.models.compat_torch import storage_use_count

_SPARE: ContextVar[list[Tensor] | None] = ContextVar("dynalens_spare_states", default=None)
_INTO: ContextVar[Mapping[str, Tensor]] = ContextVar("dynalens_states_into", default=MappingProxyType({}))


@contextmanager
def sharing_states() -> Iterator[None]:
    """Let the layers run inside share one states buffer; it is freed on exit."""
    token = _SPARE.set([])
    try:
        yield
    finally:
        _SPARE.reset(token)


@contextmanager
def states_into(destinations: Mapping[str, Tensor]) -> Iterator[None]:
    """Let the layers inside form every state of the named state hooks straight into the given tensors.

    Parameters
    ----------
    destinations
        Hook name (``names.mixer(l, "ssm_state")``) → a tensor of the states'
        shape ``[batch, pos, ...]``, dtype (float32, or float64 for float64
        models) and device, contiguous. A layer takes it only when it fits
        (and only without autograd, as for the shared buffer); otherwise it
        forms its states as usual. Either way the hook sees, may edit, and
        the cache keeps what the layer formed; a caller that finds the
        cached tensor sharing its destination's memory has its states there.
        Names of other hooks are ignored.
    """
    token = _INTO.set(MappingProxyType(dict(destinations)))
    try:
        yield
    finally:
        _INTO.reset(token)


def states_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, hook: str | None = None
) -> Tensor:
    """An uninitialised tensor of ``shape`` to write states into.

    The destination :func:`states_into` gives for ``hook`` (the state hook's
    name) when it fits; else the spare memory when it fits; else new. A new
    or spare buffer is a normal tensor (with a version counter), in
    inference mode too.
    """
    into = _INTO.get().get(hook) if hook is not None else None
    if into is not None and _fits(into, shape, dtype, device):
        return into
    spare = _SPARE.get()
    numel = torch.Size(shape).numel()
    if spare and spare[0].numel() >= numel and spare[0].dtype == dtype and spare[0].device == device:
        return spare.pop()[:numel].view(shape)
    if spare:
        spare.clear()  # a spare that does not fit is freed before the new buffer is made
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype, device=device)


def run_state_hook(hook: Callable[[Tensor], Tensor], states: Tensor) -> tuple[Tensor, bool]:
    """``hook(states)`` and whether the hook edited the states.

    An edit is another tensor returned, or the states changed in place (their
    version counter moved); an inference tensor has no counter, so the states
    count as edited.
    """
    version = None if states.is_inference() else states._version
    hooked = hook(states)
    return hooked, hooked is not states or version is None or hooked._version != version


def holders(states: Tensor) -> tuple[int, int] | None:
    """Python references to ``states`` and uses of its storage (None for an inference tensor).

    Equal counts before and after a hook, taken with the caller's own
    references unchanged, mean the hook kept nothing that reaches the memory.
    """
    if states.is_inference():
        return None
    return sys.getrefcount(states), storage_use_count(states)


def offer(states: Tensor) -> None:
    """Keep the memory of ``states``, which nothing else holds, for the next layer's :func:`states_buffer`.

    Outside :func:`sharing_states`, or with a spare already kept, nothing is kept.
    """
    spare = _SPARE.get()
    if spare is not None and not spare and not _is_destination(states):
        spare.append(states.view(-1))


def _fits(into: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    return tuple(into.shape) == tuple(shape) and into.dtype == dtype and into.device == device and into.is_contiguous()


def _is_destination(states: Tensor) -> bool:
    """Whether ``states`` lies in the memory of a tensor :func:`states_into` gave."""
    storage = states.untyped_storage().data_ptr()
    return any(into.untyped_storage().data_ptr() == storage for into in _INTO.get().values())
