"""The dense CRF refinement: the torch CRF against pydensecrf, and the dispatcher's contract."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from freesegdiff.config import RefineConfig
from freesegdiff.errors import ConfigError
from freesegdiff.stages.refine import refine_masks
from freesegdiff.stages.refine.crf import (
    PermutohedralLattice,
    binary_dense_crf,
    dense_crf,
    position_features,
    unary_from_masks,
)

pytest.importorskip("pydensecrf.densecrf")

CLUSTER_SIZE = 32  # the pipeline clusters a 32x32 feature map, then resizes it (nearest)


def coarse_mask(photo: np.ndarray, criterion: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A mask the way the pipeline makes them: decided on a 32x32 grid, upsampled nearest.

    ``criterion`` gets the (32, 32, 3) area-averaged photo in [0, 1] and returns a boolean
    (32, 32) map; the result is (H, W) bool, blocky along every object edge.
    """
    from skimage.transform import resize

    small = resize(photo, (CLUSTER_SIZE, CLUSTER_SIZE), anti_aliasing=True)
    cluster_map = criterion(small)
    height, width = photo.shape[:2]
    rows = np.arange(height) * CLUSTER_SIZE // height
    columns = np.arange(width) * CLUSTER_SIZE // width
    return cluster_map[rows][:, columns]


# Two masks per photo, each a real region: the cat, its dark stripes; the suit, the flag; the
# cup and saucer, the coffee-coloured table; the sky, the dark ground.
CRITERIA: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {
    "chelsea": [
        lambda rgb: rgb[..., 0] - rgb[..., 2] > 0.15,
        lambda rgb: rgb.mean(-1) < 0.35,
    ],
    "astronaut": [
        lambda rgb: rgb.mean(-1) > 0.6,
        lambda rgb: rgb[..., 0] - rgb[..., 2] > 0.15,
    ],
    "coffee": [
        lambda rgb: rgb.mean(-1) > 0.6,
        lambda rgb: rgb[..., 0] - rgb[..., 2] > 0.25,
    ],
    "rocket": [
        lambda rgb: rgb[..., 2] - rgb[..., 0] > 0.05,
        lambda rgb: rgb.mean(-1) < 0.3,
    ],
}


