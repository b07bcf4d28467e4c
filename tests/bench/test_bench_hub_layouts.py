"""The bench's Hub-layout folders: the published file set, loaded by segment's own calls.

The real architectures take 4.8 GB and half a minute to write, so here the shipped configs are
shrunk (every width and depth small, the structure kept) before the same writers run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from freesegdiff.bench import hub_layouts, models

SD, CLIP, BLIP = (
    "CompVis/stable-diffusion-v1-4",
    "openai/clip-vit-base-patch32",
    "Salesforce/blip-image-captioning-base",
)
SMALL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 16,
    "encoder_hidden_size": 16,
}


def _shrink(settings: dict[str, Any]) -> dict[str, Any]:
    for key, value in settings.items():
        if isinstance(value, dict):
            _shrink(value)
        elif key in SMALL:
            settings[key] = SMALL[key]
    return settings


@pytest.fixture
def small_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.load_architecture

    def small(name: str, part: str | None = None) -> dict[str, Any]:
        settings = _shrink(real(name, part))
        if part == "unet":
            settings.update(
                block_out_channels=[8, 16, 32, 32],
                attention_head_dim=2,
                cross_attention_dim=16,
                norm_num_groups=4,
            )
        if part == "vae":
            settings.update(block_out_channels=[8, 8, 16, 16], norm_num_groups=4)
        if name == BLIP and part is None:
            settings["image_text_hidden_size"] = 16
        return settings

    monkeypatch.setattr(models, "load_architecture", small)
    monkeypatch.setattr(hub_layouts, "load_architecture", small)


def _dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file holds, read from its header."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def test_layouts_hold_the_hub_files_and_load_through_segments_calls(
    small_architectures: None, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    from freesegdiff.bench.runner import bench_source
    from freesegdiff.config import set_by_path
    from freesegdiff.pipeline import FreeSegDiff
    from freesegdiff.presets import load_preset

    folders = hub_layouts.ensure_layouts([SD, CLIP, BLIP], tmp_path)
    sd = folders[SD]
    assert json.loads((sd / "model_index.json").read_text())["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        assert _dtypes(sd / part / f"{stem}.safetensors") == {"F32"}
        assert _dtypes(sd / part / f"{stem}.fp16.safetensors") == {"F16"}
    assert _dtypes(sd / "text_encoder" / "model.safetensors") == {"F32"}
    assert _dtypes(sd / "text_encoder" / "model.fp16.safetensors") == {"F16"}
    assert json.loads((sd / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    for name in (CLIP, BLIP):
        assert _dtypes(folders[name] / "model.safetensors") == {"F32"}
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind
    # written once: a second call finds the folders
    assert hub_layouts.ensure_layouts([SD], tmp_path)[SD] == sd

    config = load_preset("paper")
    for key, name in (("diffusion", SD), ("clip", CLIP), ("captioner", BLIP)):
        config = set_by_path(config, f"models.{key}", str(folders[name]))
    config = set_by_path(config, "dtype", "bfloat16")
    config = set_by_path(config, "features.image_size", 128)
    pipe = FreeSegDiff.from_config(config, source=bench_source())
    assert pipe.features.unet.dtype == torch.bfloat16
    assert pipe.classifier.model.dtype == torch.bfloat16
    result = pipe(photos["chelsea"])
    assert result.caption in models.TYPICAL_CAPTIONS  # the scripted captioner's sentence
    assert result.label_map.shape == photos["chelsea"].shape[:2]

    fp16 = set_by_path(config, "models.variant", "fp16")
    from_fp16 = FreeSegDiff.from_config(fp16, source=bench_source())
    unet = from_fp16.features.unet.state_dict()
    full = pipe.features.unet.state_dict()
    name = next(key for key, value in unet.items() if value.numel() > 100)
    assert unet[name].dtype == torch.bfloat16
    # float16 rounding first, then bfloat16: close to, not always equal to, the direct cast
    assert torch.allclose(unet[name].float(), full[name].float(), rtol=1e-2, atol=1e-3)


def test_a_vit_backbone_gets_its_layout_folder_and_stable_diffusion_is_kept():
    """``bench --set features.extractor='"vit"'`` measures the backbone at real size: it is
    one of the models written in the Hub layout (SD stays: its text encoder prunes classes)."""
    from freesegdiff.bench.runner import _hub_names, _is_tiny
    from freesegdiff.config import with_settings
    from freesegdiff.presets import load_preset

    vit = {"features.extractor": "vit", "models.backbone": "facebook/dinov2-base"}
    config = with_settings(load_preset("paper"), vit)
    assert _hub_names(config)["backbone"] == "facebook/dinov2-base"
    assert "diffusion" in _hub_names(config)
    assert "backbone" not in _hub_names(load_preset("paper"))
    assert not _is_tiny(with_settings(load_preset("tiny"), vit))
    for name in (
        "facebook/dinov2-base",
        "facebook/dino-vitb16",
        "openai/clip-vit-base-patch16",
        "facebook/vit-mae-base",
    ):
        assert hub_layouts.layout_folder(name, Path("/x")).name.endswith(
            f"-seed0-v{hub_layouts.LAYOUT_VERSION}"
        )
