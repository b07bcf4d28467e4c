"""Painting masks into a label map, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from freesegdiff.stages.compose import compose_label_map


def test_first_painted_label_wins_overlaps():
    a = np.array([[1, 1, 0], [0, 0, 0]], bool)
    b = np.array([[0, 1, 1], [0, 1, 0]], bool)
    label_map = compose_label_map(np.stack([a, b]), [3, 5])
    assert label_map.tolist() == [[3, 3, 5], [0, 5, 0]]
    assert label_map.dtype == np.int32


def test_no_masks_is_all_background():
    label_map = compose_label_map(np.zeros((0, 2, 3), bool), [], (2, 3))
    assert label_map.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_bad_ids_are_rejected():
    with pytest.raises(ValueError, match="ids must be >= 1"):
        compose_label_map(np.ones((1, 2, 2), bool), [0])
    with pytest.raises(ValueError, match="got 1 masks but 2 ids"):
        compose_label_map(np.ones((1, 2, 2), bool), [1, 2])


def test_resize_composition_is_nearest_neighbour_with_areas_recounted():
    from freesegdiff.result import Segment
    from freesegdiff.stages.compose import Composition, resize_composition

    small = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.int32)
    segments = [
        Segment(
            id=i, label=f"l{i}", score=0.5, area=int((small == i).sum()), mask=small == i, cluster=i
        )
        for i in (1, 2)
    ]
    big = resize_composition(Composition(small, segments), (4, 6))
    assert np.array_equal(big.label_map, np.kron(small, np.ones((2, 2), np.int32)))  # by hand
    assert [(s.id, s.area, s.label) for s in big.segments] == [(1, 8, "l1"), (2, 8, "l2")]
    assert all(np.array_equal(s.mask, big.label_map == s.id) for s in big.segments)
    same = Composition(small, segments)
    assert resize_composition(same, (2, 3)) is same
    # A non-integer factor: each output pixel takes the label under its centre.
    odd = resize_composition(Composition(small, segments), (3, 4))
    assert np.array_equal(odd.label_map, small[[0, 1, 1]][:, [0, 1, 1, 2]])
