"""SafetensorsImage: the files it writes are safetensors files that safetensors itself reads back."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
import torch
from safetensors import safe_open

from dynalens.models import safetensors_image
from dynalens.models.safetensors_image import PAGE, SafetensorsImage


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(300, 17, generator=g),
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
        "i32": torch.randint(-100, 100, (3, 1), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(13, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


def _written(image: SafetensorsImage, tensors: dict[str, torch.Tensor], path, metadata=None) -> None:
    views = image.layout({name: (t.dtype, t.shape) for name, t in tensors.items()}, metadata)
    for name, t in tensors.items():
        views[name].copy_(t)
    image.write(path)


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def test_safetensors_reads_every_dtype_shape_and_the_metadata(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    _written(SafetensorsImage(), tensors, path, metadata={"model": "tiny"})
    read, metadata = _read(path)
    assert metadata == {"model": "tiny"}
    assert set(read) == set(tensors)
    for name, t in tensors.items():  # a round trip: the same bytes
        assert read[name].dtype == t.dtype and read[name].shape == t.shape
        assert torch.equal(read[name], t), name
    assert not [p.name for p in tmp_path.iterdir() if p.name != "x.safetensors"]  # no temporary file left


@pytest.mark.parametrize("nbytes", [400, PAGE, 3 * PAGE, 3 * PAGE + 20])
def test_files_below_at_and_past_whole_pages(tmp_path, nbytes):
    # a file's whole pages and its tail are written apart
    image = SafetensorsImage()
    image.layout({"x": (torch.int32, (1000,))})
    prefix = image.nbytes - 4000  # the header of a four-digit shape
    n = (nbytes - prefix) // 4
    tensors = {"x": torch.arange(n, dtype=torch.int32)}
    _written(image, tensors, tmp_path / "x.safetensors")
    assert os.path.getsize(tmp_path / "x.safetensors") == image.nbytes == nbytes
    assert torch.equal(_read(tmp_path / "x.safetensors")[0]["x"], tensors["x"])


def test_a_smaller_layout_reuses_the_buffer_and_earlier_files_stay(tmp_path):
    image = SafetensorsImage()
    big = {"a": torch.randn(1000, 8), "tokens": torch.arange(1000)}
    small = {"a": torch.randn(10, 8), "tokens": torch.arange(10)}
    _written(image, big, tmp_path / "big.safetensors")
    first = image.tensors["a"].untyped_storage().data_ptr()
    _written(image, small, tmp_path / "small.safetensors")
    assert image.tensors["a"].untyped_storage().data_ptr() == first
    for name, tensors in [("big", big), ("small", small)]:
        read, _ = _read(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(read[k], v) for k, v in tensors.items())


def test_pages_written_while_rows_are_filled_hold_the_final_bytes(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(700, 33, generator=g), "b": torch.randint(0, 9, (700, 5), generator=g),
               "c": torch.randn(700, generator=g).half(), "s": torch.tensor(1.5)}  # fmt: skip
    image = SafetensorsImage()
    views = image.layout({name: (t.dtype, t.shape) for name, t in tensors.items()})
    for view in views.values():
        view.fill_(-1)  # what a page written too early would keep

    def progress():  # fills 100 rows of each tensor, then says so; the write runs between
        views["s"].copy_(tensors["s"])
        for end in range(100, 701, 100):
            for name in "abc":
                views[name][end - 100 : end] = tensors[name][end - 100 : end]
            yield {"a": end, "b": end, "c": end, "s": 1}

    real, calls = os.pwrite, []
    monkeypatch.setattr(safetensors_image.os, "pwrite", lambda *a: calls.append(len(a[1])) or real(*a))
    image.write(tmp_path / "x.safetensors", progress())
    monkeypatch.undo()
    assert len(calls) > 7  # pages went out as the rows came, not all at the end
    read, _ = _read(tmp_path / "x.safetensors")
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


def test_progress_that_raises_leaves_no_file(tmp_path):
    image = SafetensorsImage()
    image.layout({"x": (torch.float32, (5000,))})

    def progress():
        yield {"x": 2000}
        raise RuntimeError("the forward failed")

    with pytest.raises(RuntimeError, match="the forward failed"):
        image.write(tmp_path / "x.safetensors", progress())
    assert list(tmp_path.iterdir()) == []


def _refuse_direct(monkeypatch, call: str) -> list[int]:
    """Make ``os.open`` or ``os.pwrite`` fail with EINVAL under O_DIRECT, as tmpfs and some filesystems do."""
    real, refused = getattr(os, call), []

    def refusing(*args, **kwargs):
        flags = args[1] if call == "open" else fcntl.fcntl(args[0], fcntl.F_GETFL)
        if flags & os.O_DIRECT:
            refused.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors_image.os, call, refusing)
    return refused


@pytest.mark.parametrize("call", ["open", "pwrite"])
def test_a_filesystem_without_direct_io_gets_the_same_file(tmp_path, monkeypatch, call):
    tensors = _tensors()
    refused = _refuse_direct(monkeypatch, call)
    _written(SafetensorsImage(), tensors, tmp_path / "x.safetensors")
    monkeypatch.undo()
    assert refused  # the fallback ran
    read, _ = _read(tmp_path / "x.safetensors")
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(safetensors_image.os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        _written(SafetensorsImage(), {"x": torch.ones(3)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_bad_layouts_are_clear_errors():
    image = SafetensorsImage()
    with pytest.raises(TypeError, match="cannot hold .*complex64.*it holds"):
        image.layout({"z": (torch.complex64, (2,))})
    with pytest.raises(ValueError, match="negative sizes"):
        image.layout({"x": (torch.float32, (2, -1))})
    with pytest.raises(ValueError, match="__metadata__"):
        image.layout({"__metadata__": (torch.float32, (1,))})
