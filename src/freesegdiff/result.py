"""What the pipeline returns for one image: plain data and pure conversions.

Writing files and drawing pictures of a result live in :mod:`freesegdiff.io.outputs` and
:mod:`freesegdiff.io.visualize`, which import this module (never the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BACKGROUND = "background"


@dataclass
class Segment:
    """One named region of the final label map."""

    id: int  # its value in ``label_map`` (>= 1)
    label: str  # the label text CLIP chose
    score: float  # CLIP softmax probability of ``label`` for the masked image, in [0, 1]
    area: int  # pixels of the final label map that carry ``id``
    mask: np.ndarray  # (H, W) bool, ``label_map == id``
    cluster: int  # index of the k-means cluster the segment came from


@dataclass
class SegmentationResult:
    """Everything known about one segmented image.

    Attributes:
        label_map: ``(H, W)`` int32 at the original image size; 0 is background, every other
            value is the id of a segment (``labels`` names it).
        labels: ``{id: name}`` for 0 (``"background"``) and every id present in ``label_map``.
        segments: the named regions, in painting order.
        caption: the captioner's text, or None when no captioner ran.
        entities: the label texts extracted from the caption, in order of first mention.
        vocabulary: the label texts CLIP chose from; id ``i + 1`` is ``vocabulary[i]``.
        candidates: the subset of ``vocabulary`` allowed to claim masks (closed-vocabulary pruning).
        cluster_map: ``(h, w)`` int32 cluster index of every pixel (class-agnostic masks), at
            the working size: ``(H, W)`` unless the image's longest side is above
            ``limits.working_size`` (docs/method.md, step 14), as are both mask stacks below.
        scores: ``(len(vocabulary), K)`` float32 CLIP probabilities, label x cluster.
        cluster_labels: per cluster, the vocabulary index it was assigned, or -1 (background).
        coarse_masks: ``(K, h, w)`` bool cluster masks before refinement (kept clusters only are
            meaningful), and ``refined_masks`` the same after refinement.
        timings: seconds spent per stage for this image (batched stages split evenly).
        source: the file path or a name for the image; ``image_size`` is ``(width, height)``.
        warnings: what went unusual but was handled (e.g. no entities found).
    """

    label_map: np.ndarray
    labels: dict[int, str]
    segments: list[Segment]
    caption: str | None
    entities: list[str]
    vocabulary: list[str]
    candidates: list[str]
    cluster_map: np.ndarray
    scores: np.ndarray
    cluster_labels: list[int]
    coarse_masks: np.ndarray
    refined_masks: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    source: str | None = None
    image_size: tuple[int, int] = (0, 0)
    warnings: list[str] = field(default_factory=list)

    def to_hf(self) -> list[dict[str, Any]]:
        """The output of transformers' image-segmentation pipeline for this image.

        Returns:
            ``[{"score": float, "label": str, "mask": PIL.Image (mode "L", 0 or 255)}]``, one
            entry per segment, background excluded.
        """
        from PIL import Image

        return [
            {
                "score": float(segment.score),
                "label": segment.label,
                "mask": Image.fromarray(segment.mask.astype(np.uint8) * 255),
            }
            for segment in self.segments
        ]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: source, size, caption, entities, labels (id, name, score, area)."""
        width, height = self.image_size
        return {
            "image": self.source,
            "width": width,
            "height": height,
            "caption": self.caption,
            "entities": list(self.entities),
            "vocabulary": list(self.vocabulary),
            "candidates": list(self.candidates),
            "labels": [{"id": 0, "name": BACKGROUND, "score": None, "area": self.background_area}]
            + [
                {"id": s.id, "name": s.label, "score": round(float(s.score), 6), "area": s.area}
                for s in self.segments
            ],
            "timings": {name: round(seconds, 6) for name, seconds in self.timings.items()},
            "warnings": list(self.warnings),
        }

    @property
    def background_area(self) -> int:
        """Pixels labelled background (0)."""
        return int((self.label_map == 0).sum())

    def save(
        self, folder: str | Path, stem: str | None = None, image: Any = None
    ) -> dict[str, Path]:
        """Write ``<stem>.png`` (palette label map), ``<stem>_overlay.png`` and ``<stem>.json``.

        A shortcut for :func:`freesegdiff.io.outputs.write_outputs` (which also writes the explain
        figure and COCO results).

        Args:
            folder: output folder, created if missing.
            stem: file name stem; default: the source file's stem, else ``"image"``.
            image: the segmented RGB image for the overlay (anything :func:`load_image` reads);
                default: read once from ``source``. Without either the overlay is skipped.

        Returns:
            ``{"png": path, "json": path, "overlay": path}`` for the files written.
        """
        from freesegdiff.io.outputs import write_outputs  # outputs imports this module

        return write_outputs(self, image, folder, stem=stem)
