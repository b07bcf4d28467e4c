"""Reading images: any path, PIL image or array in, an RGB ``uint8`` array out.

Documented conversions (no silent surprises):

- EXIF orientation is applied, so the array is the image as a viewer shows it.
- Grayscale (L, 1, I, I;16, F) is repeated to three channels; 16-bit values are scaled by 1/257,
  float values are taken as [0, 1] (or [0, 255] when any value exceeds 1) and clipped.
- Alpha (RGBA, LA, PA, transparent palettes) is composited over white.
- Palette, CMYK, YCbCr, LAB and HSV images are converted to RGB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from freesegdiff.errors import ImageReadError

if TYPE_CHECKING:
    import torch

ImageInput = str | Path | Image.Image | np.ndarray

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map integer or float pixel values to uint8 as the module docstring says."""
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
    scale = 1.0 if values.max(initial=0.0) > 1.0 else 255.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any numeric dtype -> (H, W, 3) uint8."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageReadError(
            f"an image array must be (H, W), (H, W, 1|3|4) or (3, H, W); got shape {array.shape}"
        )
    pixels = _scale_to_uint8(np.asarray(array))
    channels = pixels.shape[-1]
    if channels in (2, 4):  # colour + alpha over white
        colour = pixels[..., : channels - 1].astype(np.float32)
        alpha = pixels[..., -1:].astype(np.float32) / 255.0
        pixels = np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def _from_pil(image: Image.Image) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8, EXIF orientation applied."""
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose the picture
        image = ImageOps.exif_transpose(image)
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
        return _from_array(np.asarray(image))
    if image.mode.startswith(("I", "F")):
        values = np.asarray(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values.astype(np.float64) / 257.0  # 16-bit -> 8-bit
        return _from_array(_scale_to_uint8(values) if values.dtype.kind == "f" else values)
    return _from_array(np.asarray(image.convert("RGB")))


def load_image(source: ImageInput) -> np.ndarray:
    """Read one image as an RGB array.

    Args:
        source: a file path, a PIL image, or an array (see the module docstring for dtypes).

    Returns:
        ``(H, W, 3)`` ``uint8`` array.

    Raises:
        ImageReadError: the file is missing or not an image, or the array has an unusable shape.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        return _from_pil(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageReadError(f"image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as image:
                image.load()
                return _from_pil(image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageReadError(f"cannot read {str(path)!r} as an image: {error}") from error
    raise ImageReadError(
        f"cannot use a {type(source).__name__} as an image; give a path, a PIL image or an array"
    )


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` uint8 tensor sharing memory when it can
    (read-only arrays, e.g. scikit-image's bundled photos, are copied)."""
    import torch  # here, so that reading images does not import torch

    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, copy=True, order="C")
    return torch.from_numpy(image).permute(2, 0, 1)


def iter_image_files(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Expand files and folders (searched recursively, sorted) into image file paths.

    Raises:
        ImageReadError: an input path does not exist.
    """
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
                    yield child
        elif path.exists():
            yield path
        else:
            raise ImageReadError(f"input {str(path)!r} does not exist")
