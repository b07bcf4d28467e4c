"""The published refinement: one 2-label ``pydensecrf`` CRF per mask, on the CPU.

Kept as the reference the torch CRF (:mod:`freesegdiff.stages.refine.crf`) is checked against,
and as a selectable backend (``RefineConfig.backend = "pydensecrf"``). ``pydensecrf`` (the
``pydensecrf2`` distribution, the ``[crf-reference]`` extra) is imported only when this backend
runs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from freesegdiff.config import RefineConfig
from freesegdiff.infra.extras import MissingExtraError

__all__ = ["pydensecrf_refine", "refine_one"]


def _import_pydensecrf() -> tuple[ModuleType, ModuleType]:
    """``pydensecrf.densecrf`` and ``pydensecrf.utils``, or a MissingExtraError naming the extra."""
    try:
        import pydensecrf.densecrf as densecrf
        import pydensecrf.utils as utils
    except ImportError as error:
        raise MissingExtraError.from_import_error("pydensecrf", error) from error
    return densecrf, utils


def pydensecrf_refine(
    image: np.ndarray, masks: np.ndarray, params: RefineConfig | None = None, pool: Any = None
) -> np.ndarray:
    """Refine each mask with its own dense CRF, exactly as the FreeSeg-Diff script calls it.

    Per mask (:func:`refine_one`): ``DenseCRF2D(W, H, 2)``, ``unary_from_labels(mask, 2,
    gt_prob, zero_unsure=False)``, ``addPairwiseGaussian(sxy, compat)``,
    ``addPairwiseBilateral(sxy, srgb, image, compat)``, ``inference(iterations)``, argmax over
    the two labels.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool.
        params: the CRF's parameters (the CRF fields of :class:`RefineConfig`); None: the
            released ones.
        pool: something with ``map(function, *iterables)`` (worker processes,
            :class:`freesegdiff.infra.tuning.WorkerProcesses`) to run the masks' CRFs side by
            side: the same calls, so the same masks; None: one after another in this process.

    Returns:
        (N, H, W) bool refined masks.
    """
    params = params or RefineConfig()
    _import_pydensecrf()  # a missing extra is named here, not in a worker
    # pydensecrf's Cython signature wants a writable buffer; ascontiguousarray returns a
    # read-only input (every image load_image reads) as it is, so copy whenever needed.
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    count = masks.shape[0]
    if pool is not None and count > 1:
        results = list(pool.map(refine_one, [rgb] * count, list(masks), [params] * count))
    else:
        results = [refine_one(rgb, mask, params) for mask in masks]
    refined = np.zeros(masks.shape, dtype=bool)
    for index, result in enumerate(results):
        refined[index] = result
    return refined


def refine_one(rgb: np.ndarray, mask: np.ndarray, params: RefineConfig) -> np.ndarray:
    """One mask's released CRF: ``(H, W, 3)`` writable uint8 image, ``(H, W)`` bool mask ->
    ``(H, W)`` bool refined mask. Importable without torch (worker processes run it)."""
    densecrf, utils = _import_pydensecrf()
    height, width = mask.shape
    crf = densecrf.DenseCRF2D(width, height, 2)
    labels = mask.astype(np.int64)
    unary = utils.unary_from_labels(labels, 2, gt_prob=params.gt_prob, zero_unsure=False)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.require(rgb, dtype=np.uint8, requirements=["C", "W"]),
        compat=params.bilateral_compat,
    )
    marginals = np.asarray(crf.inference(params.iterations)).reshape(2, height, width)
    result: np.ndarray = marginals.argmax(axis=0) == 1
    return result