def direct_pydensecrf(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The published call, written out: (H, W) bool -> (H, W) bool."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = mask.shape
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(unary_from_labels(mask.astype(np.int64), 2, gt_prob=0.9, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=20, compat=5)
    crf.addPairwiseBilateral(sxy=20, srgb=20, rgbim=np.ascontiguousarray(image), compat=100)
    marginals = np.asarray(crf.inference(10)).reshape(2, height, width)
    return marginals.argmax(0) == 1


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_torch_crf_agrees_with_pydensecrf_on_real_photos(
    name: str, photos: dict[str, np.ndarray]
) -> None:
    photo = photos[name]
    masks = np.stack([coarse_mask(photo, criterion) for criterion in CRITERIA[name]])
    ours = refine_masks(photo, masks, RefineConfig(backend="torch"))
    reference = refine_masks(photo, masks, RefineConfig(backend="pydensecrf"))
    for index, mask in enumerate(masks):
        agreement = float((ours[index] == reference[index]).mean())
        changed = float((reference[index] != mask).mean())
        print(
            f"{name} mask {index}: foreground {mask.mean():.3f}, pydensecrf changed "
            f"{changed:.2%} of pixels, torch agrees on {agreement:.4%}"
        )
        assert 0.05 < mask.mean() < 0.95  # a real region, not all or nothing
        assert changed > 0.01  # there was refinement to do
        assert agreement >= 0.98


def two_colour_image() -> tuple[np.ndarray, np.ndarray]:
    """A 96x128 image: a disc (radius 30) of one colour on another, and the disc's mask."""
    rows, columns = np.mgrid[:96, :128]
    disc = (rows - 48) ** 2 + (columns - 60) ** 2 <= 30**2
    image = np.where(disc[..., None], [200, 60, 40], [40, 90, 160]).astype(np.uint8)
    return image, disc


def blocky(mask: np.ndarray, block: int) -> np.ndarray:
    """The majority vote of each block x block cell, upsampled nearest."""
    height, width = mask.shape
    cells = mask.reshape(height // block, block, width // block, block).mean(axis=(1, 3)) > 0.5
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_crf_moves_a_blocky_mask_to_the_colour_edge() -> None:
    image, disc = two_colour_image()
    coarse = blocky(disc, 16)
    refined = refine_masks(image, coarse[None], RefineConfig())[0]
    before, after = iou(coarse, disc), iou(refined, disc)
    print(f"IoU with the disc: blocky {before:.3f}, after the CRF {after:.3f}")
    assert before < 0.9
    assert after > 0.98
    np.testing.assert_array_equal(refined, direct_pydensecrf(image, coarse))


def test_binary_shortcut_equals_the_general_two_label_crf() -> None:
    image, disc = two_colour_image()
    masks = torch.from_numpy(np.stack([blocky(disc, 16), blocky(disc, 32)]))
    image_t = torch.from_numpy(image)
    marginals = dense_crf(image_t, unary_from_masks(masks, 0.9))
    assert marginals.shape == (2, 2, 96, 128)
    torch.testing.assert_close(marginals.sum(1), torch.ones(2, 96, 128))
    assert torch.equal(marginals.argmax(1) == 1, binary_dense_crf(image_t, masks))


def test_lattice_filter_approximates_the_gaussian_kernel() -> None:
    # The whole kernel matrix of a 24x24 grid (sxy 3 pixels), filtered column by column,
    # against the exact exp(-|p_i - p_j|^2 / (2 * 3^2)): the lattice is an approximation (not
    # even a symmetric one: its axis blurs do not commute), but a close one.
    features = position_features(24, 24, 3.0, torch.device("cpu"))
    lattice = PermutohedralLattice.build(features)
    kernel = lattice.filter(torch.eye(24 * 24))
    exact = torch.exp(-(torch.cdist(features, features) ** 2) / 2)
    correlation = torch.corrcoef(torch.stack([kernel.flatten(), exact.flatten()]))[0, 1]
    assert correlation > 0.99
    assert kernel.min() > -1e-6  # zero up to rounding
    assert kernel.diagonal().min() > 0.5  # the self term is kept, as pydensecrf keeps it


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_crf_on_cuda_matches_the_cpu(photos: dict[str, np.ndarray]) -> None:
    photo = photos["astronaut"]
    masks = np.stack([coarse_mask(photo, criterion) for criterion in CRITERIA["astronaut"]])
    on_cpu = refine_masks(photo, masks, RefineConfig(), device="cpu")
    on_cuda = refine_masks(photo, masks, RefineConfig(), device="cuda")
    assert (on_cpu == on_cuda).mean() > 0.9999


def test_crf_pydensecrf_backend_equals_a_direct_call(photos: dict[str, np.ndarray]) -> None:
    photo = photos["chelsea"]
    mask = coarse_mask(photo, CRITERIA["chelsea"][0])
    refined = refine_masks(photo, mask[None], RefineConfig(backend="pydensecrf"))
    np.testing.assert_array_equal(refined[0], direct_pydensecrf(photo, mask))


@pytest.mark.parametrize("method", ["crf", "pamr", "none"])
def test_no_masks_give_an_empty_stack(method: str) -> None:
    image, _ = two_colour_image()
    refined = refine_masks(image, np.zeros((0, 96, 128), bool), RefineConfig(method=method))
    assert refined.shape == (0, 96, 128)
    assert refined.dtype == bool


def test_method_none_returns_the_masks_unchanged() -> None:
    image, disc = two_colour_image()
    masks = np.stack([blocky(disc, 16), ~disc])
    refined = refine_masks(image, masks, RefineConfig(method="none"))
    np.testing.assert_array_equal(refined, masks)
    assert refined is not masks


def test_integer_masks_are_accepted() -> None:
    image, disc = two_colour_image()
    masks = blocky(disc, 16)[None]
    np.testing.assert_array_equal(
        refine_masks(image, masks.astype(np.uint8), RefineConfig()),
        refine_masks(image, masks, RefineConfig()),
    )


@pytest.mark.parametrize(
    ("image_shape", "image_dtype", "masks_shape", "masks_dtype", "message"),
    [
        ((96, 128), np.uint8, (1, 96, 128), bool, "image must be an"),
        ((96, 128, 4), np.uint8, (1, 96, 128), bool, "image must be an"),
        ((96, 128, 3), np.float32, (1, 96, 128), bool, "image must be uint8"),
        ((96, 128, 3), np.uint8, (96, 128), bool, "masks must be an"),
        ((96, 128, 3), np.uint8, (1, 48, 64), bool, "resize the masks"),
        ((96, 128, 3), np.uint8, (1, 96, 128), np.float32, "threshold soft masks"),
    ],
)
def test_wrong_arrays_are_named(
    image_shape: tuple[int, ...],
    image_dtype: type,
    masks_shape: tuple[int, ...],
    masks_dtype: type,
    message: str,
) -> None:
    image = np.zeros(image_shape, image_dtype)
    masks = np.zeros(masks_shape, masks_dtype)
    with pytest.raises(ValueError, match=message):
        refine_masks(image, masks, RefineConfig())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "dense"}, "refine.method"),
        ({"backend": "cuda"}, "refine.backend"),
        ({"gt_prob": 1.0}, "refine.gt_prob"),
        ({"bilateral_srgb": 0.0}, "refine.bilateral_srgb"),
        ({"iterations": -1}, "refine.iterations"),
        ({"method": "pamr", "pamr_dilations": ()}, "refine.pamr_dilations"),
    ],
)
def test_impossible_settings_are_config_errors(settings: dict, message: str) -> None:
    image, disc = two_colour_image()
    with pytest.raises(ConfigError, match=message):
        refine_masks(image, disc[None], RefineConfig(**settings))


def test_zero_iterations_keep_the_coarse_labels() -> None:
    image, disc = two_colour_image()
    coarse = blocky(disc, 16)[None]
    np.testing.assert_array_equal(refine_masks(image, coarse, RefineConfig(iterations=0)), coarse)
