"""Reading an image's files back: its label map and named segments, for the run files of
``--resume`` (``coco_results.json`` covers the images an earlier run wrote)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from freesegdiff.io.outputs import output_names
from freesegdiff.result import BACKGROUND, Segment, SegmentationResult

__all__ = ["read_saved_result"]


def read_saved_result(folder: str | Path, stem: str) -> SegmentationResult:
    """The label map and segments of a written image, read back from its PNG and JSON.

    For the files of a run that were not written by this process (``--resume``): enough for
    :meth:`CocoResults.add`, which then gives the same entries as the original result (ids are
    exact in the PNG, scores are rounded to 6 digits in both). The intermediate fields
    (clusters, scores, masks before refinement) are empty.

    Raises:
        OSError, ValueError: a file is missing or not what :func:`write_outputs` writes.
    """
    out = Path(folder)
    names = output_names(stem)
    with Image.open(out / names["png"]) as image:
        label_map = np.asarray(image).astype(np.int32)  # (H, W) ids
    summary = json.loads((out / names["json"]).read_text(encoding="utf-8"))
    segments = [
        Segment(
            id=int(entry["id"]),
            label=str(entry["name"]),
            score=float(entry["score"]),
            area=int(entry["area"]),
            mask=label_map == int(entry["id"]),
            cluster=-1,
        )
        for entry in summary["labels"]
        if int(entry["id"]) != 0
    ]
    height, width = label_map.shape
    return SegmentationResult(
        label_map=label_map,
        labels={0: BACKGROUND, **{segment.id: segment.label for segment in segments}},
        segments=segments,
        caption=summary.get("caption"),
        entities=list(summary.get("entities") or []),
        vocabulary=list(summary.get("vocabulary") or []),
        candidates=list(summary.get("candidates") or []),
        cluster_map=np.zeros((height, width), dtype=np.int32),
        scores=np.zeros((0, 0), dtype=np.float32),
        cluster_labels=[],
        coarse_masks=np.zeros((0, height, width), dtype=bool),
        refined_masks=np.zeros((0, height, width), dtype=bool),
        source=summary.get("image"),
        image_size=(width, height),
    )
