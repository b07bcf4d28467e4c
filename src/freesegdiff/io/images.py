"""Reading images: any path, PIL image or array in, an RGB ``uint8`` array out.

Documented conversions (no silent surprises):

- EXIF orientation is applied, so the array is the image as a viewer shows it.
- Grayscale (L, 1, I, I;16, F) is repeated to three channels; 16-bit values are scaled by 1/257,
  float images' values are taken as [0, 1] (or [0, 255] when any value exceeds 1) and clipped.
- Arrays given directly: (H, W), (H, W, 1|3|4) or (1|3|4, H, W) of bool, unsigned or signed
  integers (0-255, or 0-65535 scaled by 1/257 when any value exceeds 255; never negative) or
  floats in [0, 1]. Anything else is refused with a message that says what to pass: an object,
  complex or text array, negative or NaN values, floats in 0-255, two channels.
- Alpha (RGBA, LA, PA, transparent palettes) is composited over white.
- Palette, CMYK, YCbCr, LAB and HSV images are converted to RGB.

Size limit: an image of more than ``max_pixels`` pixels (its header's width x height, read
before anything is decoded) is refused with :class:`~freesegdiff.errors.ImageTooLargeError`,
or with ``oversize="downscale"`` decoded at a reduced size where the format allows it (JPEG's
draft mode) and resized (PIL's Lanczos) to fit. This limit replaces Pillow's decompression-bomb
check, whose error would otherwise escape as a foreign exception.

An :class:`EncodedImage` (a file's name and bytes, :func:`read_encoded`) is decoded exactly as
the file itself would be, with the same messages: a Ray run reads files in CPU tasks and
decodes them in the actors (:mod:`freesegdiff.distributed`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from freesegdiff.config import DEFAULT_MAX_PIXELS
from freesegdiff.errors import ImageReadError, ImageTooLargeError
from freesegdiff.io.filenames import quoted

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class EncodedImage:
    """An image file read but not decoded: its path (the image's name) and its bytes."""

    name: str
    data: bytes


ImageInput = str | Path | Image.Image | np.ndarray | EncodedImage

# With oversize="downscale", a format that cannot be decoded at a reduced size (all but JPEG) is
# decoded whole first: allowed up to this many times max_pixels (3 bytes a pixel), refused above.
DOWNSCALE_DECODE_FACTOR = 4
_pillow_limit_lock = threading.Lock()

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def _scale_to_uint8(values: np.ndarray, floats_in_01: bool = False) -> np.ndarray:
    """Map integer or float pixel values to uint8 as the module docstring says
    (``floats_in_01``: floats are in [0, 1], an array's rule, not guessed as an image's)."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.integer):
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageReadError("the image holds NaN or infinite values")
    scale = 1.0 if values.max(initial=0.0) > 1.0 and not floats_in_01 else 255.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


# Float values this far outside [0, 1] are still taken as rounding and clipped.
_FLOAT_SLACK = 1e-3


def _array_problem(array: np.ndarray) -> str | None:
    """Why the values of an array given as an image cannot be one (the module docstring), or
    None."""
    kind = array.dtype.kind
    if kind not in "biuf":
        return (
            f"an image array must hold numbers (bool, integers or floats); got dtype "
            f"{array.dtype} ({array.dtype.kind!r} kind)"
        )
    if kind == "b" or array.size == 0:
        return None
    low, high = array.min(), array.max()
    if kind in "iu":
        if low < 0:
            return f"an integer image array must hold values 0 to 255 (or 65535); it holds {low}"
        if high > 65535:
            return f"an integer image array must hold values up to 65535; it holds {high}"
        return None
    if not np.isfinite(array).all():
        return "the image holds NaN or infinite values"
    if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
        hint = " divide by 255 (or pass uint8)" if low >= 0 and high <= 255 else ""
        return (
            f"a float image array must hold values in [0, 1]; it holds {float(low):g} to "
            f"{float(high):g}:{hint or ' rescale it to [0, 1]'}"
        )
    return None


def _from_array(array: np.ndarray, channels_last: bool = False, strict: bool = False) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any numeric dtype -> (H, W, 3) uint8.

    A (C, H, W) array is recognised unless ``channels_last`` says the layout is known (PIL's
    pixels always are: an LA image 3 pixels high is (3, W, 2), not channel-first). ``strict``
    (an array a caller gave): its values must be what the module docstring says, and two
    channels are refused as ambiguous (gray and alpha, or a two-band raster).
    """
    if strict:
        problem = _array_problem(array)
        if problem is not None:
            raise ImageReadError(problem)
    if (
        not channels_last
        and array.ndim == 3
        and array.shape[0] in (1, 3, 4)
        and array.shape[-1] not in (1, 3, 4)
    ):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 2:
        array = array[:, :, None]
    channels = (1, 3, 4) if strict else (1, 2, 3, 4)
    if array.ndim != 3 or array.shape[-1] not in channels or min(array.shape[:2]) < 1:
        raise ImageReadError(
            "an image array must be (H, W), (H, W, 1|3|4) or (1|3|4, H, W), each side at least "
            f"1; got shape {array.shape}"
        )
    pixels = _scale_to_uint8(np.asarray(array), floats_in_01=strict)
    channels = pixels.shape[-1]
    if channels in (2, 4):  # colour + alpha over white
        colour = pixels[..., : channels - 1].astype(np.float32)
        alpha = pixels[..., -1:].astype(np.float32) / 255.0
        pixels = np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most ``max_pixels`` pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    fitted = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while fitted[0] * fitted[1] > max_pixels:  # floating-point rounding
        fitted = max(1, fitted[0] - 1), max(1, fitted[1] - 1)
    return fitted


def _check_size(width: int, height: int, max_pixels: int | None, oversize: str, what: str) -> bool:
    """Whether the image must be downscaled; raises when it is to be refused."""
    if max_pixels is None or width * height <= max_pixels:
        return False
    if oversize not in ("refuse", "downscale"):
        raise ValueError(f'oversize must be "refuse" or "downscale", got {oversize!r}')
    if oversize == "refuse":
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} Mpx, above the limit of "
            f"{max_pixels / 1e6:.1f} Mpx (limits.max_pixels); raise the limit "
            "(--max-pixels) or downscale such images (--oversize downscale)"
        )
    return True


