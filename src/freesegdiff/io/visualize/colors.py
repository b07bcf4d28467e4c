"""Colours of labels: the Pascal VOC palette for VOC names, a stable hashed colour otherwise.

A label's colour depends only on its name, so "cat" is the same colour in every image, every run
and on every machine: VOC class names (and their common spellings, e.g. "dining table",
"airplane") take their VOC colour, every other name a vivid colour derived from the BLAKE2 digest
of the name (not Python's ``hash()``, which is salted per process). Background is black.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Mapping

Color = tuple[int, int, int]

# Index i of the VOC palette is the colour of VOC_CLASSES[i] in the VOC ground-truth PNGs.
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# Other spellings of VOC classes that class-name files and captions use (compared after
# lower-casing and removing spaces, "-" and "_").
_VOC_ALIASES: dict[str, str] = {
    "airplane": "aeroplane",
    "plane": "aeroplane",
    "bike": "bicycle",
    "table": "diningtable",
    "motorcycle": "motorbike",
    "people": "person",
    "plant": "pottedplant",
    "couch": "sofa",
    "tv": "tvmonitor",
    "television": "tvmonitor",
    "monitor": "tvmonitor",
}

BACKGROUND_COLOR: Color = (0, 0, 0)


def voc_color(index: int) -> Color:
    """Colour of index ``index`` (0..255) in the standard VOC palette (the bit-interleaved map)."""
    if not 0 <= index <= 255:
        raise ValueError(f"VOC palette indices are 0..255, got {index}")
    red = green = blue = 0
    value = index
    for bit in range(8):
        red |= ((value >> 0) & 1) << (7 - bit)
        green |= ((value >> 1) & 1) << (7 - bit)
        blue |= ((value >> 2) & 1) << (7 - bit)
        value >>= 3
    return (red, green, blue)


def _normalise(name: str) -> str:
    return "".join(name.lower().split()).replace("-", "").replace("_", "")


def voc_index(name: str) -> int | None:
    """The VOC class index of ``name`` (aliases allowed), or None if it is not a VOC class."""
    key = _normalise(name)
    key = _VOC_ALIASES.get(key, key)
    try:
        return VOC_CLASSES.index(key)
    except ValueError:
        return None


def hashed_color(name: str, salt: int = 0) -> Color:
    """A vivid colour determined by ``name`` alone (BLAKE2b of its UTF-8 text, plus ``salt``).

    Hue takes the whole circle; saturation is kept in [0.55, 0.95] and value in [0.65, 0.95], so
    the colour is never near black (background) nor near white or grey.
    """
    text = name.strip().lower() if salt == 0 else f"{name.strip().lower()}#{salt}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    hue = int.from_bytes(digest[0:2], "big") / 65536.0
    saturation = 0.55 + 0.40 * digest[2] / 255.0
    value = 0.65 + 0.30 * digest[3] / 255.0
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(red * 255), round(green * 255), round(blue * 255))


def color_for(name: str) -> Color:
    """The colour of a label: VOC colour for VOC names, black for background, else hashed."""
    index = voc_index(name)
    if index is not None:
        return voc_color(index)
    return hashed_color(name)


MIN_COLOR_DISTANCE = 48  # below this sum of channel differences two colours look alike


def color_distance(a: Color, b: Color) -> int:
    """Sum of absolute channel differences of two RGB colours (0..765)."""
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def colors_for(labels: Mapping[int, str]) -> dict[int, Color]:
    """Colour of every id in ``labels`` (``{id: name}``); id 0 is always black.

    Each name takes :func:`color_for`. When a hashed colour would be nearly indistinguishable from
    a colour already given to a lower id in the same mapping, it is re-hashed with a salt until it
    is not: distinct names stay distinct within one image, and the choice is still deterministic.
    VOC colours are never changed.
    """
    colors: dict[int, Color] = {}
    for label_id in sorted(labels):
        name = labels[label_id]
        if label_id == 0:
            colors[0] = BACKGROUND_COLOR
            continue
        color = color_for(name)
        if voc_index(name) is None:
            salt = 0
            taken = [c for i, c in colors.items() if labels[i] != name] + [BACKGROUND_COLOR]
            while any(color_distance(color, o) < MIN_COLOR_DISTANCE for o in taken) and salt < 64:
                salt += 1
                color = hashed_color(name, salt)
        colors[label_id] = color
    return colors


def palette_for(labels: Mapping[int, str]) -> list[int]:
    """A 768-int PIL palette (``[r0, g0, b0, r1, ...]``) for a label map with these labels.

    Args:
        labels: ``{id: name}``; ids must be in 0..255 (a palette PNG holds 256 colours).

    Returns:
        768 ints: index ``id`` holds its label's colour (see :func:`colors_for`), index 0 black;
        every other index keeps its standard VOC palette colour, so ``255`` is VOC's "void" cream.

    Raises:
        ValueError: an id is outside 0..255.
    """
    bad = [label_id for label_id in labels if not 0 <= label_id <= 255]
    if bad:
        raise ValueError(
            f"a palette PNG holds ids 0..255, got {bad}; "
            "save the label map as a 16-bit PNG or as JSON instead"
        )
    palette: list[int] = []
    colors = colors_for(labels)
    for index in range(256):
        palette.extend(colors.get(index, voc_color(index)))
    if 0 not in labels:
        palette[0:3] = list(BACKGROUND_COLOR)
    return palette
