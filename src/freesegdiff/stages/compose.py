"""Composition of refined masks into one label map (docs/method.md, step 13)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from freesegdiff.infra.arrays import resize_label_map
from freesegdiff.result import Segment


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


@dataclass(frozen=True)
class Composition:
    """Step 13 for one image: the label map and its named regions."""

    label_map: np.ndarray  # (H, W) int32, 0 background, label text index + 1 elsewhere
    segments: list[Segment]  # one per label id present, in painting order


def compose(
    refined: np.ndarray,
    kept: Sequence[int],
    cluster_labels: Sequence[int],
    texts: Sequence[str],
    scores: np.ndarray,
    shape: tuple[int, int],
) -> Composition:
    """Paint the refined masks of the kept clusters and describe the regions they leave.

    Args:
        refined: ``(len(kept), H, W)`` bool refined masks of the kept clusters, in cluster order.
        kept: the kept clusters' indices; ``cluster_labels[k]`` is cluster ``k``'s text index.
        texts: the label texts; ``scores``: ``(len(texts), K)`` CLIP probabilities.
        shape: ``(H, W)``.

    A label kept by several (tied) clusters is one segment, the union; its ``cluster`` is the
    first of them. A label whose pixels were all painted by earlier masks has no segment.
    """
    ids = [cluster_labels[k] + 1 for k in kept]
    label_map = compose_label_map(refined, ids, shape)
    segments: list[Segment] = []
    seen: set[int] = set()
    for k, label_id in zip(kept, ids, strict=True):
        if label_id in seen:
            continue
        seen.add(label_id)
        mask = label_map == label_id
        area = int(mask.sum())
        if area == 0:
            continue
        score = float(scores[label_id - 1, k])
        segments.append(
            Segment(
                id=label_id, label=texts[label_id - 1], score=score, area=area, mask=mask, cluster=k
            )
        )
    return Composition(label_map, segments)


def resize_composition(composition: Composition, shape: tuple[int, int]) -> Composition:
    """The composition brought to ``shape`` ``(H, W)``: nearest-neighbour label map (each
    pixel takes the label under its centre), segments' masks and areas recounted there.

    Returns ``composition`` itself when it already has that shape. A segment whose pixels all
    vanish in the resize (possible only when upsampling does not happen: a downscale) is dropped.
    """
    if composition.label_map.shape == tuple(shape):
        return composition
    label_map = resize_label_map(composition.label_map, shape)
    segments = []
    for segment in composition.segments:
        mask = label_map == segment.id
        area = int(mask.sum())
        if area:
            segments.append(dataclasses.replace(segment, mask=mask, area=area))
    return Composition(label_map, segments)
