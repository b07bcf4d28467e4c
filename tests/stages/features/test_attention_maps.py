"""The released cross-attention-map features (features.kind), against a computation done here
head by head on a tiny UNet and real photos."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from freesegdiff.config import FeatureConfig
from freesegdiff.errors import ConfigError
from freesegdiff.stages.features.diffusion import DiffusionFeatures

CPU = torch.device("cpu")
CLASSES = ("cat", "sofa", "potted plant")


def build(path, **settings) -> DiffusionFeatures:
    config = FeatureConfig(image_size=256, attention_classes=CLASSES, **settings)
    return DiffusionFeatures.from_pretrained(str(path), config=config, device=CPU)


def test_pooled_prompt_embeddings_are_pooled_as_the_released_runner(tiny_sd_path):
    from freesegdiff.stages.features.attention_maps import pooled_prompt_embeddings

    features = build(tiny_sd_path, kind="attention")
    tokenizer, encoder = features.tokenizer, features.text_encoder
    ours = pooled_prompt_embeddings(tokenizer, encoder, CLASSES, CPU)

    def encode(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            return encoder(ids.input_ids)[0][0].float()  # (77, D)

    cat = encode("A photo of cat")[1 : len(tokenizer("cat")["input_ids"])].mean(0)
    plant_states = (encode("A photo of potted") + encode("A photo of plant")) / 2
    plant = plant_states[1 : len(tokenizer("potted plant")["input_ids"])].mean(0)
    torch.testing.assert_close(ours[0], cat)
    torch.testing.assert_close(ours[2], plant)


def test_attention_features_are_scaled_query_key_products_per_head(tiny_sd_path, photos):
    """Channel ``h * L + l`` of a layer: head h's queries times class l's key, / sqrt(d)."""
    features = build(tiny_sd_path, kind="attention")
    images = [photos["chelsea"], photos["coffee"]]
    ours = features(images, seed=1)
    queries_only = build(tiny_sd_path)
    from freesegdiff.infra.devices import image_generators
    from freesegdiff.stages.features import images_to_tensor

    generators = image_generators(1, 2, CPU)
    latents = queries_only.encode(images_to_tensor(images, 256, CPU), generators)
    queries = queries_only.unet_queries(queries_only.add_noise(latents, generators))
    keys = features.class_keys()
    offset = 0
    for layer in features.layers:
        attention = features.unet.get_submodule(f"{layer.name}.transformer_blocks.0.attn2")
        query, key = queries[layer.name].float(), keys[layer.name].float()
        heads = attention.heads
        head_dim = query.shape[-1] // heads
        side = math.isqrt(query.shape[1])
        for head in range(heads):
            span = slice(head * head_dim, (head + 1) * head_dim)
            for label in range(len(CLASSES)):
                score = query[:, :, span] @ key[label, span] / math.sqrt(head_dim)  # (B, T)
                grid = score.reshape(2, 1, side, side)
                grid = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
                channel = offset + head * len(CLASSES) + label
                torch.testing.assert_close(ours[:, channel], grid[:, 0], rtol=1e-4, atol=1e-5)
        offset += heads * len(CLASSES)
    assert ours.shape[1] == offset == features.channels


def test_queries_and_attention_concatenate_attention_first(tiny_sd_path, photos):
    both = build(tiny_sd_path, kind="queries+attention")
    attention = build(tiny_sd_path, kind="attention")([photos["astronaut"]], seed=0)
    queries = build(tiny_sd_path)([photos["astronaut"]], seed=0)
    combined = both([photos["astronaut"]], seed=0)
    assert torch.equal(combined, torch.cat([attention, queries], dim=1))
    assert combined.shape[1] == both.channels
    with pytest.raises(ConfigError, match=r"features\.kind"):
        build(tiny_sd_path, kind="keys")


def test_attention_features_run_through_the_pipeline(photos):
    """End to end on the tiny preset, text encoder freed first (the keys are kept)."""
    from freesegdiff import FreeSegDiff

    pipe = FreeSegDiff.from_preset("tiny", overrides={"features.kind": "attention"})
    pipe.release_text_encoder()
    result = pipe(photos["chelsea"])
    assert result.label_map.shape == photos["chelsea"].shape[:2]
    assert pipe.features.channels == sum(
        pipe.features.unet.get_submodule(f"{layer.name}.transformer_blocks.0.attn2").heads * 19
        for layer in pipe.features.layers
    )
