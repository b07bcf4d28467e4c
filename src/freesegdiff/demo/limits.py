"""What the demo accepts and keeps: the upload, pixel, queue, file and session limits of one
server (:class:`DemoLimits`), reading a request's photo within them (:func:`read_photo`: a
file's size and header are checked before a byte of pixels is decoded), and the request folders
of which only the last are kept (:class:`RequestFolders`)."""

from __future__ import annotations

import collections
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freesegdiff.errors import ConfigError, ImageReadError, ImageTooLargeError
from freesegdiff.io.images import fit_size, header_size, load_image

MB = 1024 * 1024  # the "MB" of --max-upload-mb


@dataclass(frozen=True)
class DemoLimits:
    """What one demo server accepts and keeps (the module docstring says where each applies).

    Attributes:
        max_upload_bytes: largest photo file accepted; None: any size.
        max_pixels: most pixels (width x height, from the file's header) a photo may have;
            None: any.
        oversize: ``"refuse"`` a photo above ``max_pixels`` or ``"downscale"`` it to fit.
        queue_size: requests that may wait while one runs; more are refused as busy.
        keep_requests: request folders (the downloads) kept on disk; older ones are deleted.
        sessions: browser sessions whose Gradio state is kept; older ones are dropped.
        cache_check_seconds, cache_age_seconds: every ``cache_check_seconds``, files of
            Gradio's cache (uploads, served images and downloads) older than
            ``cache_age_seconds`` are deleted; all of them when the server stops. The age must
            be well above the longest wait in the queue (``queue_size`` requests' time), or an
            upload may be swept before its request runs (which then asks to upload again).
    """

    max_upload_bytes: int | None = 25 * MB
    max_pixels: int | None = 40_000_000
    oversize: str = "refuse"
    queue_size: int = 8
    keep_requests: int = 8
    sessions: int = 64
    cache_check_seconds: int = 60
    cache_age_seconds: int = 15 * 60

    def __post_init__(self) -> None:
        counts = {
            "queue_size": (self.queue_size, "--queue-size"),
            "keep_requests": (self.keep_requests, ""),
            "sessions": (self.sessions, ""),
            "cache_check_seconds": (self.cache_check_seconds, ""),
            "cache_age_seconds": (self.cache_age_seconds, "--cache-minutes"),
        }
        for name, (value, flag) in counts.items():
            if value < 1:
                how = f" (pass {flag} 1 or more)" if flag else ""
                raise ConfigError(f"the demo's {name} must be at least 1, got {value}{how}")
        if self.max_upload_bytes is not None and self.max_upload_bytes < 1:
            raise ConfigError(
                f"the demo's upload limit must be positive, got {self.max_upload_bytes} bytes "
                "(pass --max-upload-mb with a positive number)"
            )
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(
                f"the demo's pixel limit must be positive, got {self.max_pixels} "
                "(pass --max-pixels with a positive number)"
            )
        if self.oversize not in ("refuse", "downscale"):
            raise ConfigError(
                f'the demo\'s oversize must be "refuse" or "downscale", got {self.oversize!r}'
            )


def _megabytes(size: int) -> str:
    return f"{size / MB:.1f} MB"


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} Mpx"


def read_photo(image: Any, limits: DemoLimits | None = None) -> np.ndarray:
    """The request's photo as ``(H, W, 3)`` uint8, within ``limits``.

    Args:
        image: Gradio's file payload (a mapping with ``path`` and ``orig_name``), a path, a
            PIL image or an array; None raises ConfigError.
        limits: the upload and pixel limits (default: :class:`DemoLimits`'s). A file's size and
            header are checked before a byte of pixels is decoded.

    Raises:
        ConfigError: no photo was given.
        ImageTooLargeError: the file or the picture is above a limit.
        ImageReadError: the file is not a picture Pillow can decode.
    """
    limits = limits if limits is not None else DemoLimits()
    if isinstance(image, Mapping):  # Gradio's FileData payload
        name = image.get("orig_name") or "the photo"
        image = image.get("path")
    else:
        name = "the photo"
    if image is None:
        raise ConfigError("no photo yet: upload one or pick an example, then press Segment")
    if not isinstance(image, (str, Path)):
        return load_image(image, max_pixels=limits.max_pixels, oversize=limits.oversize)
    path = Path(image)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageReadError(
            f"{name} did not arrive ({error.strerror or error}): upload it again"
        ) from error
    if limits.max_upload_bytes is not None and size > limits.max_upload_bytes:
        raise ImageTooLargeError(
            f"{name} is {_megabytes(size)}, above this demo's upload limit of "
            f"{_megabytes(limits.max_upload_bytes)}: upload a smaller file (a JPEG, or the "
            "photo downscaled)"
        )
    unreadable = (
        f"{name} is not a picture this demo can read (JPEG, PNG, WebP, BMP, TIFF or GIF): "
        "upload another file"
    )
    try:
        width, height = header_size(path)
    except ImageReadError as error:
        raise ImageReadError(unreadable) from error
    limit = limits.max_pixels
    if limits.oversize == "refuse" and limit is not None and width * height > limit:
        fitting = "x".join(map(str, fit_size(width, height, limit)))
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {_mpx(width * height)}, above this "
            f"demo's limit of {_mpx(limit)}: downscale it (e.g. to {fitting}) and upload it again"
        )
    try:
        return load_image(path, max_pixels=limits.max_pixels, oversize=limits.oversize)
    except ImageTooLargeError as error:  # too large to decode reduced (oversize downscale)
        stated = _mpx(limit) if limit else "its limit"
        raise ImageTooLargeError(
            f"{name} has too many pixels for this demo (its limit is {stated}): downscale it "
            "and upload it again"
        ) from error
    except ImageReadError as error:
        raise ImageReadError(unreadable) from error


class RequestFolders:
    """Fresh folders for requests' files, of which only the last ``keep`` stay on disk.

    Gradio copies the files a request returns into its own cache before the response leaves,
    so a request's folder is only needed until the next requests; the root folder goes when
    :meth:`close` is called, the object is collected, or the interpreter exits.
    """

    def __init__(self, keep: int = 8, root: str | Path | None = None) -> None:
        if keep < 1:
            raise ConfigError(f"RequestFolders must keep at least 1 folder, got {keep}")
        self.keep = keep
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="freesegdiff-demo-"))
        else:
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        self._folders: collections.deque[Path] = collections.deque()
        self._count = 0
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def new(self) -> Path:
        """A new empty folder under :attr:`root`; the oldest beyond ``keep`` are deleted."""
        with self._lock:
            self._count += 1
            folder = self.root / f"request-{self._count:08d}"
            folder.mkdir(parents=True)
            self._folders.append(folder)
            stale = [self._folders.popleft() for _ in range(len(self._folders) - self.keep)]
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def folders(self) -> list[Path]:
        """The folders kept now, oldest first."""
        with self._lock:
            return list(self._folders)

    def close(self) -> None:
        """Delete the root folder and everything in it."""
        self._finalizer()
