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
from collections.abc import Iterable, Mapping, Sequence

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
        self._data_start, self._starts, self._row_bytes = 0, {}, {}

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
        self._data_start = len(prefix)
        self._starts = {name: len(prefix) + a for name, (a, _) in spans.items()}
        # the bytes of one row along dim 0 (a 0-d tensor is one row)
        self._row_bytes = {name: (b - a) // max(1, (shapes[name] or [1])[0]) for name, (a, b) in spans.items()}
        self.tensors = {name: data[a:b].view(specs[name][0]).view(shapes[name]) for name, (a, b) in spans.items()}
        return dict(self.tensors)

    def write(self, path: str | os.PathLike, progress: Iterable[Mapping[str, int]] = ()) -> None:
        """Write the file to ``path``: fsynced, then renamed into place.

        Parameters
        ----------
        path
            The file to write.
        progress
            While another thread fills the tensors: each item says how many
            leading rows (along dim 0) of which tensors are final so far (a
            0-d tensor counts 1 row), and the whole pages those rows complete
            are written at once; the rest is written when ``progress`` ends.
            An exception raised by ``progress`` leaves no file.
        """
        data = memoryview(self._image.numpy())
        with atomic_path(path) as tmp:
            fd, direct = _open(tmp)
            try:
                written = torch.zeros(len(data) // PAGE, dtype=torch.bool)
                for filled in progress:
                    if direct:
                        direct = _write_pages(fd, data, self._final_pages(filled) & ~written, written)
                if direct:
                    direct = _write_pages(fd, data, ~written, written)
                if _O_DIRECT:
                    import fcntl  # POSIX only, as O_DIRECT is

                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                start = len(written) * PAGE if direct else 0  # the tail; everything where O_DIRECT is refused
                _pwrite_all(fd, data[start:], start)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _final_pages(self, filled: Mapping[str, int]) -> Tensor:
        """Which whole pages of the file hold only final bytes: the header and ``filled`` rows."""
        spans = sorted([(0, self._data_start)] + [(start, start + rows * self._row_bytes[name])
                       for name, rows in filled.items() for start in [self._starts[name]]])  # fmt: skip
        pages = torch.zeros(self.nbytes // PAGE, dtype=torch.bool)
        begin, end = spans[0]
        for a, b in [*spans[1:], (self.nbytes + 1, 0)]:
            if a > end:  # a gap: [begin, end) is one run of final bytes
                pages[-(-begin // PAGE) : end // PAGE] = True
                begin = a
            end = max(end, b)
        return pages

    def _reserve(self, nbytes: int) -> Tensor:
        """The first ``nbytes`` of the page-aligned buffer, grown when it is too small."""
        if self._storage.numel() < nbytes + PAGE:
            self._storage = torch.empty(nbytes + PAGE, dtype=torch.uint8)
        skip = -self._storage.data_ptr() % PAGE
        self._image = self._storage[skip : skip + nbytes]
        return self._image


_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _open(path: str | os.PathLike) -> tuple[int, bool]:
    """Open ``path`` for writing, with ``O_DIRECT`` where the OS and filesystem accept it (tmpfs does not)."""
    if _O_DIRECT:
        try:
            return os.open(path, os.O_WRONLY | os.O_TRUNC | _O_DIRECT), True
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
    return os.open(path, os.O_WRONLY | os.O_TRUNC), False


def _write_pages(fd: int, data: memoryview, pages: Tensor, written: Tensor) -> bool:
    """Write the runs of ``pages`` (a page mask) with O_DIRECT and mark them ``written``; False if refused."""
    edge = torch.zeros(1, dtype=torch.int8)
    bounds = torch.diff(pages.to(torch.int8), prepend=edge, append=edge).nonzero().flatten().tolist()
    for a, b in zip(bounds[::2], bounds[1::2]):
        try:
            _pwrite_all(fd, data[a * PAGE : b * PAGE], a * PAGE)
        except OSError as err:  # a filesystem that opens with O_DIRECT but refuses the write
            if err.errno != errno.EINVAL:
                raise
            return False
        written[a:b] = True
    return True


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
