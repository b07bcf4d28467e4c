"""Painting masks into a label map, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from freesegdiff.compose import compose_label_map


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