def _from_pil(
    image: Image.Image, max_pixels: int | None = None, oversize: str = "refuse", what: str = ""
) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8, EXIF orientation applied, within the limit."""
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose the picture
        image = ImageOps.exif_transpose(image)
    if _check_size(*image.size, max_pixels, oversize, what or "the image"):
        assert max_pixels is not None
        if image.mode not in ("RGB", "RGBA", "L", "LA", "I", "F"):
            modes = {"1": "L", "P": "RGBA" if "transparency" in image.info else "RGB"}
            image = image.convert(modes.get(image.mode, "RGBA" if "A" in image.mode else "RGB"))
        # Box-reduce by whole factors first, then Lanczos over the last factor of <= 2: fast
        # on huge images, and as sharp as Lanczos alone to the eye.
        size = fit_size(*image.size, max_pixels)
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return _from_array(np.asarray(image), channels_last=True)
    if image.mode.startswith(("I", "F")):
        values = np.asarray(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values.astype(np.float64) / 257.0  # 16-bit -> 8-bit
        pixels = _scale_to_uint8(values) if values.dtype.kind == "f" else values
        return _from_array(pixels, channels_last=True)
    return _from_array(np.asarray(image.convert("RGB")), channels_last=True)


def load_image(
    source: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    oversize: str = "refuse",
) -> np.ndarray:
    """Read one image as an RGB array.

    Args:
        source: a file path, a PIL image, an array (see the module docstring for dtypes), or
            an :class:`EncodedImage` (decoded as its file would be).
        max_pixels: most pixels (width x height) an image may have; None: no limit.
        oversize: ``"refuse"`` an image above ``max_pixels`` (:class:`ImageTooLargeError`,
            before a file is decoded) or ``"downscale"`` it to fit (aspect ratio kept).

    Returns:
        ``(H, W, 3)`` ``uint8`` array.

    Raises:
        ImageReadError: the path is empty, a URL, missing or not a regular file, the file is
            not an image, the array has an unusable shape or values, or
            (:class:`ImageTooLargeError`) the image is above ``max_pixels`` and refused.
    """
    if isinstance(source, np.ndarray):
        pixels = _from_array(source, strict=True)
        if _check_size(pixels.shape[1], pixels.shape[0], max_pixels, oversize, "the array"):
            return _from_pil(Image.fromarray(pixels), max_pixels, oversize)
        return pixels
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels, oversize)
    if isinstance(source, (str, Path)):
        path = _existing_file(source)
        return _decode(path, quoted(path), max_pixels, oversize)
    if isinstance(source, EncodedImage):
        return _decode(io.BytesIO(source.data), quoted(source.name), max_pixels, oversize)
    raise ImageReadError(
        f"cannot use a {type(source).__name__} as an image; give a path, a PIL image or an array"
    )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def file_problem(source: str | Path) -> str | None:
    """Why ``source`` is not a regular file that can be opened, or None when it is one.

    The reason completes a sentence about the path: ``"does not exist"``, ``"is a broken
    symbolic link (to '...')"``, ``"is a FIFO (named pipe), not a regular file"``, ``"is a
    character device, not a regular file"`` (``/dev/zero``), ``"is a socket, ..."``, ``"is a
    folder, not an image file"``, or for text that is no path at all ``"is empty"`` and ``"is a
    URL: freesegdiff reads local files; download it first"``.
    """
    text = os.fspath(source)
    if not text.strip():
        return "is empty: give an image file's path"
    if _URL.match(text):
        return (
            "is a URL: freesegdiff reads local files; download it first (e.g. "
            "urllib.request.urlretrieve) and give the file, or pass a PIL image"
        )
    try:
        status = os.stat(text)
    except OSError as error:
        if os.path.islink(text):
            target = os.readlink(text)
            return f"is a broken symbolic link (to {quoted(target)})"
        if isinstance(error, FileNotFoundError):
            return "does not exist"
        return f"cannot be read: {error.strerror or error}"
    mode = status.st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    kinds = {
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a file")
    return f"is {kind}, not a regular file"


def _existing_file(source: str | Path) -> Path:
    """``source`` as a path; :class:`ImageReadError` (:func:`file_problem`'s reason) when it is
    not a regular file."""
    problem = file_problem(source)
    if problem is not None:
        raise ImageReadError(f"image file {quoted(source)} {problem}")
    return Path(source)


def read_encoded(path: str | Path) -> EncodedImage:
    """A file's bytes, to be decoded elsewhere by :func:`load_image` (no pixel is decoded here).

    Raises:
        ImageReadError: with the message :func:`load_image` would give for the path.
    """
    path = _existing_file(path)
    try:
        return EncodedImage(str(path), path.read_bytes())
    except OSError as error:
        raise ImageReadError(f"cannot read {quoted(path)} as an image: {error}") from error
    except MemoryError as error:
        raise ImageReadError(f"not enough memory to decode {quoted(path)}") from error


def _decode(file: Path | IO[bytes], what: str, max_pixels: int | None, oversize: str) -> np.ndarray:
    """Decode a file (a path or its bytes) as :func:`load_image`; ``what``: its name, quoted."""
    try:
        with _open_unbounded(file) as image:
            if _check_size(*image.size, max_pixels, oversize, what):
                assert max_pixels is not None
                _prepare_downscale(image, max_pixels, what)
            image.load()
            return _from_pil(image, max_pixels, oversize, what)
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:  # Pillow names a path, but not bytes, as here
        raise ImageReadError(
            f"cannot read {what} as an image: cannot identify image file {what}"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read {what} as an image: {error}") from error
    except MemoryError as error:
        raise ImageReadError(f"not enough memory to decode {what}") from error


def header_size(source: str | Path | IO[bytes], max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` that an image file's header states; no pixel is decoded.

    The one place a size is read before decoding (the pixel limit of :func:`load_image`, the
    demo's upload check, a benchmark's ground truth against its image). Without ``max_pixels``
    a decompression bomb's claimed size is returned, for the caller to refuse.

    Raises:
        ImageReadError: the file cannot be read or is not an image Pillow can identify;
            (:class:`ImageTooLargeError`) it claims more than ``max_pixels``.
    """
    what = quoted(source) if isinstance(source, (str, Path)) else "the file"
    if isinstance(source, (str, Path)):
        _existing_file(source)
    try:
        with _open_unbounded(source) as image:
            width, height = int(image.size[0]), int(image.size[1])
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read {what} as an image: {error}") from error
    _check_size(width, height, max_pixels, "refuse", what)
    return width, height


def _open_unbounded(path: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open`` (the header only) without Pillow's own pixel limit: ours replaces it.

    Pillow warns above 89 Mpx and raises above twice that, from inside ``open``; the limit is
    lifted (under a lock, as it is process-wide) only for a file that Pillow would refuse.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            with _pillow_limit_lock:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    return Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved


def _prepare_downscale(image: Image.Image, max_pixels: int, what: str) -> None:
    """Before decoding an image above the limit: decode JPEG at a reduced scale (draft mode);
    refuse other formats whose full decode would exceed ``DOWNSCALE_DECODE_FACTOR`` times it."""
    width, height = image.size
    if image.format == "JPEG":
        image.draft(image.mode, fit_size(width, height, max_pixels))
        width, height = image.size
    if width * height > DOWNSCALE_DECODE_FACTOR * max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} Mpx: too large to decode "
            f"for downscaling (at most {DOWNSCALE_DECODE_FACTOR} x limits.max_pixels = "
            f"{DOWNSCALE_DECODE_FACTOR * max_pixels / 1e6:.1f} Mpx, as {image.format or 'this'}"
            " files cannot be decoded at a reduced size); raise --max-pixels if memory allows"
        )


