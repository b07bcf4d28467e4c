"""A tiny random CLIP (text and vision towers) with its processor, in the transformers layout."""

from __future__ import annotations

from pathlib import Path

import torch

from freesegdiff.infra.tiny.vocab import write_clip_tokenizer

# The vision tower's geometry: 32x32 inputs in 8-pixel patches, 16 wide, 2 blocks.
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def build_clip(folder: Path, seed: int = 0, vision: dict[str, int] | None = None) -> None:
    """Save a tiny random ``CLIPModel`` and ``CLIPProcessor`` under ``folder``.

    ``vision``: settings of the vision tower over :data:`VISION` (e.g. ViT-B/16's 224-pixel
    inputs in 16-pixel patches); the processor resizes and crops to its ``image_size``.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    geometry = {**VISION, **(vision or {})}
    vocab_size = write_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=geometry,
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    side = geometry["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
