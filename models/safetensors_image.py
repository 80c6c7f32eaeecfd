"""A safetensors file laid out in one reusable buffer and written from it without copies.

A safetensors file is an 8-byte little-endian header length, a JSON header
(each tensor's dtype, shape and byte range in the data) and the tensors'
bytes back to back. :class:`SafetensorsImage` lays the whole file out in one
page-aligned buffer and hands out its tensors as views of that buffer: what
fills the views fills the file, and :meth:`SafetensorsImage.write` passes the
buffer to the kernel as it is (no serialised copy). Where the filesystem
allows, the page-aligned part bypasses the page cache (``O_DIRECT``): the
device reads the buffer itself, so a file written on a thread takes no CPU
time from the computation beside it; elsewhere the same buffer is written
normally. The file is fsynced and renamed into place
(:func:`dynalens.models.io.atomic_path`). A later layout of the same or a
smaller size reuses the buffer, so its pages are not faulted in again.

Examples
--------
>>> image = SafetensorsImage()
>>> views = image.layout({"x": (torch.float32, (2, 3)), "ids": (torch.int64, (2,))})
>>> views["x"].copy_(torch.ones(2, 3)); views["ids"].copy_(torch.arange(2))   # doctest: +SKIP
>>> image.write("out.safetensors")                                            # doctest: +SKIP
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from dynalens.models.io import atomic_path

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The torch dtypes an image holds, with their safetensors names."""

PAGE = 4096
"""Alignment of the buffer and of the part written with ``O_DIRECT`` (bytes)."""

DATA_ALIGN = 64
"""The header is padded with spaces so that the tensor data starts at a multiple of this (bytes)."""


class SafetensorsImage:
    """One safetensors file's bytes in a reusable page-aligned buffer; its tensors are views of it.

    :meth:`layout` sets the tensors (names, dtypes, shapes) and returns their
    views, uninitialised; fill them, then :meth:`write` the file. Each
    ``layout`` invalidates the views of the one before.
    """

    def __init__(self) -> None:
        self._storage = torch.empty(0, dtype=torch.uint8)
        self._image = self._storage
        self.tensors: dict[str, Tensor] = {}

    @property
    def nbytes(self) -> int:
        """The size of the laid out file, in bytes."""
        return self._image.numel()

    def layout(
        self, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None = None
    ) -> dict[str, Tensor]:
        """Lay out a file of ``specs`` (name → ``(dtype, shape)``); return the tensors as views of the buffer.

        Parameters
        ----------
        specs
            Each tensor's dtype (one of :data:`DTYPES`) and shape; a shape may
            hold zeros (an empty tensor) or be ``()`` (a 0-d tensor).
        metadata
            Text stored under the header's ``__metadata__``.

        Returns
        -------
        dict[str, Tensor]
            Contiguous views ``[*shape]`` of the file's bytes, uninitialised (also kept as ``self.tensors``).
        """
        unsupported = {name: str(dtype) for name, (dtype, _) in specs.items() if dtype not in DTYPES}
        if unsupported:
            raise TypeError(
                f"a safetensors image cannot hold {unsupported}; it holds {sorted(str(d) for d in DTYPES)}"
            )
        if "__metadata__" in specs:
            raise ValueError("'__metadata__' is the safetensors header's metadata key, not a tensor name")
        # Widest dtype first, as safetensors orders them: every tensor's data starts aligned to its dtype.
        order = sorted(specs, key=lambda name: (-specs[name][0].itemsize, name))
        shapes = {name: [int(n) for n in specs[name][1]] for name in order}
        negative = {name: shape for name, shape in shapes.items() if any(n < 0 for n in shape)}
        if negative:
            raise ValueError(f"shapes must not hold negative sizes: {negative}")
        spans, offset = {}, 0
        for name in order:
            spans[name] = (offset, offset + specs[name][0].itemsize * math.prod(shapes[name]))
            offset = spans[name][1]
        header: dict[str, object] = {
            name: {"dtype": DTYPES[specs[name][0]], "shape": shapes[name], "data_offsets": list(spans[name])}
            for name in order
        }
        if metadata:
            header["__metadata__"] = dict(metadata)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % DATA_ALIGN)
        prefix = len(text).to_bytes(8, "little") + text
        image = self._reserve(len(prefix) + offset)
        image[: len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        data = image[len(prefix) :]
        self.tensors = {name: data[a:b].view(specs[name][0]).view(shapes[name]) for name, (a, b) in spans.items()}
        return dict(self.tensors)

    def write(self, path: str | os.PathLike) -> None:
        """Write the file to ``path``: fsynced, then renamed into place."""
        with atomic_path(path) as tmp:
            _write_synced(tmp, memoryview(self._image.numpy()))

    def _reserve(self, nbytes: int) -> Tensor:
        """The first ``nbytes`` of the page-aligned buffer, grown when it is too small."""
        if self._storage.numel() < nbytes + PAGE:
            self._storage = torch.empty(nbytes + PAGE, dtype=torch.uint8)
        skip = -self._storage.data_ptr() % PAGE
        self._image = self._storage[skip : skip + nbytes]
        return self._image


def _write_synced(path: str | os.PathLike, data: memoryview) -> None:
    """Write ``data`` (page-aligned) over the file ``path`` and fsync it.

    Its whole pages go with ``O_DIRECT`` where the OS and filesystem accept
    it, the tail (and everything, where they do not) through the page cache.
    """
    direct = getattr(os, "O_DIRECT", 0)
    whole = len(data) // PAGE * PAGE if direct else 0
    fd = -1
    if whole:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | direct)
        except OSError as err:  # e.g. tmpfs refuses O_DIRECT
            if err.errno != errno.EINVAL:
                raise
    if fd < 0:
        fd, whole = os.open(path, os.O_WRONLY | os.O_TRUNC), 0
    try:
        done = 0
        if whole:
            try:
                done = _write_all(fd, data[:whole])
            except OSError as err:  # a filesystem that opens with O_DIRECT but refuses the write
                if err.errno != errno.EINVAL:
                    raise
                os.lseek(fd, 0, os.SEEK_SET)
            import fcntl  # POSIX only, as O_DIRECT is

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)
        _write_all(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> int:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    return written
