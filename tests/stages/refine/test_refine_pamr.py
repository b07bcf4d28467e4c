"""PAMR: masks follow the image's edges and stay put where the image is flat."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freesegdiff.config import RefineConfig
from freesegdiff.stages.refine import refine_masks
from freesegdiff.stages.refine.pamr import pamr, pamr_affinities


def two_region_image() -> np.ndarray:
    """64x96 uint8 RGB: columns 0..39 one colour, 40..95 another."""
    image = np.empty((64, 96, 3), np.uint8)
    image[:, :40] = (180, 40, 40)
    image[:, 40:] = (40, 160, 200)
    return image


@pytest.mark.parametrize("offset", [-4, 4])
def test_offset_mask_moves_to_the_true_edge(offset: int) -> None:
    image = two_region_image()
    truth = np.zeros((64, 96), bool)
    truth[:, :40] = True
    mask = np.zeros((64, 96), bool)
    mask[:, : 40 + offset] = True
    refined = refine_masks(image, mask[None], RefineConfig(method="pamr"))[0]
    print(
        f"offset {offset}: {int((mask != truth).sum())} wrong pixels before, "
        f"{int((refined != truth).sum())} after PAMR"
    )
    assert (mask != truth).sum() == 64 * 4
    np.testing.assert_array_equal(refined, truth)


def test_constant_image_leaves_the_interior_unchanged() -> None:
    image = torch.full((3, 64, 96), 0.5)
    mask = torch.zeros(1, 64, 96)
    mask[0, 8:56, 16:80] = 1.0
    # 10 steps of reach 2 can move values 20 pixels: farther inside, nothing changes.
    refined = pamr(image, mask, iterations=10, dilations=(1, 2))
    assert torch.equal(refined[0, 28:36, 36:60], torch.ones(8, 24))
    assert torch.equal(refined[0, :, 100 - 4 :], torch.zeros(64, 0))
    # Flat image: every neighbour weighs the same, 1 / (8 * number of dilations).
    weights = pamr_affinities(image, (1, 2, 4))
    torch.testing.assert_close(weights, torch.full((24, 64, 96), 1 / 24))


def test_constant_image_keeps_a_straight_edge() -> None:
    image = np.full((64, 96, 3), 128, np.uint8)
    mask = np.zeros((2, 64, 96), bool)
    mask[0, :, :48] = True
    mask[1, :32] = True
    refined = refine_masks(image, mask, RefineConfig(method="pamr"))
    np.testing.assert_array_equal(refined, mask)


def test_affinities_sum_to_one_and_avoid_the_other_region() -> None:
    image = torch.from_numpy(two_region_image()).permute(2, 0, 1).float() / 255
    weights = pamr_affinities(image, (1, 2))
    torch.testing.assert_close(weights.sum(0), torch.ones(64, 96))
    # Pixel (32, 39), the last of the left region: its right neighbours (+1 and +2 columns,
    # indices 2, 4, 7 and 10, 12, 15) are across the edge.
    across = weights[[2, 4, 7, 10, 12, 15], 32, 39].sum()
    assert across < 1e-3


def test_bad_inputs() -> None:
    image = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match="masks must be"):
        pamr(image, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="dilations"):
        pamr(image, torch.zeros(1, 8, 8), dilations=(0,))
    assert pamr(image, torch.zeros(0, 8, 8)).shape == (0, 8, 8)
