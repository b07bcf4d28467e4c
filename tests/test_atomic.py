"""Atomic writes: a final name holds the old file or the complete new one, never a part."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from freesegdiff.atomic import (
    atomic_file,
    is_temporary,
    remove_stale_temporaries,
    save_image,
    temporary_name,
    write_text,
)
from freesegdiff.image_io import IMAGE_SUFFIXES


def png_chunks(data: bytes) -> list[bytes]:
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append(data[position + 4 : position + 8])
        position += 12 + length
    return chunks


def test_temporary_names_are_hidden_never_images_and_recognised():
    name = temporary_name("x.png")
    assert name.startswith(".x.png.") and name.endswith(".tmp")
    assert not any(name.lower().endswith(suffix) for suffix in IMAGE_SUFFIXES)
    assert is_temporary(name) and name != temporary_name("x.png")
    for other in ("x.png", ".x.png.tmp", "x.png.0123abcd.freesegdiff.tmp", ".cache"):
        assert not is_temporary(other), other


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
