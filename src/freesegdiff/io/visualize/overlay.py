"""The overlay: the photo with every segment tinted in its label colour, outlined, and a legend."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from freesegdiff.infra.arrays import fit_longest_side, resize_label_map
from freesegdiff.io.filenames import display_name
from freesegdiff.io.images import load_image
from freesegdiff.io.visualize.colors import Color, colors_for, hashed_color

if TYPE_CHECKING:  # results are read here, never built: no import at run time
    from freesegdiff.result import SegmentationResult

FontType = Any  # ImageFont.FreeTypeFont or ImageFont.ImageFont
LEGEND_BACKGROUND: Color = (255, 255, 255)
LEGEND_TEXT: Color = (20, 20, 20)
MAX_NAME_CHARS = 40
# Longest side an overlay is drawn at: a picture for the eye, not the label map (which keeps
# the image's size). A 6000 x 4000 photo at full size took 1.3 GB and 12 s to draw.
MAX_SIDE = 2048


@dataclass(frozen=True)
class LegendEntry:
    """One legend row: the label id, its text and its colour."""

    id: int
    text: str
    color: Color


@lru_cache(maxsize=16)
def legend_font(size: int) -> FontType:
    """Pillow's bundled font at ``size`` pixels (the fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def label_colors(result: SegmentationResult) -> np.ndarray:
    """Colour lookup table for ``result.label_map``.

    Returns:
        ``(max_id + 1, 3)`` uint8: row ``id`` is the colour of that id (row 0 black); ids found in
        the label map without a name get a colour hashed from ``"id <n>"``.
    """
    colors = colors_for(result.labels)
    max_id = int(result.label_map.max(initial=0))
    max_id = max(max_id, *colors.keys()) if colors else max_id
    table = np.zeros((max_id + 1, 3), dtype=np.uint8)
    for label_id in range(1, max_id + 1):
        table[label_id] = colors.get(label_id, hashed_color(f"id {label_id}"))
    return table


