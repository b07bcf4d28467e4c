"""The published refinement: one 2-label ``pydensecrf`` CRF per mask, on the CPU.

Kept as the reference the torch CRF (:mod:`freesegdiff.refine.crf`) is checked against, and as a
selectable backend (``RefineConfig.backend = "pydensecrf"``). ``pydensecrf`` (the ``pydensecrf2``
distribution) is imported only when this backend runs.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

__all__ = ["pydensecrf_refine"]


def _import_pydensecrf() -> tuple[ModuleType, ModuleType]:
    """``pydensecrf.densecrf`` and ``pydensecrf.utils``, or an ImportError that says what to do."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as error:
        raise ImportError(
            "refine.backend='pydensecrf' needs the pydensecrf package: install it with "
            "`pip install pydensecrf2`, or use refine.backend='torch' (the same CRF in torch)"
        ) from error
    return densecrf, utils


def pydensecrf_refine(
    image: np.ndarray,
    masks: np.ndarray,
    *,
    gt_prob: float = 0.9,
    gaussian_sxy: float = 20.0,
    gaussian_compat: float = 5.0,
    bilateral_sxy: float = 20.0,
    bilateral_srgb: float = 20.0,
    bilateral_compat: float = 100.0,
    iterations: int = 10,
) -> np.ndarray:
    """Refine each mask with its own dense CRF, exactly as the FreeSeg-Diff script calls it.

    Per mask: ``DenseCRF2D(W, H, 2)``, ``unary_from_labels(mask, 2, gt_prob, zero_unsure=False)``,
    ``addPairwiseGaussian(sxy, compat)``, ``addPairwiseBilateral(sxy, srgb, image, compat)``,
    ``inference(iterations)``, argmax over the two labels.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool.

    Returns:
        (N, H, W) bool refined masks.
    """
    densecrf, utils = _import_pydensecrf()
    count, height, width = masks.shape
    # pydensecrf's Cython signature wants a writable buffer; ascontiguousarray returns a
    # read-only input (every image load_image reads) as it is, so copy whenever needed.
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    refined = np.zeros((count, height, width), dtype=bool)
    for index, mask in enumerate(masks):
        crf = densecrf.DenseCRF2D(width, height, 2)
        labels = mask.astype(np.int64)
        crf.setUnaryEnergy(utils.unary_from_labels(labels, 2, gt_prob=gt_prob, zero_unsure=False))
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
        crf.addPairwiseBilateral(
            sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat
        )
        marginals = np.asarray(crf.inference(iterations)).reshape(2, height, width)
        refined[index] = marginals.argmax(axis=0) == 1
    return refined
