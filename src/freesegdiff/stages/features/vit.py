"""Non-diffusion features for the paper's backbone comparison: ViT patch tokens
(docs/method.md, ``features.extractor``).

:class:`PatchFeatures` is a :class:`~freesegdiff.stages.features.diffusion.FeatureExtractor` over a
transformers vision transformer: DINOv2 (with or without registers), DINO and other ``ViTModel``
checkpoints, CLIP's vision tower, and MAE's encoder (``ViTMAEModel``, its masking turned off:
``mask_ratio`` 0 and a fixed patch order, so every patch is encoded and put back in place).
Each image is resized to a square of ``image_size`` rounded down to the patch size (bilinear,
aspect not kept, as the diffusion features), scaled with the checkpoint's own mean and std, and
encoded once; the features are the patch tokens of hidden state ``features.vit_layer`` (``-1``:
the last block's output, before the final normalisation; ``hidden_states`` numbering: 0 is the
patch embedding), class and register tokens dropped, laid out on the patch grid and resized
bilinearly to ``feature_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.config import FeatureConfig
from freesegdiff.errors import ConfigError
from freesegdiff.infra import timing
from freesegdiff.infra.devices import frozen
from freesegdiff.infra.hub import LoadOptions, load_pretrained
from freesegdiff.infra.timing import StageTimer

# transformers model_type -> whether the forward takes interpolate_pos_encoding
SUPPORTED = {
    "dinov2": False,  # always interpolates its position table
    "dinov2_with_registers": False,
    "vit": True,
    "clip": True,
    "clip_vision_model": True,
    "vit_mae": True,  # every patch kept (mask_ratio 0), un-shuffled with ids_restore
}
_WHAT = "feature backbone"
_FLAG = "--backbone-model"


class PatchFeatures:
    """Patch-token features of a ViT: ``(B, C, feature_size, feature_size)`` float32."""

    def __init__(
        self,
        model: Any,
        mean: Sequence[float],
        std: Sequence[float],
        config: FeatureConfig,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        model_type = str(getattr(model.config, "model_type", ""))
        if model_type not in SUPPORTED:
            raise ConfigError(_unsupported(model_type))
        self.model = frozen(model, device, dtype)
        self.config = config
        self.device = device
        self.dtype = dtype
        self.released: dict[str, list[str]] = {}
        vision = getattr(model.config, "vision_config", model.config)
        self.patch_size = int(vision.patch_size)
        self.skip_tokens = 1 + int(getattr(vision, "num_register_tokens", 0) or 0)
        self._interpolate = SUPPORTED[model_type]
        self._mae = model_type == "vit_mae"
        if self._mae:  # encode every patch: MAE's pre-training masks 75 % of them
            self.model.config.mask_ratio = 0.0
            self.model.embeddings.config.mask_ratio = 0.0
        self._mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.side = (config.image_size // self.patch_size) * self.patch_size
        if self.side < self.patch_size:
            raise ConfigError(
                f"features.image_size {config.image_size} is below the backbone's patch size "
                f"{self.patch_size}"
            )
        layers = int(vision.num_hidden_layers)
        if not -(layers + 1) <= config.vit_layer <= layers:
            raise ConfigError(
                f"features.vit_layer must be in [-{layers + 1}, {layers}] for this backbone "
                f"({layers} blocks), got {config.vit_layer}"
            )

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        config: FeatureConfig,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        load: LoadOptions | None = None,
        runtime: Any = None,
    ) -> PatchFeatures:
        """Load a DINOv2, DINO / ViT, CLIP or MAE checkpoint (CLIP: its vision tower; MAE: its
        encoder) and its image processor's mean and std, the weights straight into ``dtype`` on
        ``device``. ``runtime``: taken for the extractors' common signature; a ViT runs
        untuned (the tuning is the VAE's and UNet's).

        Raises:
            ConfigError: the checkpoint is not a supported vision transformer.
            ModelUnavailableError: the weights are neither local nor downloadable.
        """
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

        from freesegdiff.infra.weights import load_model

        options: dict[str, Any] = {"what": _WHAT, "flag": _FLAG, "load": load}
        model_config = load_pretrained(AutoConfig.from_pretrained, name, **options)
        model_type = str(getattr(model_config, "model_type", ""))
        if model_type not in SUPPORTED:
            raise ConfigError(_unsupported(model_type, name))
        loader = CLIPVisionModel if model_type.startswith("clip") else AutoModel
        model = load_model(loader.from_pretrained, name, dtype=dtype, device=device, **options)
        processor = load_pretrained(AutoImageProcessor.from_pretrained, name, **options)
        return cls(model, processor.image_mean, processor.image_std, config, device, dtype)

    @property
    def channels(self) -> int:
        """Channels of the features: the backbone's hidden size."""
        vision = getattr(self.model.config, "vision_config", self.model.config)
        return int(vision.hidden_size)

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 ``(H, W, 3)`` images -> ``(B, 3, S, S)`` normalised, in the model dtype
        (resized with PIL's bilinear filter, as the diffusion features)."""
        from freesegdiff.stages.features import resized_images

        scaled = resized_images(images, self.side, self.device, "pil") / 255.0
        pixels = (scaled - self._mean.to(self.device)) / self._std.to(self.device)
        return pixels.to(self.dtype)

    @torch.inference_mode()
    def __call__(
        self,
        images: Sequence[np.ndarray],
        seed: int | None = 0,
        stop_early: bool = True,
        timer: StageTimer | None = None,
    ) -> torch.Tensor:
        """``B`` RGB uint8 images -> ``(B, C, F, F)`` float32 (``seed``, ``stop_early``: unused,
        nothing is random and every block up to the chosen layer runs)."""
        timer = timer or StageTimer(self.device)
        with timer(timing.UNET):
            extra: dict[str, Any] = {}
            if self._interpolate:
                extra["interpolate_pos_encoding"] = True
            grid = self.side // self.patch_size
            if self._mae:  # a fixed order instead of random noise (which draws from torch's RNG)
                order = torch.arange(grid * grid, device=self.device, dtype=torch.float32)
                extra["noise"] = order.expand(len(images), -1)
            output = self.model(
                pixel_values=self.pixels(images), output_hidden_states=True, **extra
            )
            hidden = output.hidden_states[self.config.vit_layer]  # (B, tokens, C)
        with timer(timing.FEATURES):
            patches = hidden[:, self.skip_tokens :].float()
            if self._mae:  # the encoder's order back to the patch grid's
                restore = output.ids_restore[:, :, None].expand(-1, -1, patches.shape[-1])
                patches = torch.gather(patches, 1, restore)
            if patches.shape[1] != grid * grid:
                raise RuntimeError(
                    f"the backbone gave {patches.shape[1]} patch tokens, not {grid}x{grid}"
                )
            maps = patches.transpose(1, 2).reshape(len(images), -1, grid, grid)
            size = self.config.feature_size
            if grid != size:
                maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        return maps

    def text_embedder(self) -> Any:
        """There is none: :meth:`FreeSegDiff.from_config` gives the pipeline Stable Diffusion's
        text encoder alone for closed-vocabulary pruning (``models.diffusion``)."""
        raise ConfigError(
            "a ViT backbone has no text encoder to match the caption against the class names; "
            "build the pipeline with FreeSegDiff.from_config (it prunes with Stable Diffusion's "
            "text encoder), or set vocabulary.prune_with_caption to false (--no-prune)"
        )

    def release_unused(self) -> dict[str, list[str]]:
        """Nothing to free (every block up to the chosen layer runs)."""
        return self.released

    def release_text_encoder(self) -> None:
        """Nothing to free: a ViT backbone has no text encoder."""


def _unsupported(model_type: str, name: str | None = None) -> str:
    which = f"{name!r} is" if name is not None else "the model is"
    return (
        f"{which} a {model_type!r} model; the ViT backbones are DINOv2 ('dinov2', "
        "'dinov2_with_registers', e.g. facebook/dinov2-base), DINO and other ViTs ('vit', e.g. "
        "facebook/dino-vitb16), CLIP ('clip', its vision tower) and MAE ('vit_mae', e.g. "
        "facebook/vit-mae-base). Pass one with "
        f"{_FLAG}."
    )