def segment_borders(label_map: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of a segment (label != 0) within ``width`` pixels of a different label.

    Args:
        label_map: ``(H, W)`` integer labels.
        width: border thickness in pixels, grown inward (never onto another label).

    Returns:
        ``(H, W)`` bool.
    """
    labels = np.asarray(label_map)
    edge = np.zeros(labels.shape, dtype=bool)
    # A pixel is on an edge when a 4-neighbour carries another label; the image frame is not one.
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge &= labels != 0
    for _ in range(max(0, width - 1)):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :] & (labels[1:, :] == labels[:-1, :])
        grown[:-1, :] |= edge[1:, :] & (labels[:-1, :] == labels[1:, :])
        grown[:, 1:] |= edge[:, :-1] & (labels[:, 1:] == labels[:, :-1])
        grown[:, :-1] |= edge[:, 1:] & (labels[:, :-1] == labels[:, 1:])
        edge = grown & (labels != 0)
    return edge


def legend_entries(result: SegmentationResult) -> list[LegendEntry]:
    """Legend rows in painting order: ``"name score"`` for every segment (background left out).

    Ids that are in the label map and ``labels`` but have no :class:`Segment` are listed by name
    alone, after the segments.
    """
    table = label_colors(result)
    entries: list[LegendEntry] = []
    for segment in result.segments:
        entries.append(
            LegendEntry(
                segment.id,
                f"{_short(segment.label)} {segment.score:.2f}",
                _color(table, segment.id),
            )
        )
    listed = {segment.id for segment in result.segments}
    present = {int(v) for v in np.unique(result.label_map)} - listed - {0}
    for label_id in sorted(present):
        name = result.labels.get(label_id, f"id {label_id}")
        entries.append(LegendEntry(label_id, _short(name), _color(table, label_id)))
    return entries


def _color(table: np.ndarray, label_id: int) -> Color:
    red, green, blue = (int(v) for v in table[label_id])
    return (red, green, blue)


def _short(name: str) -> str:
    name = display_name(name)  # (a name given as undecodable bytes: shown as \xNN)
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


def tint(image: np.ndarray, label_map: np.ndarray, table: np.ndarray, alpha: float) -> np.ndarray:
    """Blend each labelled pixel with its colour: ``(1 - alpha) * pixel + alpha * colour``.

    Args:
        image: ``(H, W, 3)`` uint8; label_map: ``(H, W)`` ints; table: ``(N, 3)`` uint8 colours.

    Returns:
        ``(H, W, 3)`` uint8; background (0) pixels are unchanged.
    """
    colour = table[label_map].astype(np.float32)  # (H, W) -> (H, W, 3)
    blended = image.astype(np.float32) * (1.0 - alpha) + colour * alpha
    out = np.where((label_map != 0)[..., None], np.rint(blended), image.astype(np.float32))
    return out.astype(np.uint8)


def draw_legend(entries: list[LegendEntry], height: int, font_size: int) -> Image.Image:
    """A white panel listing the entries as colour swatch + text, at least ``height`` tall."""
    font = legend_font(font_size)
    pad = max(4, font_size // 2)
    swatch = font_size
    row = font_size + pad
    texts = [entry.text for entry in entries] or ["(no segments)"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(probe.textlength(text, font=font)) for text in texts)
    width = pad + swatch + pad + text_width + pad
    panel_height = max(height, pad + row * len(texts))
    panel = Image.new("RGB", (width, panel_height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    if not entries:
        draw.text((pad, pad), texts[0], fill=LEGEND_TEXT, font=font)
        return panel
    for i, entry in enumerate(entries):
        top = pad + i * row
        draw.rectangle(
            (pad, top, pad + swatch - 1, top + swatch - 1), fill=entry.color, outline=LEGEND_TEXT
        )
        draw.text((pad + swatch + pad, top), entry.text, fill=LEGEND_TEXT, font=font)
    return panel


def render_overlay(
    image: Any,
    result: SegmentationResult,
    *,
    alpha: float = 0.5,
    border_width: int | None = None,
    legend: bool = True,
    font_size: int | None = None,
    max_side: int | None = MAX_SIDE,
) -> Image.Image:
    """The photo with segments tinted in their label colours, outlined, and a legend beside it.

    Args:
        image: the segmented photo, ``(H, W, 3)`` uint8 (or anything :func:`load_image` reads),
            the same size as ``result.label_map``.
        result: the segmentation; colours come from ``result.labels`` (see ``colors.py``).
        alpha: weight of the label colour inside a segment (0: photo only, 1: flat colour).
        border_width: outline thickness in pixels; default ``max(2, min(H, W) // 150)``.
        legend: add a legend panel on the right (one ``"name score"`` row per segment).
        font_size: legend text height in pixels; default ``clip(H // 32, 12, 48)``.
        max_side: a larger photo is drawn with its longest side at ``max_side`` (photo PIL
            bilinear, labels nearest); ``W, H`` below are then that size. None: full size.

    Returns:
        RGB image of ``(W + legend width, max(H, legend height))``; the photo at the top left.
        With ``legend=False`` exactly ``(W, H)``.

    Raises:
        ValueError: the image and the label map differ in size, or ``alpha`` is outside [0, 1].
    """
    pixels = load_image(image)
    label_map = np.asarray(result.label_map)
    if pixels.shape[:2] != label_map.shape:
        raise ValueError(
            f"the image is {pixels.shape[1]}x{pixels.shape[0]} but the label map is "
            f"{label_map.shape[1]}x{label_map.shape[0]}; pass the image that was segmented"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pixels = fit_longest_side(pixels, max_side)
    label_map = resize_label_map(label_map, pixels.shape[:2])
    height, width = label_map.shape
    table = label_colors(result)
    painted = tint(pixels, label_map, table, alpha)
    if border_width is None:
        border_width = max(2, min(height, width) // 150)
    if border_width > 0:
        border = segment_borders(label_map, border_width)
        painted[border] = table[label_map[border]]
    canvas = Image.fromarray(painted)  # (H, W, 3) uint8: RGB
    if not legend:
        return canvas
    if font_size is None:
        font_size = int(np.clip(height // 32, 12, 48))
    panel = draw_legend(legend_entries(result), height, font_size)
    out = Image.new("RGB", (width + panel.width, max(height, panel.height)), LEGEND_BACKGROUND)
    out.paste(canvas, (0, 0))
    out.paste(panel, (width, 0))
    return out
