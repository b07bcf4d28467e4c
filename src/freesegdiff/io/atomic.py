"""Atomic file writing: a file appears under its final name complete, or not at all.

Every file freesegdiff writes goes first to a temporary file in the same folder, named
``.<16 hex>.freesegdiff.tmp`` (hidden, 33 bytes whatever the final name, so any name a folder
can hold can be written, and ending ``.tmp`` so it is never taken as an image). The bytes go
through a writer that has no file descriptor to hand out, so every encoder (Pillow's, which
otherwise writes to the descriptor itself and lets a short write pass, matplotlib's, ours)
writes through :meth:`write`, which retries short writes and raises on an error such as a full
disk (ENOSPC). The file is then flushed and ``fsync``-ed, its size on disk is checked against
the bytes written, and it is renamed over the final name with :func:`os.replace` (atomic on
POSIX and Windows within one file system). A run killed at any moment therefore leaves only
complete files under final names, plus perhaps a temporary file, which
:func:`remove_stale_temporaries` deletes on the next run. On an error (or Ctrl-C) while writing,
the temporary file is removed and the final name is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from PIL import Image

from freesegdiff.io.filenames import quoted

TEMP_SUFFIX = ".freesegdiff.tmp"
_TEMP_PATTERN = re.compile(r"^\.[0-9a-f]{16}" + re.escape(TEMP_SUFFIX) + "$")
# The temporary names of freesegdiff 0.1.0's first releases (``.<final name>.<8 hex>...``):
# still recognised, so their leftovers are removed too.
_OLD_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")

__all__ = [
    "TEMP_SUFFIX",
    "IncompleteWriteError",
    "atomic_file",
    "describe_write_error",
    "is_temporary",
    "remove_stale_temporaries",
    "save_image",
    "save_with",
    "temporary_name",
    "write_bytes",
    "write_text",
]


_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


class IncompleteWriteError(OSError):
    """The file on disk holds fewer bytes than were written to it (nothing was published)."""


def temporary_name(final_name: str = "") -> str:
    """A fresh temporary file name: ``.<16 hex>.freesegdiff.tmp`` (33 bytes).

    ``final_name`` is not part of it (a long final name would make the temporary one too long
    for the folder); it is accepted so that callers can say what the file is for.
    """
    return f".{secrets.token_hex(8)}{TEMP_SUFFIX}"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`temporary_name`'s (a write that did not finish)."""
    return _TEMP_PATTERN.match(name) is not None or _OLD_TEMP_PATTERN.match(name) is not None


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


class _CheckedRaw(io.RawIOBase):
    """A write-only file over a descriptor that counts the bytes it has written.

    It hands out no descriptor (``fileno`` raises :class:`io.UnsupportedOperation`): Pillow
    then writes through :meth:`write` instead of to the descriptor, where a short write would
    go unnoticed.
    """

    def __init__(self, descriptor: int) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.written = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("atomic files hand out no descriptor")

    def write(self, data: Any) -> int:
        count = os.write(self.descriptor, data)  # a short write: the buffer above retries
        if count == 0 and len(memoryview(data)):
            raise IncompleteWriteError("the file system took no more bytes")
        self.written += count
        return count


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temporary binary file that replaces ``path`` when the ``with`` block ends.

    The folder of ``path`` must exist. On leaving the block normally the file is flushed,
    ``fsync``-ed, checked to hold every byte written (else :class:`IncompleteWriteError`),
    closed and renamed onto ``path``; on any exception (KeyboardInterrupt too) it is closed and
    deleted, ``path`` is untouched and the exception propagates. An OS error while writing (a
    full disk: ``errno.ENOSPC``) is raised as the :class:`OSError` it is.

    Example::

        with atomic_file(folder / "x.json") as handle:
            handle.write(b"{}")
    """
    target = Path(path)
    temporary = target.with_name(temporary_name())
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    raw = _CheckedRaw(descriptor)
    handle = io.BufferedWriter(raw)
    try:
        try:
            yield handle
            handle.flush()
            os.fsync(descriptor)
            size = os.fstat(descriptor).st_size
            if size != raw.written:
                raise IncompleteWriteError(
                    f"{size} of {raw.written} bytes of {str(target)!r} reached the disk"
                )
        finally:
            with contextlib.suppress(OSError, ValueError):
                handle.close()  # (a failed flush of the buffer: the file is dropped below)
            with contextlib.suppress(OSError):
                os.close(descriptor)
        os.replace(temporary, target)
    except BaseException:
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


_FULL = {
    errno.ENOSPC: "no space left on device",
    getattr(errno, "EDQUOT", -1): "disk quota exceeded",
}


def describe_write_error(error: BaseException) -> str:
    """A message for an error met while writing a run's files: what happened and what to do.

    A full disk or quota (ENOSPC, EDQUOT) and a file cut short (:class:`IncompleteWriteError`)
    say to free space and run the same command with ``--resume``; other errors give the
    system's words and the file.
    """
    number = getattr(error, "errno", None)
    if number in _FULL or isinstance(error, IncompleteWriteError):
        what = _FULL.get(number or 0) or str(error)
        return f"{what}: free some space, then run the same command with --resume"
    if isinstance(error, OSError) and error.strerror:
        where = f" ({quoted(error.filename)})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)
