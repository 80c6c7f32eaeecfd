"""Checks shared by every model: hook names, token ids, finite values.

Every error says what was wrong and what is accepted, so that a typo in a hook
name or a prompt that is too long never turns into a silent no-op.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import Tensor


class HookNameError(KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def closest_names(name: str, valid: Collection[str], n: int = 5) -> list[str]:
    """The valid names most similar to ``name``, best first."""
    matches = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    if matches:
        return matches
    # Fall back on names that share the last component (``hook_resid_post``).
    tail = name.rsplit(".", 1)[-1]
    return [v for v in valid if v.endswith(tail)][:n]


def check_hook_names(names: Iterable[str], valid: Collection[str]) -> None:
    """Raise :class:`HookNameError` for the first name not in ``valid``."""
    for name in names:
        if name not in valid:
            close = closest_names(name, valid)
            hint = f" Closest valid names: {', '.join(close)}." if close else ""
            raise HookNameError(
                f"Unknown hook name {name!r}.{hint} "
                "List them all with `model.hook_dict.keys()` or `dynalens hooks MODEL`."
            )


def named_hooks(hooks: Iterable[tuple[Any, Callable]]) -> list[str]:
    """The string names among ``(name_or_filter, fn)`` hook pairs."""
    return [name for name, _ in hooks if isinstance(name, str)]


def filter_names(names_filter: Any) -> list[str]:
    """The explicit names of a ``names_filter`` (a str or list); none for a callable."""
    if names_filter is None or callable(names_filter):
        return []
    if isinstance(names_filter, str):
        return [names_filter]
    return list(names_filter)


def check_tokens(tokens: Tensor, d_vocab: int, n_ctx: int | None = None) -> Tensor:
    """Validate a ``[batch, pos]`` tensor of token ids and return it.

    Raises ``ValueError`` for an empty prompt, ids outside ``[0, d_vocab)`` and
    sequences longer than ``n_ctx``; ``TypeError`` for a non-integer tensor.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of ids, got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must have shape [batch, pos] or [pos], got {tuple(tokens.shape)}"
        )
    if tokens.shape[-1] == 0:
        raise ValueError("empty prompt: the input has no tokens; pass at least one token")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= d_vocab):
        bad = tokens[(tokens < 0) | (tokens >= d_vocab)][0].item()
        raise ValueError(
            f"token id {bad} is out of range: this model accepts ids in [0, {d_vocab - 1}]"
        )
    if n_ctx is not None and tokens.shape[-1] > n_ctx:
        raise ValueError(
            f"sequence of {tokens.shape[-1]} tokens is longer than the model accepts "
            f"(n_ctx = {n_ctx}); shorten the prompt"
        )
    return tokens


def check_prompt(text: str) -> str:
    """Reject empty or whitespace-only prompts before tokenisation."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty prompt: pass a non-empty string or a tensor of token ids")
    return text


def check_finite(name: str, value: Tensor) -> Tensor:
    """Raise ``ValueError`` if ``value`` holds NaN or infinity."""
    if not torch.isfinite(value).all():
        n_bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"{name} holds {n_bad} non-finite values (NaN or inf); pass finite values")
    return value


def check_index(name: str, index: int, size: int) -> int:
    """Return ``index`` if it lies in ``[0, size)``; else raise ``IndexError`` naming the range."""
    if isinstance(index, bool) or not hasattr(index, "__index__") or not 0 <= index.__index__() < size:
        raise IndexError(f"{name} {index!r} is out of range: valid {name}s are 0 to {size - 1}")
    return index.__index__()


RETURN_TYPES = ("auto", "str", "tokens")


class HookShapeError(ValueError):
    """A hook returned a tensor of another shape than the activation it received."""


def check_hook_output(name: str, received: Tensor, returned: Any) -> None:
    """Raise :class:`HookShapeError` if a hook's returned tensor has another shape than it received.

    ``None`` (leave the activation as it is) and non-tensors pass through unchecked.
    """
    if isinstance(returned, Tensor) and isinstance(received, Tensor) and returned.shape != received.shape:
        raise HookShapeError(
            f"hook {name!r} returned a tensor of shape {list(returned.shape)}; expected "
            f"{list(received.shape)} (the shape it received). Return a tensor of the same shape, "
            "or None to leave the activation unchanged."
        )


def check_mask(
    attention_mask: Tensor | None, tokens: Tensor
) -> Tensor | None:
    """An ``attention_mask`` as a bool ``[batch, pos]`` tensor (True = real), or None when all are real.

    Accepts bool or 0/1 integer tensors of the tokens' shape, padded on the left
    (each row's real tokens are its last columns), with at least one real token per row.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask must be a bool or 0/1 tensor [batch, pos], got {type(attention_mask).__name__}"
        )
    mask = attention_mask.reshape(1, -1) if attention_mask.ndim == 1 else attention_mask
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)} but the tokens have "
            f"{list(tokens.shape)}: pass one 0/1 entry per token"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token), or be a bool tensor")
        mask = mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    lengths = mask.sum(-1, keepdim=True)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) >= mask.shape[1] - lengths):
        raise ValueError(
            "attention_mask must pad on the left: each row's real tokens (1s) are its last columns, "
            "as Prompts builds them"
        )
    mask = mask.to(tokens.device)
    return None if bool(mask.all()) else mask


def check_generate_args(
    max_new_tokens: int,
    return_type: str,
    *,
    temperature: float = 0.0,
    do_sample: bool | None = None,
    top_k: int | None = None,
    eos_token_id: Any = None,
    minimum: int = 0,
) -> None:
    """Check ``generate``'s shared arguments, each error naming the argument and what is accepted."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < minimum:
        raise ValueError(f"max_new_tokens must be an int >= {minimum}, got {max_new_tokens!r}")
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be 'auto', 'str' or 'tokens', got {return_type!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if do_sample not in (None, True, False):
        raise ValueError(f"do_sample must be True, False or None, got {do_sample!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or any(isinstance(i, bool) or not isinstance(i, int) for i in ids)
        ):
            raise ValueError(f"eos_token_id must be an int token id, a non-empty list of them, or None, got {eos_token_id!r}")
