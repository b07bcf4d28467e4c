"""The published refinement: one 2-label ``pydensecrf`` CRF per mask, on the CPU.

Kept as the reference the torch CRF (:mod:`freesegdiff.refine.crf`) is checked against, and as a
selectable backend (``RefineConfig.backend = "pydensecrf"``). ``pydensecrf`` (the ``pydensecrf2``
distribution, the ``[crf-reference]`` extra) is imported only when this backend runs.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from freesegdiff.config import CRFParams
from freesegdiff.extras import MissingExtraError

__all__ = ["pydensecrf_refine"]


def _import_pydensecrf() -> tuple[ModuleType, ModuleType]:
    """``pydensecrf.densecrf`` and ``pydensecrf.utils``, or a MissingExtraError naming the extra."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as error:
        raise MissingExtraError.from_import_error("pydensecrf", error) from error
    return densecrf, utils


def pydensecrf_refine(
    image: np.ndarray, masks: np.ndarray, params: CRFParams | None = None
) -> np.ndarray:
    """Refine each mask with its own dense CRF, exactly as the FreeSeg-Diff script calls it.

    Per mask: ``DenseCRF2D(W, H, 2)``, ``unary_from_labels(mask, 2, gt_prob, zero_unsure=False)``,
    ``addPairwiseGaussian(sxy, compat)``, ``addPairwiseBilateral(sxy, srgb, image, compat)``,
    ``inference(iterations)``, argmax over the two labels.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool.
        params: the CRF's parameters; None: the released ones.

    Returns:
        (N, H, W) bool refined masks.
    """
    params = params or CRFParams()
    densecrf, utils = _import_pydensecrf()
    count, height, width = masks.shape
    # pydensecrf's Cython signature wants a writable buffer; ascontiguousarray returns a
    # read-only input (every image load_image reads) as it is, so copy whenever needed.
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    refined = np.zeros((count, height, width), dtype=bool)
    for index, mask in enumerate(masks):
        crf = densecrf.DenseCRF2D(width, height, 2)
        labels = mask.astype(np.int64)
        unary = utils.unary_from_labels(labels, 2, gt_prob=params.gt_prob, zero_unsure=False)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
        crf.addPairwiseBilateral(
            sxy=params.bilateral_sxy,
            srgb=params.bilateral_srgb,
            rgbim=rgb,
            compat=params.bilateral_compat,
        )
        marginals = np.asarray(crf.inference(params.iterations)).reshape(2, height, width)
        refined[index] = marginals.argmax(axis=0) == 1
    return refined
