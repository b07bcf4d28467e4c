"""Composition of refined masks into one label map (docs/method.md, step 13)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def compose_label_map(
    masks: np.ndarray, ids: Sequence[int], shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Paint binary masks in order onto a background map; a painted pixel keeps its first label.

    Args:
        masks: ``(N, H, W)`` bool, in painting order (the paper paints in cluster order).
        ids: the label id (>= 1) of each mask.
        shape: ``(H, W)``, needed only when ``N == 0``.

    Returns:
        ``(H, W)`` int32 label map, 0 where no mask was painted.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if len(ids) != masks.shape[0]:
        raise ValueError(f"got {masks.shape[0]} masks but {len(ids)} ids")
    if any(i < 1 for i in ids):
        raise ValueError("label ids must be >= 1 (0 is background)")
    height, width = masks.shape[1:] if masks.shape[0] or shape is None else shape
    label_map = np.zeros((height, width), dtype=np.int32)
    for mask, label in zip(masks, ids, strict=True):
        label_map[mask & (label_map == 0)] = label
    return label_map
