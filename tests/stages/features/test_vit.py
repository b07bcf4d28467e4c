"""ViT patch-token features (features.extractor = "vit"): tiny random DINOv2, ViT, CLIP and
MAE models built here, saved in the Hub layout and loaded through the same path as real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freesegdiff.config import FeatureConfig
from freesegdiff.errors import ConfigError, FreeSegDiffError

CPU = torch.device("cpu")
SMALL = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}


def _save(kind: str, folder: Path) -> Path:
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ViTConfig,
        ViTImageProcessor,
        ViTMAEConfig,
        ViTMAEForPreTraining,
        ViTModel,
    )

    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if kind == "dinov2":
        model = Dinov2Model(
            Dinov2Config(**SMALL, intermediate_size=32, patch_size=8, image_size=32)
        )
    elif kind == "dinov2-registers":
        config = Dinov2WithRegistersConfig(
            **SMALL, intermediate_size=32, patch_size=8, image_size=32, num_register_tokens=4
        )
        model = Dinov2WithRegistersModel(config)
    elif kind == "vit":
        model = ViTModel(
            ViTConfig(**SMALL, intermediate_size=32, patch_size=8, image_size=32),
            add_pooling_layer=False,
        )
    elif kind == "mae":  # the Hub's MAE checkpoints hold the pre-training model, decoder and all
        config = ViTMAEConfig(
            **SMALL,
            intermediate_size=32,
            patch_size=8,
            image_size=32,
            decoder_hidden_size=8,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=16,
        )
        model = ViTMAEForPreTraining(config)
    else:
        vision = {**SMALL, "intermediate_size": 32, "patch_size": 8, "image_size": 32}
        text = {**SMALL, "intermediate_size": 32, "vocab_size": 99}
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(folder)
    processor = (BitImageProcessor if kind.startswith("dinov2") else ViTImageProcessor)(
        image_mean=mean, image_std=std
    )
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-registers", "vit", "clip", "mae"])
def test_patch_features_are_the_chosen_hidden_states_on_the_patch_grid(kind, tmp_path, photos):
    from freesegdiff.stages.features.vit import PatchFeatures

    folder = _save(kind, tmp_path)
    config = FeatureConfig(image_size=60, feature_size=8, vit_layer=1)  # 56 x 56: 7 x 7 patches
    features = PatchFeatures.from_pretrained(str(folder), config=config, device=CPU)
    images = [photos["chelsea"], photos["coffee"]]
    ours = features(images)
    assert ours.shape == (2, 16, 8, 8) and features.channels == 16
    # independently: the model's hidden state 1, class (and register) tokens dropped
    pixels = features.pixels(images)
    assert pixels.shape == (2, 3, 56, 56)
    extra = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    if kind == "mae":  # every patch kept, in a random order: ids_restore puts them back
        assert features.model.config.mask_ratio == 0.0
        extra["noise"] = torch.rand(2, 49, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = features.model(pixel_values=pixels, output_hidden_states=True, **extra)
    skip = 5 if kind == "dinov2-registers" else 1
    tokens = hidden.hidden_states[1][:, skip:]
    if kind == "mae":
        order = torch.argsort(extra["noise"], dim=1)  # token i is patch order[:, i]
        assert not torch.equal(order, torch.arange(49).expand(2, -1))
        tokens = torch.empty_like(tokens).scatter_(1, order[:, :, None].expand(-1, -1, 16), tokens)
    assert tokens.shape[1] == 49
    grid = tokens.transpose(1, 2).reshape(2, 16, 7, 7)
    expected = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-registers", "vit", "clip", "mae"])
def test_the_pipeline_runs_on_a_vit_backbone_without_loading_stable_diffusion(
    kind, tmp_path, photos
):
    from freesegdiff import FreeSegDiff

    folder = _save(kind, tmp_path)
    overrides = {
        "features.extractor": "vit",
        "models.backbone": str(folder),
        "models.diffusion": str(tmp_path / "no-such-model"),  # never loaded, never checked
        "features.image_size": 64,
    }
    pipe = FreeSegDiff.from_preset("tiny", overrides=overrides)
    result = pipe(photos["astronaut"])
    assert result.label_map.shape == photos["astronaut"].shape[:2]
    assert np.unique(result.cluster_map).size > 1
    # closed vocabulary prunes with Stable Diffusion's text encoder, which is missing here
    with pytest.raises(FreeSegDiffError, match="no-such-model"):
        pipe(photos["astronaut"], classes=["person", "rocket"])


def test_a_vit_backbone_prunes_classes_as_stable_diffusion_features_do(tmp_path, photos):
    """Closed vocabulary: the caption's entities are matched with SD's text encoder (loaded
    alone), so the candidates equal those of the Stable Diffusion pipeline, image by image."""
    from freesegdiff import FreeSegDiff

    folder = _save("dinov2", tmp_path)
    vit = {"features.extractor": "vit", "models.backbone": str(folder)}
    classes = ["person", "rocket", "sky", "dog", "grass", "building"]
    sd_pipe = FreeSegDiff.from_preset("tiny")
    vit_pipe = FreeSegDiff.from_preset("tiny", overrides={**vit, "features.image_size": 64})
    for name in ("astronaut", "coffee", "chelsea"):
        ours = vit_pipe(photos[name], classes=classes)
        theirs = sd_pipe(photos[name], classes=classes)
        assert ours.caption == theirs.caption
        assert ours.candidates == theirs.candidates
        assert 0 < len(ours.candidates) <= len(classes)


def test_vit_settings_are_checked_before_loading(tmp_path):
    from freesegdiff import FreeSegDiff
    from freesegdiff.stages.features.vit import PatchFeatures

    with pytest.raises(ConfigError, match="--backbone-model"):
        FreeSegDiff.from_preset("tiny", overrides={"features.extractor": "vit"})
    folder = _save("vit", tmp_path)
    with pytest.raises(ConfigError, match="vit_layer"):
        PatchFeatures.from_pretrained(
            str(folder), config=FeatureConfig(image_size=64, vit_layer=7), device=CPU
        )
