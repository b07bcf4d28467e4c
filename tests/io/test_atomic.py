"""Atomic writes: a final name holds the old file or the complete new one, never a part."""

from __future__ import annotations

import errno
import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from freesegdiff.io.atomic import (
    IncompleteWriteError,
    atomic_file,
    describe_write_error,
    is_temporary,
    remove_stale_temporaries,
    save_image,
    temporary_name,
    write_text,
)
from freesegdiff.io.images import IMAGE_SUFFIXES


def png_chunks(data: bytes) -> list[bytes]:
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append(data[position + 4 : position + 8])
        position += 12 + length
    return chunks


def test_temporary_names_are_hidden_never_images_short_and_recognised():
    name = temporary_name("x.png")
    assert name.startswith(".") and name.endswith(".freesegdiff.tmp")
    assert len(name.encode()) == 33  # whatever the final name: a 250-byte name can be written
    assert len(temporary_name("y" * 250)) == 33
    assert not any(name.lower().endswith(suffix) for suffix in IMAGE_SUFFIXES)
    assert is_temporary(name) and name != temporary_name("x.png")
    assert is_temporary(".x.png.0123abcd.freesegdiff.tmp")  # an older version's leftover
    for other in ("x.png", ".x.png.tmp", "x.png.0123abcd.freesegdiff.tmp", ".cache"):
        assert not is_temporary(other), other


def test_a_250_byte_name_is_written(tmp_path):
    path = tmp_path / ("n" * 246 + ".png")
    assert len(path.name.encode()) == 250
    save_image(Image.new("RGB", (2, 2)), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


class FullDisk:
    """``os.write`` on a disk with ``room`` bytes left: short writes, then ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.calls = 0

    def __call__(self, descriptor: int, data) -> int:
        self.calls += 1
        count = min(len(data), self.room)
        if count == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= count
        return os.write(descriptor, bytes(memoryview(data)[:count]))


class DiskOs:
    """The ``os`` module as the atomic writer sees it, its ``write`` replaced by ``disk`` (and
    any other function by a keyword)."""

    def __init__(self, disk=os.write, **replaced) -> None:
        self.write = disk
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(os, name)


def noisy_image(size: int = 200) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)  # incompressible: every encoder writes many blocks


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_a_full_disk_never_publishes_a_short_image(tmp_path, monkeypatch, image_format):
    """Pillow's encoders write to a file's descriptor when it has one, and a short write goes
    unnoticed there; the atomic file hands out none, so every byte goes through a checked
    write: the disk filling up mid-image is an ENOSPC error, and nothing is published."""
    import freesegdiff.io.atomic as atomic

    path = tmp_path / f"x.{image_format.lower()}"
    path.write_bytes(b"the old, complete file")
    disk = FullDisk(room=4096)
    monkeypatch.setattr(atomic, "os", DiskOs(disk))
    with pytest.raises(OSError) as raised:
        save_image(noisy_image(), path, image_format)
    assert raised.value.errno == errno.ENOSPC
    assert disk.calls >= 2  # a short write first, then the error
    assert path.read_bytes() == b"the old, complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert "no space left on device" in describe_write_error(raised.value)
    assert "--resume" in describe_write_error(raised.value)


def test_a_file_the_disk_did_not_keep_whole_is_not_published(tmp_path, monkeypatch):
    """The size on disk after fsync is compared with the bytes written."""
    import freesegdiff.io.atomic as atomic

    real_fstat = os.fstat

    class Short:
        def __init__(self, status):
            self.st_size = status.st_size - 1

    monkeypatch.setattr(atomic, "os", DiskOs(fstat=lambda fd: Short(real_fstat(fd))))
    path = tmp_path / "x.json"
    with pytest.raises(IncompleteWriteError, match="reached the disk"):
        write_text(path, '{"whole": true}')
    assert list(tmp_path.iterdir()) == []


def test_every_writer_goes_through_the_checked_write(tmp_path):
    """Pillow and matplotlib find no descriptor to write to behind the atomic file."""
    with atomic_file(tmp_path / "x.bin") as handle:
        with pytest.raises(io.UnsupportedOperation):
            handle.fileno()
        handle.write(b"abc")
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    assert write_text(path, '{"new": true}') == path
    assert path.read_text() == '{"new": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, error):
    path = tmp_path / "x.png"
    path.write_bytes(b"the old, complete file")
    with pytest.raises(type(error)), atomic_file(path) as handle:
        handle.write(b"half of the new")
        assert [p for p in tmp_path.iterdir() if is_temporary(p.name)]  # written aside
        raise error
    assert path.read_bytes() == b"the old, complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_killed_runs_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / temporary_name("a.png"), tmp_path / "sub" / temporary_name("b.json")]
    kept = [tmp_path / "a.png", tmp_path / ".other.tmp", tmp_path / "sub" / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_images_are_saved_with_no_date_the_same_bytes_every_time(tmp_path):
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    first = save_image(image, tmp_path / "a.png").read_bytes()
    second = save_image(image, tmp_path / "b.png").read_bytes()
    assert first == second
    assert png_chunks(first) == [b"IHDR", b"IDAT", b"IEND"]  # no tIME, no text
    save_image(image, tmp_path / "c.jpg", "JPEG", quality=85)
    with Image.open(tmp_path / "c.jpg") as jpeg:
        assert jpeg.format == "JPEG"
    with Image.open(io.BytesIO(first)) as png:
        assert np.array_equal(np.asarray(png), np.asarray(image))
