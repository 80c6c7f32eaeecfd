"""One batch of prompts for every architecture: left-padded token ids plus a mask.

Strings, token lists and tensors all become a :class:`Prompts`: each prompt is
tokenised on its own, the rows are padded on the left to the longest, and
``mask`` marks the real tokens. Left padding puts every prompt's last real
token in the last column, so the next-token prediction of each row is
``logits[:, -1]`` and ``generate`` continues each row from its own end.
Models read the mask: transformers as their attention mask, Mamba with
``Δ = 0`` and a zero conv input at pad positions, RNNs by carrying the state
through pad steps, so a padded row equals its unpadded run.

Positions that analyses report count each prompt's real tokens from 0
(``position_index`` turns them into columns of the padded batch).

Examples
--------
>>> p = Prompts.from_ids([[5, 6, 7], [8]])
>>> p.tokens.tolist(), p.mask.int().tolist()
([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
>>> p.lengths.tolist(), p.position_index(-1, prompt=1), p.position_index(0, prompt=1)
([3, 1], 2, 2)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Union

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dynalens.models.validation import check_prompt, check_tokens

PromptInput = Union[str, Sequence[str], Tensor, Sequence[Sequence[int]], Sequence[Tensor], "Prompts"]


class Prompts:
    """A left-padded batch of prompts with its mask and the tokens as strings.

    Build one with ``Prompts(model, inputs)``; ``inputs`` is a string, a list of
    strings, token ids ``[pos]`` / ``[batch, pos]`` (every id real), a list of id
    rows of any lengths, or a ``Prompts`` (returned as it is, on the model's
    device).

    Attributes
    ----------
    tokens
        ``[batch, pos]`` token ids, padded on the left with ``pad_id``.
    mask
        ``[batch, pos]`` True at real tokens.
    str_tokens
        Each prompt's real tokens as strings (ids as strings without a tokenizer).
    texts
        The prompt strings, when the prompts were given as text.
    """

    def __init__(self, model: Any, inputs: PromptInput):
        if isinstance(inputs, Prompts):
            self._take(inputs.to(input_device(model)))
            return
        rows, texts = _token_rows(model, inputs)
        pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
        built = Prompts.from_ids(
            rows, texts=texts, pad_id=0 if pad is None else int(pad), decode=_decoder(model)
        )
        self._take(built.to(input_device(model)))

    # ---------------------------------------------------------------- building
    @classmethod
    def from_ids(
        cls,
        rows: Sequence[Sequence[int] | Tensor],
        *,
        texts: Sequence[str] | None = None,
        pad_id: int = 0,
        decode: Any = None,
    ) -> Prompts:
        """A batch from id rows of any lengths, without a model (``decode`` maps ids to strings)."""
        ids = [torch.as_tensor(row, dtype=torch.long).reshape(-1).cpu() for row in rows]
        if not ids:
            raise ValueError("no prompts: pass at least one prompt")
        for i, row in enumerate(ids):
            if row.numel() == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        width = max(len(row) for row in ids)
        tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):
            tokens[i, width - len(row) :] = row
            mask[i, width - len(row) :] = True
        decode = decode or (lambda row: [str(t) for t in row])
        str_tokens = [decode(row.tolist()) for row in ids]
        return cls.from_parts(tokens, mask, str_tokens, texts=texts, pad_id=pad_id)

    @classmethod
    def from_parts(
        cls,
        tokens: Int[Tensor, "batch pos"],
        mask: Bool[Tensor, "batch pos"],
        str_tokens: list[list[str]],
        *,
        texts: Sequence[str] | None = None,
        pad_id: int = 0,
    ) -> Prompts:
        """A batch from its stored parts (what :meth:`state` returned), checked."""
        if tokens.shape != mask.shape or tokens.ndim != 2:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be [batch, pos]"
            )
        mask = mask.bool()
        lengths = mask.sum(-1)
        # Left padding: in each row the real tokens are the last ``length`` columns.
        expected = torch.arange(mask.shape[1], device=mask.device) >= (mask.shape[1] - lengths)[:, None]
        if not torch.equal(mask, expected):
            raise ValueError("mask must mark the last tokens of each row (left padding)")
        if [len(s) for s in str_tokens] != lengths.tolist():
            raise ValueError("str_tokens must hold one string per real token of each prompt")
        self = cls.__new__(cls)
        self.tokens, self.mask, self.str_tokens = tokens, mask, [list(s) for s in str_tokens]
        self.texts = None if texts is None else list(texts)
        self.pad_id = pad_id
        return self

    def _take(self, other: Prompts) -> None:
        self.tokens, self.mask, self.str_tokens = other.tokens, other.mask, other.str_tokens
        self.texts, self.pad_id = other.texts, other.pad_id

    # ------------------------------------------------------------------- shape
    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __iter__(self) -> Iterator[Prompts]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int | slice | Sequence[int]) -> Prompts:
        """The prompts at ``index``, re-padded to their own longest."""
        if isinstance(index, int):
            if not -len(self) <= index < len(self):
                raise IndexError(f"prompt {index} is out of range: this batch has {len(self)} prompts")
            index = [index % len(self)]
        picked = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        rows = [self.tokens[i][self.mask[i]] for i in picked]
        built = Prompts.from_ids(
            rows,
            texts=None if self.texts is None else [self.texts[i] for i in picked],
            pad_id=self.pad_id,
            decode=lambda row, it=iter([self.str_tokens[i] for i in picked]): next(it),
        )
        return built.to(self.tokens.device)

    def __repr__(self) -> str:
        return f"Prompts({len(self)} prompts, lengths {self.lengths.tolist()})"

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Real tokens per prompt."""
        return self.mask.sum(-1)

    @property
    def offsets(self) -> Int[Tensor, " batch"]:
        """Pad tokens before each prompt: its first real token's column."""
        return self.mask.shape[1] - self.lengths

    @property
    def is_padded(self) -> bool:
        """Whether any row has pad tokens."""
        return not bool(self.mask.all())

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: str | torch.device) -> Prompts:
        """The same prompts with tensors on ``device``."""
        if self.tokens.device == torch.device(device):
            return self
        return Prompts.from_parts(
            self.tokens.to(device), self.mask.to(device), self.str_tokens,
            texts=self.texts, pad_id=self.pad_id,
        )  # fmt: skip

    # --------------------------------------------------------------- positions
    def position_index(self, position: int, prompt: int = 0) -> int:
        """The column of real position ``position`` of ``prompt`` (negative counts from its end)."""
        n = int(self.lengths[prompt])
        if isinstance(position, bool) or not -n <= position < n:
            raise IndexError(
                f"position {position!r} is out of range for prompt {prompt}: its positions are "
                f"0 to {n - 1} (or -{n} to -1 from the end)"
            )
        return int(self.offsets[prompt]) + position % n

    def real(self, x: Tensor, prompt: int, dim: int = 1) -> Tensor:
        """``x``'s real positions of ``prompt``: row ``prompt``, columns past its padding.

        ``x`` is ``[batch, pos, ...]`` (``dim`` names its position axis, counted
        with the batch axis present); the result drops the batch axis.
        """
        return x[prompt].narrow(dim - 1, int(self.offsets[prompt]), int(self.lengths[prompt]))

    def frame(self) -> pd.DataFrame:
        """One row per real token: ``prompt, position, token``, in the order :meth:`flat` uses."""
        return pd.DataFrame(
            [(i, p, tok) for i, toks in enumerate(self.str_tokens) for p, tok in enumerate(toks)],
            columns=["prompt", "position", "token"],
        )

    def flat(self, x: Tensor) -> Tensor:
        """``x [batch, pos, ...]`` at real positions only, ``[n_real, ...]`` in :meth:`frame`'s order."""
        return x[self.mask.to(x.device)]

    # ------------------------------------------------------------- persistence
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and plain JSON values that :meth:`from_parts` rebuilds the batch from."""
        tensors = {"tokens": self.tokens.cpu(), "mask": self.mask.cpu()}
        return tensors, {"str_tokens": self.str_tokens, "texts": self.texts, "pad_id": self.pad_id}

    def key(self) -> str:
        """A digest of the ids and mask: equal prompts give equal keys."""
        digest = hashlib.sha256()
        for t in (self.tokens, self.mask):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.cpu().to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]


def input_device(model: Any) -> torch.device:
    """The device a model's inputs go to: where it was placed (``models/placement.py``),
    its ``cfg.device``, else its first parameter's."""
    device = getattr(model, "input_device", None) or getattr(getattr(model, "cfg", None), "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def _decoder(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    return lambda row: [tokenizer.decode([t]) for t in row]


def _token_rows(model: Any, inputs: PromptInput) -> tuple[list[Tensor], list[str] | None]:
    """Each prompt's ids ``[pos]`` (tokenised one at a time) and the texts, if text was given."""
    d_vocab, n_ctx = model.cfg.d_vocab, getattr(model.cfg, "n_ctx", None)
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Tensor):
        return list(check_tokens(inputs, d_vocab, n_ctx).cpu()), None
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no prompts: pass a string, a list of strings or token ids")
    if all(isinstance(x, str) for x in inputs):
        for text in inputs:
            check_prompt(text)
        return [model.to_tokens(text)[0].cpu() for text in inputs], inputs
    if any(isinstance(x, str) for x in inputs):
        raise TypeError("prompts must be all strings or all token ids, not a mix")
    rows = []
    for row in inputs:
        if isinstance(row, Tensor) and row.dtype.is_floating_point:
            raise TypeError(f"tokens must be an integer tensor of ids, got dtype {row.dtype}")
        rows.append(check_tokens(torch.as_tensor(row).reshape(1, -1), d_vocab, n_ctx)[0].cpu())
    return rows, None
