"""Files written for one segmented image: label PNG, overlay PNG and JSON summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from freesegdiff.image_io import load_image

if TYPE_CHECKING:
    from freesegdiff.result import SegmentationResult

OVERLAY_SUFFIX = "_overlay.png"


def label_png(label_map: np.ndarray, labels: dict[int, str]) -> Image.Image:
    """The label map as a PNG image whose pixel values are the label ids.

    Returns a palette ("P") image coloured with the labels' colours when every id fits in a
    byte (always in open vocabulary); with ids above 255 (large fixed vocabularies) a 16-bit
    grayscale ("I;16") image, whose values are still exactly the ids.
    """
    from freesegdiff.visualize.colors import palette_for

    if label_map.size and (label_map.min() < 0 or label_map.max() > 65535):
        raise ValueError("label ids must be in [0, 65535] to be written as a PNG")
    if label_map.size == 0 or label_map.max() <= 255:
        image = Image.fromarray(label_map.astype(np.uint8), mode="P")
        image.putpalette(palette_for(labels))
        return image
    return Image.fromarray(label_map.astype(np.uint16), mode="I;16")


def write_result(
    result: SegmentationResult,
    folder: str | Path,
    *,
    stem: str | None = None,
    image: Any = None,
    overlay: bool = True,
) -> dict[str, Path]:
    """Write ``<stem>.png``, ``<stem>_overlay.png`` and ``<stem>.json`` into ``folder``.

    Args:
        result: the segmentation of one image.
        stem: file name stem; default: the source file's stem, else ``"image"``.
        image: the segmented RGB image for the overlay; default: read again from
            ``result.source``. The overlay is skipped when neither is available.
        overlay: write the overlay at all.

    Returns:
        ``{"png": path, "json": path[, "overlay": path]}``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if stem is None:
        stem = Path(result.source).stem if result.source else "image"
    written: dict[str, Path] = {}
    png_path = out / f"{stem}.png"
    label_png(result.label_map, result.labels).save(png_path)
    written["png"] = png_path
    if overlay and (image is not None or result.source is not None):
        from freesegdiff.visualize.overlay import render_overlay

        pixels = load_image(image if image is not None else result.source)  # type: ignore[arg-type]
        overlay_path = out / f"{stem}{OVERLAY_SUFFIX}"
        render_overlay(pixels, result).save(overlay_path)
        written["overlay"] = overlay_path
    summary = result.to_json()
    summary["files"] = {kind: path.name for kind, path in written.items()}
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    written["json"] = json_path
    return written
