"""Hand-made results for the renderer tests: no model runs here."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from freesegdiff.result import Segment, SegmentationResult


def build_result(
    label_map: np.ndarray, names: dict[int, str], scores: dict[int, float] | None = None
) -> SegmentationResult:
    """A result whose clusters are the label ids: cluster ``i`` carries id ``i`` (0 background).

    ``names`` is ``{id: label}`` without background; ``scores`` defaults to 0.9 for every id.
    """
    label_map = np.asarray(label_map, dtype=np.int32)
    scores = scores or {label_id: 0.9 for label_id in names}
    vocabulary = [names[i] for i in sorted(names)]
    k = int(max(label_map.max(), max(names, default=0))) + 1
    clusters = np.arange(k)
    masks = label_map[None] == clusters[:, None, None]  # (K, H, W)
    score_matrix = np.full((len(vocabulary), k), 0.05, dtype=np.float32)
    cluster_labels = [-1] * k
    for row, label_id in enumerate(sorted(names)):
        score_matrix[row, label_id] = scores[label_id]
        cluster_labels[label_id] = row
    segments = [
        Segment(
            id=label_id,
            label=names[label_id],
            score=scores[label_id],
            area=int((label_map == label_id).sum()),
            mask=label_map == label_id,
            cluster=label_id,
        )
        for label_id in sorted(names)
    ]
    return SegmentationResult(
        label_map=label_map,
        labels={0: "background", **names},
        segments=segments,
        caption="a cat sitting next to a small bird",
        entities=list(vocabulary),
        vocabulary=vocabulary,
        candidates=list(vocabulary),
        cluster_map=label_map.copy(),
        scores=score_matrix,
        cluster_labels=cluster_labels,
        coarse_masks=masks,
        refined_masks=masks.copy(),
        timings={"caption": 0.5, "features": 1.25, "clusters": 0.1},
        source="photo.jpg",
        image_size=(label_map.shape[1], label_map.shape[0]),
    )


@pytest.fixture
def make_result() -> Callable[..., SegmentationResult]:
    return build_result


@pytest.fixture
def two_segment_result() -> tuple[np.ndarray, SegmentationResult]:
    """A 40x60 grey image: a cat (id 1) on the left block, a small bird (id 2) on the right."""
    label_map = np.zeros((40, 60), dtype=np.int32)
    label_map[10:30, 5:25] = 1
    label_map[10:30, 35:55] = 2
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    return image, build_result(label_map, {1: "cat", 2: "small bird"}, {1: 0.91, 2: 0.62})