@dataclass
class SkippedEntries:
    """Folder entries a walk left out: what a run's summary reports.

    ``not_images``: ``{extension: [path, ...]}`` for regular files whose names do not end in one
    of :data:`IMAGE_SUFFIXES` (``""``: no extension); ``not_files``: ``{kind: [path, ...]}``
    for entries that are no regular file: ``"FIFO (named pipe)"``, ``"character device"``,
    ``"block device"``, ``"socket"``, ``"broken symbolic link"``.
    """

    not_images: dict[str, list[Path]] = field(default_factory=dict)
    not_files: dict[str, list[Path]] = field(default_factory=dict)

    def __len__(self) -> int:
        groups = (*self.not_images.values(), *self.not_files.values())
        return sum(len(paths) for paths in groups)

    def describe(self) -> str:
        """One line, e.g. ``"4 folder entries skipped: other extensions 2 (.avif 1, .svg 1),
        FIFO (named pipe) 1, broken symbolic link 1; images are read from .jpg .jpeg ..."``."""
        parts = []
        if self.not_images:
            groups = sorted(self.not_images.items())
            kinds = ", ".join(f"{suffix or 'none'} {len(paths)}" for suffix, paths in groups)
            count = sum(len(paths) for _, paths in groups)
            parts.append(f"other extensions {count} ({kinds})")
        parts += [f"{kind} {len(paths)}" for kind, paths in sorted(self.not_files.items())]
        total = len(self)
        return (
            f"{total} folder entr{'y' if total == 1 else 'ies'} skipped: {', '.join(parts)}; "
            f"images are read from {' '.join(IMAGE_SUFFIXES)}"
        )


