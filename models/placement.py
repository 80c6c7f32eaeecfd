"""Models across devices: dynalens' own models placed block by block with accelerate.

Transformers are placed by transformers itself (``from_pretrained(device_map=...)``,
accelerate underneath). Our own models (HookedMamba, HookedRNN, ...) are
placed here: :func:`place` puts each block on the device a ``device_map``
names (``"cpu"``, a GPU index, or ``"disk"`` with an ``offload_folder``) and
accelerate's hooks move a block's inputs to its device, so hooks, caches and
``generate`` work wherever a layer sits. ``run_with_cache(..., device=...)``
gathers a cache onto one device.

Examples
--------
>>> model = dl.load("mamba-ar", device_map={"embed": 0, "blocks.0": 0, "blocks.1": "cpu",
...                 "ln_final": "cpu", "unembed": "cpu"})                      # doctest: +SKIP
>>> model = dl.load("mamba-ar", device_map="auto", max_memory={"cpu": "2MB"},
...                 offload_folder="offload/")                                # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import torch

DeviceMap = dict[str, "str | int | torch.device"]


def place(
    model: torch.nn.Module,
    device_map: str | DeviceMap,
    *,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """Place ``model``'s modules on devices (in place) and return it.

    Parameters
    ----------
    model
        A dynalens model with ``blocks``.
    device_map
        Module name → device (``"cpu"``, ``"cuda:0"``, ``0``, ``"disk"``), or
        ``"auto"`` to fill the devices of ``max_memory`` in order, never
        splitting a block.
    max_memory
        Device → budget (``{0: "10GiB", "cpu": "30GiB"}``) for ``"auto"``.
    offload_folder
        Where ``"disk"`` modules keep their weights (required when any is on disk).
    """
    from accelerate import dispatch_model

    if device_map == "auto":
        device_map = auto_device_map(model, max_memory)
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map must be 'auto' or a dict module name → device, got {device_map!r}")
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map puts modules on 'disk': pass offload_folder, where their weights go")
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(device_map) - names - {""})
    if unknown:
        raise ValueError(f"device_map names modules the model does not have: {unknown[:5]}")
    blocks = sorted({type(block).__name__ for block in model.blocks})  # a block's weights load together
    offload_dir = None if offload_folder is None else os.fspath(offload_folder)
    dispatch_model(model, device_map, offload_dir=offload_dir, preload_module_classes=blocks)
    model.hf_device_map = dict(device_map)
    first = device_map.get("embed", next(iter(device_map.values())))  # where tokens go first
    model.input_device = torch.device("cpu" if first == "disk" else first)  # disk weights run on the CPU
    return model


def auto_device_map(model: torch.nn.Module, max_memory: dict[Any, Any] | None) -> DeviceMap:
    """Fill the devices of ``max_memory`` in order with the model's top modules and blocks.

    Each block stays whole; a module whose weights are all tied to modules
    already placed (an unembedding tied to the embedding) goes with them; what
    fits nowhere goes to ``"disk"``.
    """
    from accelerate.utils import convert_file_size_to_int

    if not max_memory:
        raise ValueError('device_map="auto" needs max_memory, e.g. {0: "10GiB", "cpu": "30GiB"}')
    budgets = [[device, convert_file_size_to_int(size)] for device, size in max_memory.items()]
    units = [
        (f"blocks.{i}", block) if name == "blocks" else (name, module)
        for name, module in model.named_children()
        for i, block in (enumerate(module) if name == "blocks" else [(0, module)])
    ]
    placed: dict[int, Any] = {}  # id(parameter) -> device
    device_map: DeviceMap = {}
    slot = 0
    for name, module in units:
        params = list(module.parameters())
        if params and all(id(p) in placed for p in params):
            device_map[name] = placed[id(params[0])]
            continue
        size = sum(p.numel() * p.element_size() for p in params if id(p) not in placed)
        size += sum(b.numel() * b.element_size() for b in module.buffers())
        while slot < len(budgets) and budgets[slot][1] < size:
            slot += 1
        device = budgets[slot][0] if slot < len(budgets) else "disk"
        if slot < len(budgets):
            budgets[slot][1] -= size
        device_map[name] = device
        placed.update({id(p): device for p in params})
    return device_map
