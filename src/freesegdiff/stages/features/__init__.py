"""Steps 3-7: dense features of each image, from which the masks are clustered.

A feature extractor (:class:`FeatureExtractor`) is chosen by ``features.extractor`` from
:data:`EXTRACTORS`: ``"stable-diffusion"`` (``diffusion.py``: the UNet's queries, the method;
its cross-attention-map features in ``attention_maps.py``; the UNet's layers in ``unet.py``) or
``"vit"`` (``vit.py``: a ViT's patch tokens, DINOv2, DINO, CLIP or MAE, for the ablations).

An extractor is a class with these members and a ``from_pretrained(name, *, config, device,
dtype, load, runtime)`` constructor, in a file of this package, plus one entry in
:data:`EXTRACTORS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.infra.arrays import image_tensor
from freesegdiff.infra.devices import to_device
from freesegdiff.stages.registry import Registry

if TYPE_CHECKING:
    from freesegdiff.infra.timing import StageTimer

__all__ = ["EXTRACTORS", "FeatureExtractor", "images_to_tensor", "resized_images"]

# features.extractor -> the extractor class
EXTRACTORS = Registry(
    "features.extractor",
    {
        "stable-diffusion": "freesegdiff.stages.features.diffusion:DiffusionFeatures",
        "vit": "freesegdiff.stages.features.vit:PatchFeatures",
    },
)


class FeatureExtractor(Protocol):
    """The feature stage (docs/method.md, steps 3 to 7) as the pipeline uses it.

    :class:`DiffusionFeatures` is one; another extractor (DINOv2, CLIP or MAE patch tokens,
    attention maps) implements these members and is passed to :class:`FreeSegDiff` (or returned
    by a :class:`~freesegdiff.pipeline.ModelSource`) without any change to the pipeline.
    """

    device: torch.device
    dtype: torch.dtype
    released: dict[str, list[str]]  # model -> freed modules (see DiffusionFeatures)

    def __call__(
        self,
        images: Sequence[np.ndarray],
        seed: int | None = 0,
        stop_early: bool = True,
        timer: StageTimer | None = None,
    ) -> torch.Tensor:
        """``B`` RGB uint8 ``(H, W, 3)`` images -> ``(B, C, F, F)`` float32 on ``device``."""
        ...

    def text_embedder(self) -> Any:
        """``texts -> (N, D)`` embeddings for closed-vocabulary matching (docs/method.md,
        step 9), or raise :class:`ConfigError` saying why there are none."""
        ...

    def release_unused(self) -> dict[str, list[str]]:
        """Free what the features never run (may free nothing)."""
        ...

    def release_text_encoder(self) -> None:
        """Free the text encoder when only open vocabulary runs (may do nothing)."""
        ...


def images_to_tensor(
    images: Sequence[np.ndarray], size: int, device: torch.device, resize: str = "pil"
) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` images -> ``(B, 3, size, size)`` float32 in [-1, 1].

    Each image is resized to ``size`` squared, aspect not kept (docs/method.md, step 3):
    ``resize="pil"``, PIL's bilinear filter on the uint8 image with a uint8 result (the
    released script); ``"torch"``, antialiased bilinear in float on ``device``, no rounding.
    """
    return resized_images(images, size, device, resize).clamp(0, 255) / 127.5 - 1.0


def resized_images(
    images: Sequence[np.ndarray], size: int, device: torch.device, resize: str = "pil"
) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` images -> ``(B, 3, size, size)`` float32 pixel values (0..255;
    ``"torch"``'s antialiasing may overshoot that range), resized as :func:`images_to_tensor`
    says."""
    batch = []
    for image in images:
        if resize == "pil" and image.shape[:2] != (size, size):
            from PIL import Image

            picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
            image = np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR))
        pixels = to_device(image_tensor(image), device)[None].float()  # (1, 3, H, W)
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        batch.append(pixels)
    return torch.cat(batch)