def _entry_problem(item: os.DirEntry[str]) -> str | None:
    """What a folder entry that is not a folder is, when it is no regular file (None: it is)."""
    try:
        mode = item.stat().st_mode  # follows links
    except OSError:
        return "broken symbolic link" if item.is_symlink() else "unreadable entry"
    if stat.S_ISREG(mode):
        return None
    for test, kind in (
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "other non-file"


def iter_image_files(
    inputs: Iterable[str | Path],
    *,
    exclude: Iterable[str | Path] = (),
    errors: dict[str, str] | None = None,
    skipped: SkippedEntries | None = None,
) -> Iterator[Path]:
    """Expand files and folders (searched recursively, sorted) into image file paths.

    A file input is taken as given, whatever its name, if it is a regular file (or a link to
    one). A folder is searched for regular files whose names end in one of
    :data:`IMAGE_SUFFIXES` (any case), in sorted order (each folder's names sorted, subfolders
    walked where they sort: the order of the sorted paths), following links to folders but never
    into the same folder twice. Left out: the folders in ``exclude`` (such as an output folder
    inside an input folder, so a run never reads its own outputs) and hidden ``.tmp`` files (an
    unfinished write, see :mod:`freesegdiff.io.atomic`), silently; other names, FIFOs, devices,
    sockets and broken links, counted in ``skipped``.

    Args:
        inputs: image files and folders.
        exclude: folders not to search (compared as the same folder on disk, however named).
        errors: where to record the inputs that cannot be used (missing, a broken link, a FIFO
            or device: :func:`file_problem`'s reason) and the folders that cannot be read,
            ``{path: reason}``; the walk goes on without them. None: such an input raises
            :class:`ImageReadError`.
        skipped: where to count the folder entries left out (:class:`SkippedEntries`).

    Raises:
        ImageReadError: (without ``errors``) an input is not a file or folder, or a folder
            under an input cannot be listed.
    """

    def fail(path: Path, reason: str) -> None:
        if errors is None:
            raise ImageReadError(f"{quoted(path)}: {reason}")
        errors[str(path)] = reason

    def folder_key(folder: Path) -> tuple[int, int] | None:
        try:
            status = folder.stat()
        except OSError:
            return None
        return status.st_dev, status.st_ino

    excluded = {key for key in (folder_key(Path(folder)) for folder in exclude) if key}
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[Path]:
        key = folder_key(folder)
        if key is not None and (key in excluded or key in seen):
            return
        if key is not None:
            seen.add(key)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda item: item.name)
        except OSError as error:
            fail(
                folder,
                f"cannot read the folder: {error.strerror or error}; fix its permissions "
                "(e.g. chmod u+rx) or leave it out",
            )
            return
        for item in entries:
            child = folder / item.name
            try:
                is_folder = item.is_dir()  # follows links; a broken link is neither
            except OSError:
                is_folder = False
            if is_folder:
                yield from walk(child)
                continue
            if item.name.startswith(".") and item.name.endswith(".tmp"):
                continue  # a write in progress or left by a killed run: never an input
            suffix = Path(item.name).suffix.lower()
            problem = _entry_problem(item)
            if problem is None and suffix in IMAGE_SUFFIXES:
                yield child
            elif skipped is not None and problem is None:
                skipped.not_images.setdefault(suffix, []).append(child)
            elif skipped is not None and problem is not None:
                skipped.not_files.setdefault(problem, []).append(child)

    for entry in inputs:
        path = Path(entry)
        problem = file_problem(entry)
        if problem == "is a folder, not an image file":
            yield from walk(path)
        elif problem is None:
            yield path
        else:
            fail(path, f"the input {problem}")
