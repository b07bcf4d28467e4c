"""The explain figure: text, clusters, score heat map, masks, overlay in one PNG."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from freesegdiff.result import SegmentationResult

pytest.importorskip("matplotlib", reason="the explain figure needs matplotlib")

from freesegdiff.io.visualize.explain import (
    _text_block,
    heatmap_rows,
    render_explain,
    write_explain,
)


def _colour_present(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 3) -> bool:
    return bool((np.abs(pixels.astype(int) - colour).max(axis=-1) <= tolerance).any())


def test_explain_png_shows_every_stage(
    tmp_path, two_segment_result: tuple[np.ndarray, SegmentationResult]
) -> None:  # type: ignore[no-untyped-def]
    image, result = two_segment_result
    path = write_explain(result, image, tmp_path / "out", "photo")
    assert path == tmp_path / "out" / "photo_explain.png"
    with Image.open(path) as figure:
        pixels = np.asarray(figure.convert("RGB"))
    assert 1000 <= pixels.shape[1] <= 1250  # 12 inches at 100 dpi, trimmed
    assert pixels.shape[0] > pixels.shape[1] * 0.8  # a tall, top-to-bottom page
    assert _colour_present(pixels, (255, 0, 0))  # the kept-assignment boxes
    assert _colour_present(pixels, (31, 119, 180))  # cluster 0 in tab10 blue
    assert _colour_present(pixels, (64, 0, 0))  # the cat's VOC colour in the masks / overlay


def test_render_explain_returns_an_rgb_image(
    two_segment_result: tuple[np.ndarray, SegmentationResult],
) -> None:
    image, result = two_segment_result
    figure = render_explain(image, result, dpi=50)
    assert figure.mode == "RGB" and figure.width == 600


def test_text_block_names_caption_entities_and_timings(
    two_segment_result: tuple[np.ndarray, SegmentationResult],
) -> None:
    _, result = two_segment_result
    result.warnings.append("no entities found")
    text = _text_block(result)
    assert 'caption: "a cat sitting next to a small bird"' in text
    assert "entities: cat, small bird" in text
    assert "warning: no entities found" in text
    assert "(total 1.85s)" in text


def test_a_long_vocabulary_shows_kept_then_candidate_then_best_rows(
    make_result: Callable[..., SegmentationResult],
) -> None:
    label_map = np.zeros((8, 8), dtype=np.int32)
    label_map[:4] = 1
    result = make_result(label_map, {1: "cat"})
    names = [f"class {i}" for i in range(50)]
    result.vocabulary = names
    result.candidates = ["class 7"]
    result.scores = np.zeros((50, 2), dtype=np.float32)
    result.scores[30, 0] = 0.8  # the best non-candidate row
    result.cluster_labels = [-1, 42]
    rows = heatmap_rows(result, limit=3)
    assert rows == [7, 30, 42]


def test_explain_works_without_labels(make_result: Callable[..., SegmentationResult]) -> None:
    result = make_result(np.zeros((16, 16), dtype=np.int32), {})
    result.caption = None
    figure = render_explain(np.zeros((16, 16, 3), dtype=np.uint8), result, dpi=40)
    assert figure.width == 480
