"""Pictures of the class-agnostic cluster map (k-means output, before any naming).

Clusters have no names, so they take fixed categorical colours by index (matplotlib's ``tab10``,
then ``tab20``'s light shades, then hashed), the same in the explain figure and the web demo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from freesegdiff.io.visualize.colors import Color, hashed_color

# matplotlib's tab10, then the light halves of tab20: 20 colours that are easy to tell apart.
CLUSTER_COLORS: tuple[Color, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)


def cluster_color(index: int) -> Color:
    """Colour of cluster ``index`` (the table above, then a colour hashed from ``"cluster N"``)."""
    if 0 <= index < len(CLUSTER_COLORS):
        return CLUSTER_COLORS[index]
    return hashed_color(f"cluster {index}")


def cluster_palette(k: int) -> np.ndarray:
    """``(k, 3)`` uint8 colours of clusters ``0..k-1``."""
    return np.array([cluster_color(i) for i in range(k)], dtype=np.uint8).reshape(k, 3)


def render_cluster_map(cluster_map: np.ndarray) -> Image.Image:
    """``(H, W)`` cluster indices -> RGB image of the same size, one colour per cluster.

    Negative indices (no cluster) are drawn black.
    """
    indices = np.asarray(cluster_map)
    k = int(indices.max(initial=-1)) + 1
    table = np.concatenate([cluster_palette(k), np.zeros((1, 3), dtype=np.uint8)])
    picture = table[np.where(indices >= 0, indices, k)]  # (H, W) -> (H, W, 3)
    return Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8))  # (H, W, 3): RGB
