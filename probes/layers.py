"""Which layer of a model mixes with what: the layer types analyses report and the SSM layers they read."""

from __future__ import annotations

from typing import Any

from dynalens.models.surface import architecture_of
from dynalens.models.validation import check_index
from dynalens.probes.analysis import AnalysisError

#: The sequence mixer of every layer of a model that is not a hybrid.
_MIXER = {"transformer": "attention", "mamba": "mamba", "mamba2": "mamba2", "rnn": "rnn"}


def layer_types(model: Any) -> list[str]:
    """Each layer's sequence mixer: a hybrid's ``model.layer_types``, else one type for every layer.

    ``"attention"`` (transformers), ``"mamba"``, ``"mamba2"``, ``"rnn"``, and on
    hybrids also ``"attention+mamba2"``, ``"mlp"``, ``"moe"``.
    """
    arch = architecture_of(model)
    if arch == "hybrid":
        return list(model.layer_types)
    return [_MIXER[arch]] * model.cfg.n_layers


def ssm_layers(model: Any) -> dict[int, str]:
    """The layers whose selective SSM dynalens runs, each with its kind: ``"mamba"`` or ``"mamba2"``.

    Every layer of a Mamba or Mamba-2; the opened SSM mixers of a hybrid
    (none for a hybrid loaded through the Bridge); none otherwise.
    """
    arch = architecture_of(model)
    if arch in ("mamba", "mamba2"):
        return dict.fromkeys(range(model.cfg.n_layers), arch)
    if arch == "hybrid":
        return {
            layer: block.ssm_kind for layer, block in enumerate(model.blocks) if getattr(block, "ssm_kind", None)
        }
    return {}


def ssm_layer(model: Any, layer: int, analysis: str) -> str:
    """The kind of SSM layer ``layer`` is (``"mamba"`` or ``"mamba2"``); an :class:`AnalysisError` if none."""
    layer = check_index("layer", layer, model.cfg.n_layers)
    found = ssm_layers(model)
    if layer not in found:
        kind = layer_types(model)[layer]
        which = f"its SSM layers are {sorted(found)}" if found else "its SSM layers run inside the Bridge, unopened"
        raise AnalysisError(
            f"{analysis} reads a selective SSM layer, and layer {layer} of this {architecture_of(model)} is "
            f"{kind!r}: {which}"
        )
    return found[layer]
