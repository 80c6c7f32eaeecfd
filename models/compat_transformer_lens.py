"""The TransformerLens internals dynalens relies on, in one place (``transformer-lens`` pinned exactly).

:class:`~dynalens.models.transformer.HookedTransformerBridge` and the hybrids'
Bridge extend TransformerLens' ``TransformerBridge`` beyond its public API:

- a model without a tokenizer is wrapped by ``build_bridge_from_module``
  (``boot_transformers`` insists on a tokenizer): :func:`bridge_from_module`;
- the Bridge ``boot_transformers`` builds becomes an instance of our subclass
  by assigning ``__class__``, which holds while the Bridge keeps its state in
  its instance ``__dict__``: :func:`adopt`;
- a block hook alias (``blocks.{l}.hook_mixer_out``) is added through the
  component's ``hook_aliases`` and ``_register_aliases()``, entered in the
  Bridge's ``_hook_registry``, and the Bridge's ``_block_alias_cache`` is
  reset: :func:`alias_block_hooks`;
- the Bridge holds each HuggingFace module under ``_original_component``, a
  name its ``state_dict`` keys carry: :func:`hf_state_dict`.

:func:`check` runs once on import and fails naming the pin when one of them is gone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge, sources
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from dynalens._pins import has, names_attribute, require
from dynalens.models import names

PIN = "transformer-lens==4.3.0"
ORIGINAL_COMPONENT = "_original_component"

Bridge = TypeVar("Bridge", bound=TransformerBridge)


def check() -> None:
    """Raise ``PinnedInternalsError`` naming :data:`PIN` if an internal used here is missing."""
    component = "transformer_lens.model_bridge.generalized_components.base.GeneralizedComponent"
    require(PIN, {
        "transformer_lens.model_bridge.sources.build_bridge_from_module": has(sources, "build_bridge_from_module"),
        "TransformerBridge instances keeping their state in __dict__": TransformerBridge.__dictoffset__ != 0,
        "TransformerBridge._hook_registry": names_attribute(TransformerBridge, "_hook_registry"),
        "TransformerBridge._block_alias_cache": names_attribute(TransformerBridge, "_block_alias_cache"),
        f"{component}._register_aliases": has(GeneralizedComponent, "_register_aliases"),
        f"{component}.hook_aliases": has(GeneralizedComponent, "hook_aliases"),
        f"{component}.{ORIGINAL_COMPONENT}": _holds_original_component(),
    })  # fmt: skip


def _holds_original_component() -> bool:
    """Whether a component keeps the HuggingFace module it wraps under :data:`ORIGINAL_COMPONENT`."""
    setter = getattr(GeneralizedComponent, "set_original_component", None)
    return setter is not None and ORIGINAL_COMPONENT in setter.__code__.co_consts


def bridge_from_module(hf_model: nn.Module, name: str) -> TransformerBridge:
    """A ``TransformerBridge`` around a loaded HuggingFace model that has no tokenizer (token ids only)."""
    return sources.build_bridge_from_module(hf_model, type(hf_model).__name__, hf_config=hf_model.config,
                                            model_name=name)


def adopt(bridge: TransformerBridge, cls: type[Bridge]) -> Bridge:
    """``bridge``, now an instance of ``cls``: a subclass of its class that adds methods and no state."""
    if not issubclass(cls, type(bridge)):
        raise TypeError(f"{cls.__name__} must subclass {type(bridge).__name__} to adopt its instance")
    bridge.__class__ = cls
    return bridge


def alias_block_hooks(bridge: TransformerBridge, aliases: Sequence[Mapping[str, str]]) -> None:
    """Give block ``l`` the hook aliases ``aliases[l]`` (alias → the hook's path in the block), as Bridge hook names.

    ``blocks.{l}.<alias>`` then fires with its target: in ``hook_dict``,
    ``run_with_cache`` and ``run_with_hooks``.
    """
    if len(aliases) != len(bridge.blocks):
        raise ValueError(f"one alias mapping per block: {len(bridge.blocks)} blocks, {len(aliases)} mappings")
    for layer, (block, extra) in enumerate(zip(bridge.blocks, aliases)):
        block.hook_aliases = {**block.hook_aliases, **extra}
        block._register_aliases()
        for alias in extra:
            bridge._hook_registry[names.block(layer, alias)] = getattr(block, alias)
    bridge._block_alias_cache = None  # the Bridge resolves block aliases again


def hf_state_dict(hf_model: nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` of a HuggingFace model inside a Bridge, under HuggingFace's own names."""
    return {
        key.replace(f".{ORIGINAL_COMPONENT}", "").removeprefix(f"{ORIGINAL_COMPONENT}."): value
        for key, value in hf_model.state_dict().items()
    }


check()
