"""Array helpers every layer uses: image arrays as tensors, and resizing images and label maps.

Pure functions of arrays (numpy in, numpy or torch out): the stages, the files written and the
pipeline share them, so they live with the machinery rather than in any one of those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["fit_longest_side", "image_tensor", "nearest_indices", "resize_label_map"]


def fit_longest_side(image: np.ndarray, side: int | None) -> np.ndarray:
    """The image resized (PIL bilinear, aspect ratio kept) so its longest side is ``side``.

    Args:
        image: ``(H, W, 3)`` uint8.
        side: the bound in pixels; None, or an image already within it, returns ``image``
            itself (no copy).

    Returns:
        ``(h, w, 3)`` uint8 with ``max(h, w) == side`` (each side at least 1), or ``image``.
    """
    height, width = image.shape[:2]
    if side is None or max(height, width) <= side:
        return image
    scale = side / max(height, width)
    size = max(1, round(width * scale)), max(1, round(height * scale))
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 array -> ``(3, H, W)`` uint8 tensor sharing memory when it can
    (read-only arrays, e.g. scikit-image's bundled photos, are copied)."""
    import torch  # here, so that reading images does not import torch

    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, copy=True, order="C")
    return torch.from_numpy(image).permute(2, 0, 1)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """For each of ``target`` output positions, the index of the ``source`` cell its centre
    falls in: ``floor((i + 0.5) * source / target)``, ``(target,)`` int64."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize_label_map(label_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` labels -> ``(H, W)`` = ``shape``, nearest neighbour: each pixel takes the
    label under its centre (:func:`nearest_indices`); ``label_map`` itself if already that size."""
    if label_map.shape == tuple(shape):
        return label_map
    rows = nearest_indices(label_map.shape[0], shape[0])
    cols = nearest_indices(label_map.shape[1], shape[1])
    return label_map[rows[:, None], cols[None, :]]
