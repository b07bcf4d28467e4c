"""The explain figure: every stage of one image, read top to bottom.

1. what the captioner said, the entities, the vocabulary CLIP chose from, warnings (and, with
   ``timings=True``, the seconds per stage: off by default, so the same result always gives the
   same PNG bytes);
2. the photo and the cluster map (all K k-means clusters, before naming);
3. the label x cluster CLIP score matrix as a heat map, the kept assignments boxed;
4. the kept masks before and after refinement;
5. the final overlay with its legend.

Needs matplotlib, the ``[viz]`` extra (``pip install "freesegdiff[viz]"``), imported when a figure
is drawn. The figure is drawn on matplotlib's Agg canvas directly, without pyplot, so it leaves
no global state behind and is safe to call from threads.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from freesegdiff.infra.arrays import fit_longest_side
from freesegdiff.infra.extras import require
from freesegdiff.io.atomic import save_with
from freesegdiff.io.filenames import display_name
from freesegdiff.io.images import load_image
from freesegdiff.io.visualize.cluster_map import cluster_palette
from freesegdiff.io.visualize.colors import color_for
from freesegdiff.io.visualize.overlay import render_overlay

if TYPE_CHECKING:  # results are read here, never built: no import at run time
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from freesegdiff.result import SegmentationResult

MAX_HEATMAP_ROWS = 40  # a closed vocabulary (COCO: 171 names) shows its most relevant rows only
FIGURE_WIDTH = 12.0  # inches
TEXT_WIDTH = 110  # characters per line of the text block
EXPLAIN_SUFFIX = "_explain.png"
MAX_LABEL_CHARS = 28  # longer label texts are cut in tick labels and legends (full in the text)


def _short(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def cluster_colors(k: int) -> np.ndarray:
    """``(k, 3)`` float colours in [0, 1] of clusters ``0..k-1`` (as :mod:`.cluster_map`)."""
    return cluster_palette(k).astype(np.float64) / 255.0


def heatmap_rows(result: SegmentationResult, limit: int = MAX_HEATMAP_ROWS) -> list[int]:
    """Vocabulary rows to show: all when there are at most ``limit``, else the most relevant.

    Relevant means, in this order: rows that claimed a cluster, candidate rows, then the rows with
    the highest score in any cluster. Returned in vocabulary order.
    """
    count = len(result.vocabulary)
    if count <= limit:
        return list(range(count))
    scores = np.asarray(result.scores).reshape(count, -1)  # (labels, K)
    kept = {row for row in result.cluster_labels if row >= 0}
    candidates = set(result.candidates)
    best = scores.max(axis=1) if scores.size else np.zeros(count)
    order = sorted(
        range(count),
        key=lambda row: (
            row not in kept,
            result.vocabulary[row] not in candidates,
            -float(best[row]),
        ),
    )
    return sorted(order[:limit])


def _text_block(result: SegmentationResult, timings: bool = True) -> str:
    """The caption, entities, vocabulary, warnings and (with ``timings``) timings, wrapped."""
    lines = []
    if result.source:
        lines.append(f"image: {result.source}")
    caption = result.caption if result.caption is not None else "(no captioner)"
    lines.append(f'caption: "{caption}"')
    lines.append("entities: " + (", ".join(result.entities) or "(none)"))
    if list(result.vocabulary) != list(result.entities):
        lines.append(f"vocabulary ({len(result.vocabulary)}): " + ", ".join(result.vocabulary))
    if list(result.candidates) != list(result.vocabulary):
        lines.append("candidates: " + (", ".join(result.candidates) or "(none)"))
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    if timings and result.timings:
        total = sum(result.timings.values())
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.timings.items())
        lines.append(f"timings: {stages} (total {total:.2f}s)")
    wrapped: list[str] = []
    for line in lines:  # (display_name: a file name that is not UTF-8 shows its bytes as \xNN)
        text = display_name(line)
        wrapped.extend(textwrap.wrap(text, TEXT_WIDTH, subsequent_indent="    ") or [""])
    return "\n".join(wrapped)


def _mask_composite(
    image: np.ndarray, masks: np.ndarray, result: SegmentationResult
) -> tuple[np.ndarray, list[tuple[str, tuple[float, float, float]]]]:
    """The kept clusters' masks painted in label colour over the dimmed photo, in cluster order.

    Returns the ``(H, W, 3)`` uint8 picture and ``(legend text, colour)`` for each kept cluster.
    """
    picture = (image.astype(np.float32) * 0.35).astype(np.uint8)
    painted = np.zeros(image.shape[:2], dtype=bool)
    handles: list[tuple[str, tuple[float, float, float]]] = []
    for cluster, row in enumerate(result.cluster_labels):
        if row < 0 or cluster >= len(masks):
            continue
        name = result.vocabulary[row]
        colour = color_for(name)
        mask = np.asarray(masks[cluster], dtype=bool) & ~painted
        picture[mask] = colour
        painted |= mask
        red, green, blue = colour
        handles.append((f"c{cluster}: {_short(name)}", (red / 255.0, green / 255.0, blue / 255.0)))
    return picture, handles


def _legend(axes: Axes, handles: list[tuple[str, Any]], title: str | None = None) -> None:
    from matplotlib.patches import Patch

    if not handles:
        return
    axes.legend(
        handles=[
            Patch(facecolor=colour, edgecolor="black", label=text) for text, colour in handles
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title=title,
        title_fontsize=8,
        frameon=False,
    )


def _picture(axes: Axes, picture: np.ndarray, title: str) -> None:
    axes.imshow(picture, interpolation="nearest")
    axes.set_title(title, fontsize=10, loc="left")
    axes.set_xticks([])
    axes.set_yticks([])


def _heatmap(axes: Axes, result: SegmentationResult, colors: np.ndarray) -> None:
    """Scores (shown rows x K) with values written in, kept assignments boxed in red."""
    from matplotlib.patches import Rectangle

    k = len(result.cluster_labels)
    rows = heatmap_rows(result)
    scores = np.asarray(result.scores, dtype=np.float64)
    if not rows or scores.ndim != 2 or scores.shape[1] == 0:
        axes.text(0.5, 0.5, "no label texts: every cluster is background", ha="center")
        axes.set_axis_off()
        return
    shown = scores[rows]  # (rows, K)
    image = axes.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    candidates = set(result.candidates)
    names = [
        _short(result.vocabulary[row])
        + ("" if result.vocabulary[row] in candidates else "  (not cand.)")
        for row in rows
    ]
    axes.set_yticks(range(len(rows)), names, fontsize=8)
    for tick, row in zip(axes.get_yticklabels(), rows, strict=True):
        if result.vocabulary[row] not in candidates:
            tick.set_color("grey")
    columns = []
    for cluster in range(shown.shape[1]):
        row = result.cluster_labels[cluster] if cluster < k else -1
        columns.append(f"c{cluster}\n→ {_short(result.vocabulary[row], 16) if row >= 0 else 'bg'}")
    axes.set_xticks(range(shown.shape[1]), columns, fontsize=8)
    for cluster, tick in enumerate(axes.get_xticklabels()):
        if cluster < len(colors):
            tick.set_bbox({"facecolor": colors[cluster], "alpha": 0.35, "edgecolor": "none"})
    if shown.size <= 400:
        for i in range(shown.shape[0]):
            for j in range(shown.shape[1]):
                value = shown[i, j]
                axes.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 else "white",
                )
    position = {row: i for i, row in enumerate(rows)}
    for cluster, row in enumerate(result.cluster_labels):
        if row >= 0 and row in position:
            axes.add_patch(
                Rectangle(
                    (cluster - 0.5, position[row] - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    linewidth=2.5,
                )
            )
    omitted = len(result.vocabulary) - len(rows)
    title = "3. CLIP scores, label x cluster (softmax over labels); red box: kept assignment"
    if omitted:
        title += f"; {omitted} low-scoring labels not shown"
    axes.set_title(title, fontsize=10, loc="left")
    colorbar = axes.figure.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    colorbar.ax.tick_params(labelsize=7)


def explain_figure(image: Any, result: SegmentationResult, *, timings: bool = False) -> Figure:
    """Build the explain figure (see the module docstring) as a matplotlib Figure.

    Args:
        image: the segmented photo, ``(H, W, 3)`` uint8 or anything :func:`load_image` reads, the
            same size as ``result.label_map``.
        result: the segmentation, with its intermediate fields (``cluster_map``, ``scores``,
            ``cluster_labels``, ``coarse_masks``, ``refined_masks``).
        timings: also print the seconds per stage (``result.timings``) in the text block. Off by
            default: timings differ from run to run, so the figure would too.

    Returns:
        A :class:`matplotlib.figure.Figure` 12 inches wide, on an Agg canvas (not managed by
        pyplot: nothing to close).
    """
    require("explain")  # matplotlib, or a MissingExtraError naming the [viz] extra
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pixels = load_image(image)
    height, width = np.asarray(result.label_map).shape
    if pixels.shape[:2] != (height, width):
        raise ValueError(
            f"the image is {pixels.shape[1]}x{pixels.shape[0]} but the label map is "
            f"{width}x{height}; pass the image that was segmented"
        )
    cluster_map = np.asarray(result.cluster_map)
    # The masks are at the working size (limits.working_size): the image as the pipeline
    # shrank it for them (the same function, so the same size) is what they are drawn over.
    work_pixels = fit_longest_side(pixels, max(cluster_map.shape)) if cluster_map.size else pixels
    k = max(len(result.cluster_labels), int(cluster_map.max(initial=-1)) + 1)
    colors = cluster_colors(max(k, 1))
    overlay = np.asarray(render_overlay(pixels, result))

    text = _text_block(result, timings=timings)
    text_height = 0.2 * (text.count("\n") + 1) + 0.3
    half = FIGURE_WIDTH / 2 - 1.2  # width of a picture in a two-picture row, legend beside it
    pair_height = min(half * height / width, 6.0) + 0.5
    heat_rows = len(heatmap_rows(result))
    heat_height = max(1.6, 0.28 * heat_rows + 1.3)
    overlay_height = min((FIGURE_WIDTH - 1) * overlay.shape[0] / overlay.shape[1], 9.0) + 0.5
    ratios = [text_height, pair_height, heat_height, pair_height, overlay_height]

    figure = Figure(figsize=(FIGURE_WIDTH, sum(ratios)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(5, 2, height_ratios=ratios, hspace=0.35, wspace=0.45)

    text_axes = figure.add_subplot(grid[0, :])
    text_axes.set_axis_off()
    text_axes.text(0, 1, text, va="top", ha="left", fontsize=9, family="monospace")

    _picture(figure.add_subplot(grid[1, 0]), pixels, "1. image")
    cluster_axes = figure.add_subplot(grid[1, 1])
    cluster_picture = (colors[np.clip(cluster_map, 0, len(colors) - 1)] * 255).astype(np.uint8)
    _picture(cluster_axes, cluster_picture, f"2. k-means clusters, K = {k} (before naming)")
    _legend(
        cluster_axes,
        [(f"c{c}: {int((cluster_map == c).sum())} px", colors[c]) for c in range(k)],
    )

    _heatmap(figure.add_subplot(grid[2, :]), result, colors)

    for column, (masks, title) in enumerate(
        [
            (result.coarse_masks, "4a. kept masks, before refinement"),
            (result.refined_masks, "4b. after refinement"),
        ]
    ):
        axes = figure.add_subplot(grid[3, column])
        picture, handles = _mask_composite(work_pixels, np.asarray(masks), result)
        _picture(axes, picture, title)
        _legend(axes, handles)

    _picture(figure.add_subplot(grid[4, :]), overlay, "5. result: label map over the image")
    return figure


def render_explain(
    image: Any, result: SegmentationResult, dpi: int = 100, *, timings: bool = False
) -> Image.Image:
    """The explain figure as an RGB PIL image (``1200 * dpi / 100`` pixels wide).

    ``timings``: print the seconds per stage too (see :func:`explain_figure`).
    """
    figure = explain_figure(image, result, timings=timings)
    figure.set_dpi(dpi)
    canvas = figure.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[attr-defined]
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))  # (H, W, 3) uint8: "RGB"


def write_explain(
    result: SegmentationResult,
    image: Any,
    folder: str | Path,
    stem: str,
    dpi: int = 100,
    *,
    timings: bool = False,
) -> Path:
    """Write ``<folder>/<stem>_explain.png``; return its path (the folder is created if missing).

    The PNG is written atomically (:mod:`freesegdiff.io.atomic`) and holds no date, so the same
    result and image give the same bytes; ``timings=True`` prints the seconds per stage in it
    (which then differ from run to run).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}{EXPLAIN_SUFFIX}"
    figure = explain_figure(image, result, timings=timings)
    return save_with(
        path, lambda handle: figure.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    )
