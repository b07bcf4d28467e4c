"""Atomic file writing: a file appears under its final name complete, or not at all.

Every file freesegdiff writes goes first to a temporary file in the same folder, named
``.<final name>.<8 hex>.freesegdiff.tmp`` (hidden, and ending ``.tmp`` so it is never taken as
an image), is flushed and ``fsync``-ed, then renamed over the final name with :func:`os.replace`
(atomic on POSIX and Windows within one file system). A run killed at any moment therefore
leaves only complete files under final names, plus perhaps a temporary file, which
:func:`remove_stale_temporaries` deletes on the next run. On an error (or Ctrl-C) while writing,
the temporary file is removed and the final name is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from PIL import Image

TEMP_SUFFIX = ".freesegdiff.tmp"
_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")

__all__ = [
    "TEMP_SUFFIX",
    "atomic_file",
    "is_temporary",
    "remove_stale_temporaries",
    "save_image",
    "save_with",
    "temporary_name",
    "write_bytes",
    "write_text",
]


def temporary_name(final_name: str) -> str:
    """A fresh temporary file name for ``final_name``: ``.<final_name>.<8 hex>.freesegdiff.tmp``."""
    return f".{final_name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`temporary_name`'s (a write that did not finish)."""
    return _TEMP_PATTERN.match(name) is not None


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name == "nt":
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temporary binary file that replaces ``path`` when the ``with`` block ends.

    The folder of ``path`` must exist. On leaving the block normally the file is flushed,
    ``fsync``-ed, closed and renamed onto ``path``; on any exception (KeyboardInterrupt too) it is
    closed and deleted, ``path`` is untouched and the exception propagates.

    Example::

        with atomic_file(folder / "x.json") as handle:
            handle.write(b"{}")
    """
    target = Path(path)
    temporary = target.with_name(temporary_name(target.name))
    handle = open(temporary, "xb")  # noqa: SIM115 (closed below on every path)
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temporary, target)
    except BaseException:
        handle.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    _fsync_folder(target.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); return the path."""
    with atomic_file(path) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`); return the path."""
    return write_bytes(path, text.encode(encoding))


def save_image(
    image: Image.Image, path: str | Path, image_format: str = "PNG", **params: Any
) -> Path:
    """Save a PIL image to ``path`` atomically, in ``image_format`` (``"PNG"``, ``"JPEG"``).

    Only what is passed is written: no ``params`` means no text chunks, EXIF or timestamps, so
    the same pixels always give the same bytes (Pillow adds no date to a PNG).
    """
    with atomic_file(path) as handle:
        image.save(handle, format=image_format, **params)
    return Path(path)


def save_with(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(handle)`` on a temporary file that then replaces ``path`` atomically."""
    with atomic_file(path) as handle:
        write(handle)
    return Path(path)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed run left under ``folder`` (searched recursively).

    Only names made by :func:`temporary_name` are touched. Returns the paths removed; a
    folder that does not exist or cannot be read has none.
    """
    removed: list[Path] = []
    for root, _, names in os.walk(folder):
        for name in names:
            if is_temporary(name):
                path = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed
