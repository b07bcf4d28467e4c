"""Files written for one segmented image: label PNG, overlay, JSON summary, explain figure.

Everything is made from the result and the image already in memory; the image is read from
``result.source`` (once) only when the caller does not have it.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from freesegdiff.image_io import ImageInput, load_image
from freesegdiff.visualize.colors import palette_for
from freesegdiff.visualize.explain import EXPLAIN_SUFFIX, write_explain
from freesegdiff.visualize.overlay import render_overlay

if TYPE_CHECKING:
    from freesegdiff.export import CocoResults
    from freesegdiff.result import SegmentationResult

OVERLAY_SUFFIX = "_overlay.png"
FORMATS = ("png", "coco-rle")  # the choices of ``freesegdiff segment --format``

__all__ = ["EXPLAIN_SUFFIX", "FORMATS", "OVERLAY_SUFFIX", "label_png", "write_outputs"]


def label_png(label_map: np.ndarray, labels: dict[int, str]) -> Image.Image:
    """The label map as a PNG image whose pixel values are the label ids.

    Returns a palette ("P") image coloured with the labels' colours when every id fits in a
    byte (always in open vocabulary); with ids above 255 (large fixed vocabularies) a 16-bit
    grayscale ("I;16") image, whose values are still exactly the ids.
    """
    if label_map.size and (label_map.min() < 0 or label_map.max() > 65535):
        raise ValueError("label ids must be in [0, 65535] to be written as a PNG")
    if label_map.size == 0 or label_map.max() <= 255:
        image = Image.fromarray(label_map.astype(np.uint8), mode="P")
        image.putpalette(palette_for(labels))
        return image
    return Image.fromarray(label_map.astype(np.uint16), mode="I;16")


def write_outputs(
    result: SegmentationResult,
    image: ImageInput | None,
    folder: str | Path,
    *,
    stem: str | None = None,
    formats: Collection[str] = ("png",),
    overlay: bool = True,
    explain: bool = False,
    coco: CocoResults | None = None,
) -> dict[str, Path]:
    """Write the files of one segmented image into ``folder`` (created if missing).

    Args:
        result: the segmentation of one image.
        image: the segmented RGB image, ``(H, W, 3)`` uint8 as the pipeline saw it (or anything
            :func:`load_image` reads); None: read once from ``result.source`` if a picture is
            to be drawn.
        stem: file name stem; default: the source file's stem, else ``"image"``.
        formats: any of :data:`FORMATS`. ``"png"``: ``<stem>.png`` (label ids),
            ``<stem>.json`` (:meth:`SegmentationResult.to_json` and the files written) and,
            with ``overlay``, ``<stem>_overlay.png``. ``"coco-rle"``: the segments are added
            to ``coco``, which the caller writes once per run (:meth:`CocoResults.write`).
        overlay: with ``"png"``, draw the overlay; skipped when there is neither ``image``
            nor ``result.source``.
        explain: also write ``<stem>_explain.png`` (needs the ``[viz]`` extra).
        coco: the run's COCO results; required with ``"coco-rle"``.

    Returns:
        ``{"png", "overlay", "json", "explain"}``: the paths of the files written.

    Raises:
        ValueError: an unknown format, ``"coco-rle"`` without ``coco``, ``explain`` with no
            image at all, or an image of another size than the label map.
        MissingExtraError: ``explain`` without matplotlib.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown output formats {unknown}; choose from {', '.join(FORMATS)}")
    if "coco-rle" in formats and coco is None:
        raise ValueError('the "coco-rle" format collects into a CocoResults: pass coco=')
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if stem is None:
        stem = Path(result.source).stem if result.source else "image"
    pixels = _pixels(result, image, needed=explain or ("png" in formats and overlay))
    if explain and pixels is None:
        raise ValueError("the explain figure needs the image: pass it (the result has no source)")
    written: dict[str, Path] = {}
    if "png" in formats:
        png_path = out / f"{stem}.png"
        label_png(result.label_map, result.labels).save(png_path)
        written["png"] = png_path
        if overlay and pixels is not None:
            overlay_path = out / f"{stem}{OVERLAY_SUFFIX}"
            render_overlay(pixels, result).save(overlay_path)
            written["overlay"] = overlay_path
        summary = result.to_json()
        summary["files"] = {kind: path.name for kind, path in written.items()}
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
        written["json"] = json_path
    if explain:
        written["explain"] = write_explain(result, pixels, out, stem)
    if "coco-rle" in formats and coco is not None:
        coco.add(stem, result)
    return written


def _pixels(
    result: SegmentationResult, image: ImageInput | None, *, needed: bool
) -> np.ndarray | None:
    """The image as ``(H, W, 3)`` uint8: ``image`` converted, else read from the source."""
    if not needed:
        return None
    if image is not None:
        return load_image(image)
    if result.source is not None:
        return load_image(result.source)
    return None
