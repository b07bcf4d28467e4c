"""Real architectures from the shipped configs: true parameter counts, sane random weights."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from freesegdiff.bench import models
from freesegdiff.config import CaptionConfig

SD = "CompVis/stable-diffusion-v1-4"


def count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # tied ones once


def test_parameter_counts_are_the_published_ones():
    """Built on the meta device (no memory); the counts of the Hub checkpoints."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        BlipConfig,
        BlipForConditionalGeneration,
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
    )

    def hub(name: str) -> dict:
        settings = models.load_architecture(name)
        settings.pop("processor")
        return settings

    unet = models._empty(UNet2DConditionModel.from_config, models.load_architecture(SD, "unet"))
    vae = models._empty(AutoencoderKL.from_config, models.load_architecture(SD, "vae"))
    text = CLIPTextConfig(**models.load_architecture(SD, "text_encoder"))
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(models._empty(CLIPTextModel, text)) == 123_060_480
    clip = CLIPConfig(**hub("openai/clip-vit-base-patch32"))
    assert count(models._empty(CLIPModel, clip)) == 151_277_313
    blip = BlipConfig(**hub("Salesforce/blip-image-captioning-base"))
    # 247.4 M in the checkpoint, which stores the tied word embeddings (23.4 M) twice
    assert count(models._empty(BlipForConditionalGeneration, blip)) == 223_971_644
    blip2 = Blip2Config(**hub("Salesforce/blip2-opt-2.7b"))
    assert count(models._empty(Blip2ForConditionalGeneration, blip2)) == 3_744_761_856
    # the backbone ablation's ViTs (features.extractor = "vit"): the Hub checkpoints' counts
    for name, expected in (
        ("facebook/dinov2-base", 86_580_480),
        ("facebook/dino-vitb16", 85_798_656),  # ViTModel without its pooler, as DINO ships
        ("openai/clip-vit-base-patch16", 149_620_737),
        ("facebook/vit-mae-base", 111_907_840),  # ViTMAEForPreTraining, decoder included
    ):
        model = models.build_backbone(name, torch.float32, torch.device("meta"))[0]
        assert count(model) == expected, name
    # the paper's features: 8 heads x 160 channels at the 16x16 layers
    query = unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    assert query.out_features == 1280


def test_unknown_models_are_explained():
    from freesegdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="no architecture for the model 'me/mine'"):
        models.load_architecture("me/mine")


class Tiny(torch.nn.Module):
    _keep_in_fp32_modules: ClassVar[list[str]] = ["kept"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.conv = torch.nn.Conv2d(8, 16, 3)
        self.norm = torch.nn.LayerNorm(16)
        self.kept = torch.nn.Linear(16, 4)
        self.head = torch.nn.Linear(8, 50)
        self.register_buffer("positions", torch.arange(5), persistent=False)

    def tie_weights(self) -> None:  # as transformers ties input and output embeddings
        self.head.weight = self.embed.weight


def test_materialise_fills_real_memory_with_scaled_values():
    model = models._empty(Tiny)
    assert model.conv.weight.device.type == "meta" and model.positions.device.type == "cpu"
    models.materialise(model, torch.bfloat16, torch.device("cpu"), channels_last=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.head.weight is model.embed.weight  # still tied
    assert torch.equal(model.positions, torch.arange(5))  # buffers kept
    assert model.conv.weight.dtype == torch.bfloat16
    assert model.kept.weight.dtype == torch.float32  # as transformers loads it
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.norm.weight, torch.ones(16, dtype=torch.bfloat16))
    assert not model.conv.bias.any() and not model.norm.bias.any()
    fan_in = 8 * 3 * 3
    assert float(model.conv.weight.float().std()) == pytest.approx(fan_in**-0.5, rel=0.15)
    assert float(model.embed.weight.float().std()) == pytest.approx(0.02, rel=0.15)
    assert all(not p.requires_grad for p in model.parameters())


def test_real_size_clip_runs_finite_in_bfloat16():
    model, processor = models.build_clip(
        "openai/clip-vit-base-patch32", torch.bfloat16, torch.device("cpu")
    )
    assert processor.image_processor.crop_size["height"] == 224
    assert float(model.logit_scale) == pytest.approx(2.6592, abs=0.01)
    pixels = torch.randn(2, 3, 224, 224, dtype=torch.bfloat16)
    tokens = processor.tokenizer(["a cat", "sofa"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**tokens)
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    assert image.shape == text.shape == (2, 512)
    assert torch.isfinite(image.float()).all() and torch.isfinite(text.float()).all()
    assert float(image.float().std()) > 0.01  # not collapsed


def test_scripted_captions_depend_on_the_image_not_the_batch(tiny_blip_path, photos):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_path)
    processor = BlipProcessor.from_pretrained(tiny_blip_path)
    captioner = models.ScriptedCaptioner(
        model, processor, config=CaptionConfig(max_new_tokens=4, min_new_tokens=4)
    )
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    together = captioner.caption(images)
    alone = [captioner.caption([image])[0] for image in images]
    assert together == alone
    assert set(together) <= set(models.TYPICAL_CAPTIONS)
    index = models.caption_index(images[0], len(models.TYPICAL_CAPTIONS))
    assert together[0] == models.TYPICAL_CAPTIONS[index]
    assert np.unique([models.caption_index(i, 1000) for i in images]).size == 3
