"""Mask refinement: sharpen each kept cluster mask along the image's edges.

docs/method.md, step 12.

One entry point, :func:`refine_masks`, dispatching on ``RefineConfig.method``:

- ``"crf"``: a 2-label dense CRF per mask, as published (``gt_prob`` 0.9, Gaussian term sxy 20
  compat 5, bilateral term sxy 20 srgb 20 compat 100, 10 mean-field iterations). Backend
  ``"pydensecrf"`` (:mod:`.densecrf_reference`, default: the released implementation, CPU
  only), or ``"torch"`` (:mod:`.crf`; the ``extended`` preset) running all masks of an image
  at once on any torch device (it agrees with pydensecrf except on near-ties, about one pixel
  in 10^5).
- ``"pamr"``: pixel-adaptive mask refinement (:mod:`.pamr`), thresholded at 0.5.
- ``"none"``: the masks are returned as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from freesegdiff.config import RefineConfig
from freesegdiff.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a torch backend runs: CRF worker processes
    import torch  # that import this package for pydensecrf stay light

__all__ = ["Refiner", "refine_masks"]

_METHODS = ("crf", "pamr", "none")
_BACKENDS = ("torch", "pydensecrf")


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
            side (:class:`freesegdiff.infra.tuning.WorkerProcesses`); None: one after another here.

    Returns:
        (N, H, W) bool refined masks, a new array.

    Raises:
        ValueError: an array of the wrong shape or type.
        ConfigError: an unknown method or backend, or a setting out of range.
    """
    _check_inputs(image, masks)
    _check_config(config)
    masks = masks.astype(bool, copy=True)
    if config.method == "none" or masks.shape[0] == 0:
        return masks
    if config.method == "crf" and config.backend == "pydensecrf":
        from freesegdiff.stages.refine.densecrf_reference import pydensecrf_refine

        return pydensecrf_refine(image, masks, config.crf_params(), pool)

    import torch

    from freesegdiff.infra.arrays import image_tensor
    from freesegdiff.infra.devices import to_device

    device = torch.device(device)
    image_t = to_device(image_tensor(image), device).permute(1, 2, 0)  # (H, W, 3) uint8
    masks_t = to_device(torch.from_numpy(masks), device)
    if config.method == "crf":
        from freesegdiff.stages.refine.crf import binary_dense_crf

        refined = binary_dense_crf(image_t, masks_t, config.crf_params())
    else:
        from freesegdiff.stages.refine.pamr import pamr

        # (H, W, 3) uint8 -> (3, H, W) in [0, 1]
        colour = image_t.permute(2, 0, 1).to(torch.float32) / 255.0
        probabilities = pamr(
            colour,
            masks_t.to(torch.float32),
            iterations=config.pamr_iterations,
            dilations=config.pamr_dilations,
        )
        refined = probabilities > 0.5
    return refined.cpu().numpy()


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


def _check_config(config: RefineConfig) -> None:
    """Raise a ConfigError naming the first setting that cannot work."""
    if config.method not in _METHODS:
        raise ConfigError(f"refine.method must be one of {_METHODS}, got {config.method!r}")
    if config.method == "crf":
        if config.backend not in _BACKENDS:
            raise ConfigError(f"refine.backend must be one of {_BACKENDS}, got {config.backend!r}")
        if not 0.0 < config.gt_prob < 1.0:
            raise ConfigError(f"refine.gt_prob must be in (0, 1), got {config.gt_prob}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(config, name) > 0:
                raise ConfigError(f"refine.{name} must be positive, got {getattr(config, name)}")
        if config.iterations < 0:
            raise ConfigError(f"refine.iterations must be >= 0, got {config.iterations}")
    if config.method == "pamr":
        if config.pamr_iterations < 0:
            raise ConfigError(f"refine.pamr_iterations must be >= 0, got {config.pamr_iterations}")
        if not config.pamr_dilations or any(int(d) < 1 for d in config.pamr_dilations):
            raise ConfigError(
                f"refine.pamr_dilations must be positive integers, got {config.pamr_dilations}"
            )


class Refiner:
    """Stage 12: refine the kept masks of one image (settings checked when it is built)."""

    def __init__(self, config: RefineConfig, device: str | torch.device = "cpu") -> None:
        _check_config(config)
        self.config = config
        self.device = device
        # worker processes for pydensecrf (freesegdiff.infra.tuning.RuntimeOptions.tune_refiner)
        self.pool: Any = None

    def __call__(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 image, ``(N, H, W)`` bool masks -> ``(N, H, W)`` bool refined."""
        return refine_masks(image, masks, self.config, self.device, self.pool)
