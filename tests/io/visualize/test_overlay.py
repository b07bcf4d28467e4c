"""The overlay: tint, borders and legend, checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest

from freesegdiff.io.visualize.colors import color_for
from freesegdiff.io.visualize.overlay import legend_entries, render_overlay, segment_borders
from freesegdiff.result import SegmentationResult


def test_borders_are_the_outer_ring_of_each_segment() -> None:
    label_map = np.zeros((5, 5), dtype=np.int32)
    label_map[1:4, 1:4] = 1
    ring = segment_borders(label_map, width=1)
    expected = label_map == 1
    expected[2, 2] = False
    assert (ring == expected).all()
    assert (segment_borders(label_map, width=2) == (label_map == 1)).all()


def test_borders_between_two_segments_fall_on_both_sides_and_not_on_the_frame() -> None:
    label_map = np.array([[1, 1, 2, 2]] * 3, dtype=np.int32)
    assert segment_borders(label_map).tolist() == [[False, True, True, False]] * 3


def test_overlay_tints_segments_keeps_background_and_outlines(
    two_segment_result: tuple[np.ndarray, SegmentationResult],
) -> None:
    image, result = two_segment_result
    overlay = np.asarray(render_overlay(image, result, legend=False, border_width=1))
    assert overlay.shape == (40, 60, 3)
    assert overlay[0, 0].tolist() == [128, 128, 128]  # background untouched
    # Inside the cat: half grey (128), half VOC cat colour (64, 0, 0).
    assert overlay[20, 15].tolist() == [96, 64, 64]
    assert overlay[10, 15].tolist() == [64, 0, 0]  # the cat's top border, full colour
    assert overlay[20, 35].tolist() == list(color_for("small bird"))


def test_legend_lists_name_and_score_with_a_swatch(
    two_segment_result: tuple[np.ndarray, SegmentationResult],
) -> None:
    image, result = two_segment_result
    entries = legend_entries(result)
    assert [entry.text for entry in entries] == ["cat 0.91", "small bird 0.62"]
    overlay = render_overlay(image, result, font_size=12)
    assert overlay.width > 60 and overlay.height >= 40
    pixels = np.asarray(overlay)
    # The first swatch (pad 6, size 12) sits at the top left of the legend panel.
    assert pixels[6 + 6, 60 + 6 + 6].tolist() == [64, 0, 0]
    assert pixels[6 + 18 + 6, 60 + 6 + 6].tolist() == list(color_for("small bird"))


def test_overlay_without_segments_says_so(make_result) -> None:  # type: ignore[no-untyped-def]
    result = make_result(np.zeros((20, 20), dtype=np.int32), {})
    assert legend_entries(result) == []
    overlay = render_overlay(np.zeros((20, 20, 3), dtype=np.uint8), result)
    assert overlay.width > 20


def test_overlay_rejects_an_image_of_another_size(
    two_segment_result: tuple[np.ndarray, SegmentationResult],
) -> None:
    _, result = two_segment_result
    with pytest.raises(ValueError, match="60x40"):
        render_overlay(np.zeros((10, 10, 3), dtype=np.uint8), result)


def test_a_large_photo_is_drawn_at_max_side_with_its_labels_nearest(
    two_segment_result: tuple[np.ndarray, SegmentationResult],
) -> None:
    import dataclasses

    image, result = two_segment_result  # 60 x 40
    big_image = np.kron(image, np.ones((5, 5, 1), np.uint8))  # 300 x 200, flat 5x5 blocks
    big = dataclasses.replace(
        result, label_map=np.kron(result.label_map, np.ones((5, 5), np.int32))
    )
    drawn = np.asarray(render_overlay(big_image, big, legend=False, border_width=1, max_side=60))
    small = np.asarray(render_overlay(image, result, legend=False, border_width=1))
    assert drawn.shape == (40, 60, 3)
    assert np.array_equal(drawn, small)  # each 5x5 block back to its pixel: the same picture
    full = render_overlay(big_image, big, legend=False, max_side=None)
    assert full.size == (300, 200)
