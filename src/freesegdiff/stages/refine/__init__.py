"""Step 12: refine each kept cluster mask along the image's edges (docs/method.md, step 12).

The stage (:class:`Refiner`) runs the refiner ``refine.method`` names in :data:`REFINERS`:

- ``"crf"``: a 2-label dense CRF per mask, as published (``gt_prob`` 0.9, Gaussian term sxy 20
  compat 5, bilateral term sxy 20 srgb 20 compat 100, 10 mean-field iterations). Backend
  ``"pydensecrf"`` (:mod:`.densecrf_reference`, default: the released implementation, CPU
  only), or ``"torch"`` (:mod:`.crf`; the ``extended`` preset) running all masks of an image
  at once on any torch device (it agrees with pydensecrf except on near-ties, about one pixel
  in 10^5).
- ``"pamr"``: pixel-adaptive mask refinement (:mod:`.pamr`), thresholded at 0.5.
- ``"none"``: the masks are returned as they are.

A refiner is a function ``(image (H, W, 3) uint8, masks (N, H, W) bool, config, device, pool)
-> (N, H, W) bool`` plus one entry in :data:`REFINERS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from freesegdiff.config import RefineConfig
from freesegdiff.stages.registry import Registry

if TYPE_CHECKING:  # torch is imported where a torch backend runs: CRF worker processes
    import torch  # that import this package for pydensecrf stay light

    from freesegdiff.infra.tuning import RuntimeOptions

__all__ = ["REFINERS", "Refiner", "refine_masks"]

# refine.method -> the refiner
REFINERS = Registry(
    "refine.method",
    {
        "crf": "freesegdiff.stages.refine:crf_refine",
        "pamr": "freesegdiff.stages.refine:pamr_refine",
        "none": "freesegdiff.stages.refine:no_refine",
    },
)


def refine_masks(
    image: np.ndarray,
    masks: np.ndarray,
    config: RefineConfig,
    device: str | torch.device = "cpu",
    pool: Any = None,
) -> np.ndarray:
    """Refine binary masks of one image, each independently.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (N, H, W) bool (or integer 0/1) foreground masks at the image's size; N may be 0.
        config: which refinement and its settings.
        device: where the torch refinements run ("cpu", "cuda", ...); the pydensecrf backend
            always runs on the CPU.
        pool: for the pydensecrf backend, worker processes that run the masks' CRFs side by
            side (:class:`freesegdiff.infra.tuning.WorkerProcesses`); None: one after another
            here.

    Returns:
        (N, H, W) bool refined masks, a new array.

    Raises:
        ValueError: an array of the wrong shape or type.
        ConfigError: ``refine.method`` names no registered refiner.
    """
    _check_inputs(image, masks)
    masks = masks.astype(bool, copy=True)
    if masks.shape[0] == 0:
        return masks
    refine = REFINERS.get(config.method)
    refined: np.ndarray = refine(image, masks, config, device, pool)
    return refined


def no_refine(
    image: np.ndarray, masks: np.ndarray, config: RefineConfig, device: Any, pool: Any
) -> np.ndarray:
    """``refine.method = "none"``: the masks as they are."""
    return masks


def crf_refine(
    image: np.ndarray, masks: np.ndarray, config: RefineConfig, device: Any, pool: Any
) -> np.ndarray:
    """``refine.method = "crf"``: the dense CRF of ``refine.backend``, mask by mask."""
    if config.backend == "pydensecrf":
        from freesegdiff.stages.refine.densecrf_reference import pydensecrf_refine

        return pydensecrf_refine(image, masks, config, pool)
    from freesegdiff.stages.refine.crf import binary_dense_crf

    image_t, masks_t = _on_device(image, masks, device)
    return binary_dense_crf(image_t, masks_t, config).cpu().numpy()


def pamr_refine(
    image: np.ndarray, masks: np.ndarray, config: RefineConfig, device: Any, pool: Any
) -> np.ndarray:
    """``refine.method = "pamr"``: pixel-adaptive mask refinement, thresholded at 0.5."""
    import torch

    from freesegdiff.stages.refine.pamr import pamr

    image_t, masks_t = _on_device(image, masks, device)
    colour = image_t.permute(2, 0, 1).to(torch.float32) / 255.0  # (H, W, 3) -> (3, H, W)
    probabilities = pamr(
        colour,
        masks_t.to(torch.float32),
        iterations=config.pamr_iterations,
        dilations=config.pamr_dilations,
    )
    refined: np.ndarray = (probabilities > 0.5).cpu().numpy()
    return refined


def _on_device(image: np.ndarray, masks: np.ndarray, device: Any) -> tuple[Any, Any]:
    """The image ``(H, W, 3)`` uint8 and the masks ``(N, H, W)`` bool as tensors on ``device``."""
    import torch

    from freesegdiff.infra.arrays import image_tensor
    from freesegdiff.infra.devices import to_device

    device = torch.device(device)
    image_t = to_device(image_tensor(image), device).permute(1, 2, 0)  # (H, W, 3) uint8
    return image_t, to_device(torch.from_numpy(masks), device)


def _check_inputs(image: np.ndarray, masks: np.ndarray) -> None:
    """Raise a ValueError naming the argument whose shape or type cannot work."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be an (H, W, 3) RGB numpy array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (0..255; the CRF's srgb is in those units), got {image.dtype}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if not isinstance(masks, np.ndarray) or masks.ndim != 3:
        shape = getattr(masks, "shape", type(masks).__name__)
        raise ValueError(f"masks must be an (N, H, W) numpy array, got {shape}")
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
            f"{image.shape[0]}x{image.shape[1]}: resize the masks to the image first"
        )
    if masks.dtype != bool and not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(
            f"masks must be boolean (or integer 0/1), got {masks.dtype}: threshold soft masks first"
        )


class Refiner:
    """Stage 12: refine the kept masks of one image.

    ``runtime``: the speed tuning (:class:`~freesegdiff.infra.tuning.RuntimeOptions`): the
    released CRF then runs its masks in worker processes (``crf_processes``); None: here, one
    after another.
    """

    def __init__(
        self,
        config: RefineConfig,
        device: str | torch.device = "cpu",
        runtime: RuntimeOptions | None = None,
    ) -> None:
        REFINERS.check(config.method)
        self.config = config
        self.device = device
        released_crf = config.method == "crf" and config.backend == "pydensecrf"
        self.pool: Any = runtime.crf_pool(device) if runtime is not None and released_crf else None

    def __call__(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 image, ``(N, H, W)`` bool masks -> ``(N, H, W)`` bool refined."""
        return refine_masks(image, masks, self.config, self.device, self.pool)
