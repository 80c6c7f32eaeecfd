"""Hook names, built in one place.

Every analysis, page and notebook spells a hook through these functions, so
the vocabulary lives here once (``ARCHITECTURE.md``, "One hook vocabulary").

>>> from dynalens.models import names
>>> names.resid_post(3)
'blocks.3.hook_resid_post'
>>> names.mixer(2, "ssm_state")
'blocks.2.mixer.hook_ssm_state'
>>> names.layer_of("blocks.7.attn.hook_pattern")
7
"""

from __future__ import annotations

import re

EMBED = "hook_embed"
POS_EMBED = "hook_pos_embed"
FINAL_NORMALIZED = "ln_final.hook_normalized"
FINAL_SCALE = "ln_final.hook_scale"
FINAL_IN = "ln_final.hook_in"

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def block(layer: int, hook: str) -> str:
    """``blocks.{layer}.{hook}``: any per-layer name, ``hook`` relative to the block."""
    return f"blocks.{layer}.{hook}"


def resid_pre(layer: int) -> str:
    """The residual stream entering block ``layer``."""
    return block(layer, "hook_resid_pre")


def resid_mid(layer: int) -> str:
    """A transformer's residual stream between attention and MLP."""
    return block(layer, "hook_resid_mid")


def resid_post(layer: int) -> str:
    """The residual stream leaving block ``layer``."""
    return block(layer, "hook_resid_post")


def mixer_out(layer: int) -> str:
    """What the sequence mixer (attention, SSM, RNN cell) adds to the residual."""
    return block(layer, "hook_mixer_out")


def attn_out(layer: int) -> str:
    """A transformer's attention output (``= mixer_out`` there)."""
    return block(layer, "hook_attn_out")


def mlp_out(layer: int) -> str:
    """A transformer's MLP output."""
    return block(layer, "hook_mlp_out")


def attn(layer: int, part: str) -> str:
    """A transformer's attention hook: ``part`` is ``pattern``, ``attn_scores``, ``q``, ``k``, ``v``, ``z``, ``result``, ``q_input``..."""
    return block(layer, f"attn.hook_{part}")


def pattern(layer: int) -> str:
    """Attention pattern ``[batch, head, q, k]``."""
    return attn(layer, "pattern")


def mixer(layer: int, part: str) -> str:
    """An SSM mixer hook: ``part`` is ``delta``, ``B``, ``C``, ``conv``, ``ssm_state``, ``y``, ``gate``..."""
    return block(layer, f"mixer.hook_{part}")


def cell(layer: int, part: str) -> str:
    """An RNN cell hook: ``part`` is ``hidden``, ``cell`` or a gate name."""
    return block(layer, f"cell.hook_{part}")


def resid_stream(n_layers: int) -> list[str]:
    """The stream entering layer 0, then after each layer: ``n_layers + 1`` names."""
    return [resid_pre(0), *(resid_post(layer) for layer in range(n_layers))]


def layer_of(name: str) -> int | None:
    """The block index a name belongs to; ``None`` for names outside the blocks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def short(name: str) -> str:
    """The part of a name after ``blocks.{l}.`` (the whole name outside the blocks)."""
    return _LAYER.sub("", name)
