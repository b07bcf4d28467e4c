"""Results in formats other tools read: COCO results JSON (RLE masks) and supervision Detections.

COCO: one entry per segment, ``{"image_id": <file stem>, "category_id": int, "category_name":
str, "segmentation": {"size": [H, W], "counts": str}, "score": float}``; the RLE is
pycocotools' compressed form with ``counts`` decoded to ASCII text, so the file is plain JSON and
``COCO.loadRes`` / ``pycocotools.mask.decode`` read it back. Category ids are the same for a name
in every entry of a file: with a closed vocabulary (``classes``) a name's id is its 1-based
position in ``classes``; otherwise ids 1..N are given to the names in alphabetical order, so the
ids do not depend on the order the images were processed in.

pycocotools (the ``[eval]`` extra) and supervision (the ``[supervision]`` extra) are imported only
when these formats are asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from freesegdiff.infra.extras import require

if TYPE_CHECKING:  # results are read here, never built: no import at run time
    from freesegdiff.result import SegmentationResult

COCO_RESULTS_NAME = "coco_results.json"


def _mask_api() -> Any:
    """``pycocotools.mask``, or a :class:`MissingExtraError` naming the ``[eval]`` extra."""
    return require("coco-rle")


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of one binary mask.

    Args:
        mask: ``(H, W)`` bool or 0/1 array.

    Returns:
        ``{"size": [H, W], "counts": str}`` (counts as ASCII text, ready for JSON).
    """
    rle = _mask_api().encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """``(H, W)`` bool mask of an RLE from :func:`encode_rle` (counts as text or bytes)."""
    counts = rle["counts"]
    encoded = {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return np.asarray(_mask_api().decode(encoded), dtype=bool)


def category_ids(names: Iterable[str], classes: Sequence[str] | None = None) -> dict[str, int]:
    """Stable ``{name: category id}`` for a run.

    Args:
        names: every label name that occurs in the run.
        classes: the closed vocabulary, if any; its names take ids 1..len(classes) in order.

    Returns:
        Ids for ``classes`` (in order) and for every other name in ``names`` (alphabetically,
        after the classes).
    """
    ids = {name: i + 1 for i, name in enumerate(dict.fromkeys(classes or ()))}
    for name in sorted(set(names) - set(ids)):
        ids[name] = len(ids) + 1
    return ids


def coco_entries(image_id: str, result: SegmentationResult) -> list[dict[str, Any]]:
    """COCO result entries for one image, without ``category_id`` (see :class:`CocoResults`).

    One entry per segment with a non-empty mask in ``result.label_map`` (``label_map == id``), in
    painting order: ``{"image_id", "category_name", "segmentation", "score"}``.
    """
    label_map = np.asarray(result.label_map)
    entries = []
    for segment in result.segments:
        mask = label_map == segment.id
        if not mask.any():
            continue
        entries.append(
            {
                "image_id": image_id,
                "category_name": segment.label,
                "segmentation": encode_rle(mask),
                "score": round(float(segment.score), 6),
            }
        )
    return entries


class CocoResults:
    """Collects COCO result entries image by image and writes one file per run.

    Only the RLE strings are kept, not the masks, so a long folder run stays small in memory::

        coco = CocoResults(classes=None)
        for path, result in ...:
            coco.add(path.stem, result)
        coco.write(out_dir)  # out_dir / "coco_results.json"
    """

    def __init__(self, classes: Sequence[str] | None = None) -> None:
        self.classes = list(classes) if classes else None
        self._entries: list[dict[str, Any]] = []

    def add(self, image_id: str, result: SegmentationResult) -> None:
        """Add the segments of one image; ``image_id`` is its file stem."""
        self.extend(coco_entries(image_id, result))

    def extend(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add entries made by :func:`coco_entries` (kept aside to add them in another order)."""
        self._entries.extend(entries)

    def categories(self) -> list[dict[str, Any]]:
        """``[{"id": int, "name": str}]`` for the names in this run (a COCO ``categories``)."""
        ids = category_ids((entry["category_name"] for entry in self._entries), self.classes)
        return [{"id": category_id, "name": name} for name, category_id in ids.items()]

    def entries(self) -> list[dict[str, Any]]:
        """All entries, each with its ``category_id`` filled in."""
        ids = category_ids((entry["category_name"] for entry in self._entries), self.classes)
        return [
            {
                "image_id": entry["image_id"],
                "category_id": ids[entry["category_name"]],
                "category_name": entry["category_name"],
                "segmentation": entry["segmentation"],
                "score": entry["score"],
            }
            for entry in self._entries
        ]

    def write(self, folder: str | Path, name: str = COCO_RESULTS_NAME) -> Path:
        """Write the entries as a JSON list to ``<folder>/<name>``; return the path.

        Written atomically (:mod:`freesegdiff.io.atomic`): a killed run leaves the previous file or
        the complete new one, never a part.
        """
        from freesegdiff.io.atomic import write_text

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        return write_text(out / name, json.dumps(self.entries()))


def coco_results(
    results: Iterable[tuple[str, SegmentationResult]], classes: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """COCO results for ``(image_id, result)`` pairs: see the module docstring for the format."""
    coco = CocoResults(classes)
    for image_id, result in results:
        coco.add(image_id, result)
    return coco.entries()


def write_coco_results(
    results: Iterable[tuple[str, SegmentationResult]],
    folder: str | Path,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write ``<folder>/coco_results.json`` for ``(image_id, result)`` pairs; return its path."""
    coco = CocoResults(classes)
    for image_id, result in results:
        coco.add(image_id, result)
    return coco.write(folder)


def to_supervision(result: SegmentationResult) -> Any:
    """The segments as a ``supervision.Detections`` (needs the ``[supervision]`` extra).

    Returns:
        Detections with ``xyxy`` ``(N, 4)`` float32 boxes of the masks (x_min, y_min, x_max,
        y_max of the mask's pixels, inclusive, as ``supervision.mask_to_xyxy``), ``mask``
        ``(N, H, W)`` bool, ``confidence`` ``(N,)``, ``class_id`` ``(N,)`` the segment ids
        (their values in ``label_map``) and ``data["class_name"]`` the label names. Segments
        with an empty mask are left out.
    """
    supervision = require("supervision")
    label_map = np.asarray(result.label_map)
    height, width = label_map.shape
    segments = [s for s in result.segments if (label_map == s.id).any()]
    masks = np.zeros((len(segments), height, width), dtype=bool)
    boxes = np.zeros((len(segments), 4), dtype=np.float32)
    for i, segment in enumerate(segments):
        masks[i] = label_map == segment.id
        rows = np.flatnonzero(masks[i].any(axis=1))
        columns = np.flatnonzero(masks[i].any(axis=0))
        boxes[i] = (columns[0], rows[0], columns[-1], rows[-1])
    return supervision.Detections(
        xyxy=boxes,
        mask=masks,
        confidence=np.array([s.score for s in segments], dtype=np.float32),
        class_id=np.array([s.id for s in segments], dtype=int),
        data={"class_name": np.array([s.label for s in segments], dtype=str)},
    )
