"""Diffusion features on a tiny random SD loaded from its diffusers folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freesegdiff.config import PAPER_LAYERS, FeatureConfig
from freesegdiff.errors import ConfigError, ModelUnavailableError
from freesegdiff.stages.features import images_to_tensor
from freesegdiff.stages.features.diffusion import DiffusionFeatures
from freesegdiff.stages.features.unet import (
    QUERY_SUFFIX,
    list_attention_layers,
    list_unet_layers,
    select_layers,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def extractor(tiny_sd_path) -> DiffusionFeatures:
    return DiffusionFeatures.from_pretrained(
        str(tiny_sd_path), config=FeatureConfig(image_size=256), device=CPU
    )


def test_layers_follow_sd_naming_and_sizes(extractor):
    layers = {layer.name: layer for layer in list_attention_layers(extractor.unet)}
    # SD 1.x: cross attention in down blocks 0-2 (2 each), mid, up blocks 1-3 (3 each).
    assert len(layers) == 2 * 3 + 1 + 3 * 3
    assert layers["down_blocks.0.attentions.0"].downsample == 1
    assert layers["down_blocks.2.attentions.1"].downsample == 4
    assert layers["mid_block.attentions.0"].downsample == 8
    assert layers["up_blocks.1.attentions.2"].downsample == 4
    assert layers["up_blocks.3.attentions.0"].downsample == 1
    orders = [layer.order for layer in list_attention_layers(extractor.unet)]
    assert orders == sorted(orders)


def test_paper_layers_are_the_16px_layers_at_512(extractor):
    # At 512 input with a factor-8 VAE the latent is 64, so the downsample-4 layers are 16x16:
    # exactly the paper's five layers.
    by_size = select_layers(extractor.unet, resolutions=(16,), image_size=512, vae_scale=8)
    assert [layer.name for layer in by_size] == list(PAPER_LAYERS)
    by_name = select_layers(extractor.unet, layers=PAPER_LAYERS)
    assert by_size == by_name
    assert extractor.channels == 5 * 32  # tiny: 32 query channels per 16x16-level layer


def test_unknown_layer_and_size_are_explained(extractor):
    with pytest.raises(ConfigError, match=r"down_blocks\.9.*this UNet has: down_blocks\.0"):
        select_layers(extractor.unet, layers=("down_blocks.9.attentions.0",))
    with pytest.raises(ConfigError, match=r"sizes are \[8, 16, 32, 64\]"):
        select_layers(extractor.unet, resolutions=(3,), image_size=512, vae_scale=8)


def test_resnet_layers_follow_sd_naming_sizes_and_order(extractor):
    resnets = list_unet_layers(extractor.unet, "resnet")
    names = [layer.name for layer in resnets]
    # SD 1.x: 2 resnets in each down block, 2 in the mid block, 3 in each up block
    assert len(names) == 4 * 2 + 2 + 4 * 3
    assert names[:3] == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.resnets.1",
        "down_blocks.1.resnets.0",
    ]
    by_name = {layer.name: layer for layer in resnets}
    assert by_name["down_blocks.2.resnets.0"].downsample == 4
    assert by_name["mid_block.resnets.1"].downsample == 8
    assert by_name["up_blocks.1.resnets.2"].downsample == 4
    # tiny block_out_channels (8, 16, 32, 32): down block 1's resnets give 16, up block 3's 8
    assert by_name["down_blocks.1.resnets.0"].channels == 16
    assert by_name["up_blocks.3.resnets.2"].channels == 8
    # execution order interleaves them with the attention layers: resnets.i, attentions.i
    both = sorted(resnets + list_attention_layers(extractor.unet), key=lambda layer: layer.order)
    assert [layer.name for layer in both[:4]] == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0",
        "down_blocks.0.resnets.1",
        "down_blocks.0.attentions.1",
    ]
    mid = [layer.name for layer in both if layer.name.startswith("mid_block")]
    assert mid == ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    # the paper's 16x16 level at 512 input: down block 2's two resnets, up block 1's three
    at_16 = select_layers(extractor.unet, resolutions=(16,), kind="resnet")
    assert [layer.name for layer in at_16] == [
        "down_blocks.2.resnets.0",
        "down_blocks.2.resnets.1",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
        "up_blocks.1.resnets.2",
    ]
    with pytest.raises(ConfigError, match=r"resnet blocks.*features\.resolutions"):
        select_layers(extractor.unet, layers=PAPER_LAYERS, kind="resnet")


def _module_outputs(extractor, names, image, take_input=False):
    """What the modules ``names`` of the UNet give (or, ``take_input``, are given) in one call
    of ``extractor``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = extractor.unet.get_submodule(name)
        if take_input:  # before the module runs: the pass may stop inside it
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs, name=name: seen.__setitem__(
                        name, kwargs.get("hidden_states", args[0] if args else None)
                    ),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda _m, _args, output, name=name: seen.__setitem__(name, output)
                )
            )
    try:
        extractor([image], seed=0)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[name] for name in names]


def test_hidden_and_resnet_features_are_the_layers_own_tensors(extractor, tiny_sd_path, photos):
    """features.kind "hidden" (attn2's input) and "resnet" (resnet outputs), recomputed from
    hooks the test puts on the modules during the paper features' own UNet pass."""
    image = photos["astronaut"]
    inputs = _module_outputs(
        extractor, [f"{name}.transformer_blocks.0.attn2" for name in PAPER_LAYERS], image, True
    )
    resnet_names = [f"down_blocks.2.resnets.{i}" for i in range(2)]
    resnet_names += [f"up_blocks.1.resnets.{i}" for i in range(3)]
    outputs = _module_outputs(extractor, resnet_names, image)
    for kind, taken in (("hidden", inputs), ("resnet", outputs)):
        config = FeatureConfig(image_size=256, kind=kind, resolutions=(8,))
        other = DiffusionFeatures.from_pretrained(str(tiny_sd_path), config=config, device=CPU)
        ours = other([image], seed=0)
        expected = []
        for tensor in taken:
            grid = tensor if tensor.ndim == 4 else tensor.transpose(1, 2).reshape(1, -1, 8, 8)
            expected.append(
                F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
            )
        assert ours.shape == (1, other.channels, 32, 32) and other.channels == 5 * 32
        torch.testing.assert_close(ours, torch.cat(expected, 1))
        # the pass stops after the last of them and gives what the whole pass gives
        torch.testing.assert_close(other([image], seed=0, stop_early=False), ours)


def test_images_to_tensor_scales_to_minus_one_one():
    white = np.full((10, 20, 3), 255, np.uint8)
    black = np.zeros((40, 30, 3), np.uint8)
    batch = images_to_tensor([white, black], 16, CPU)
    assert batch.shape == (2, 3, 16, 16)
    assert torch.allclose(batch[0], torch.ones(3, 16, 16))
    assert torch.allclose(batch[1], -torch.ones(3, 16, 16))


def test_pil_resize_is_the_released_vae_input(photos):
    """Point 5: PIL's bilinear resize of the uint8 image to 512 x 512 (uint8 result), then
    x / 255 * 2 - 1, as ``T.ToTensor()(T.Resize((512, 512))(pil)).mul(2).sub(1)``."""
    from PIL import Image

    image = photos["chelsea"]  # 300 x 451: up-sampled rows, down-sampled columns
    resized = np.asarray(Image.fromarray(image).resize((512, 512), Image.BILINEAR))
    expected = torch.from_numpy(resized).permute(2, 0, 1).float().div(255).mul(2).sub(1)
    ours = images_to_tensor([image], 512, CPU, resize="pil")[0]
    assert torch.equal(ours, expected)
    smooth = images_to_tensor([image], 512, CPU, resize="torch")[0]
    assert 0 < float((smooth - expected).abs().max()) < 0.05  # rounding and filter differ
    with pytest.raises(ConfigError, match=r"features\.resize must be one of 'pil', 'torch'"):
        FeatureConfig(resize="nearest")  # type: ignore[arg-type]  # checked once, there


def test_early_stop_gives_the_full_pass_features(extractor, photos):
    images = [photos["chelsea"], photos["coffee"]]
    early = extractor(images, seed=3, stop_early=True)
    full = extractor(images, seed=3, stop_early=False)
    assert early.shape == (2, extractor.channels, 32, 32)
    assert torch.equal(early, full)


def test_early_stop_skips_the_later_blocks(extractor, photos):
    calls = {"up_blocks.2": 0, "up_blocks.1": 0}
    handles = [
        extractor.unet.get_submodule(name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
        for name in calls
    ]
    try:
        extractor([photos["chelsea"]], stop_early=True)
        assert calls == {"up_blocks.2": 0, "up_blocks.1": 0}  # stopped inside up block 1
        extractor([photos["chelsea"]], stop_early=False)
        assert calls == {"up_blocks.2": 1, "up_blocks.1": 1}
    finally:
        for handle in handles:
            handle.remove()


def test_features_are_query_projections_of_attn2_inputs(extractor, photos):
    """Recompute the features independently from the attn2 inputs and compare."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in PAPER_LAYERS:
        attn2 = extractor.unet.get_submodule(f"{name}.transformer_blocks.0.attn2")
        handles.append(
            attn2.register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: inputs.__setitem__(
                    name, kwargs.get("hidden_states", args[0] if args else None)
                ),
                with_kwargs=True,
            )
        )
    try:
        features = extractor([photos["astronaut"]], seed=0)
    finally:
        for handle in handles:
            handle.remove()
    expected = []
    for name in PAPER_LAYERS:
        to_q = extractor.unet.get_submodule(f"{name}.{QUERY_SUFFIX}")
        query = to_q(inputs[name])  # (1, 64, 32): an 8x8 map at 256 input
        grid = query.transpose(1, 2).reshape(1, -1, 8, 8)
        expected.append(F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False))
    assert torch.allclose(features, torch.cat(expected, 1), atol=1e-6)


def test_add_noise_is_the_forward_diffusion_formula(tiny_sd_path):
    config = FeatureConfig(image_size=256, timestep=300)
    extractor = DiffusionFeatures.from_pretrained(str(tiny_sd_path), config=config, device=CPU)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(7)]
    noisy = extractor.add_noise(latents, generators)
    noise = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(7))[None]
    alpha_bar = extractor.scheduler.alphas_cumprod[300]
    expected = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    assert torch.allclose(noisy, expected, atol=1e-6)
    # SD 1.x scaled_linear schedule, by hand: beta_t = (sqrt(0.00085) + t/999 * (sqrt(0.012)
    # - sqrt(0.00085)))^2, alpha_bar_0 = 1 - beta_0 = 0.99915.
    assert float(extractor.scheduler.alphas_cumprod[0]) == pytest.approx(0.99915, abs=1e-6)


def test_seed_reproduces_and_batches_match_single_images(extractor, photos):
    pair = [photos["chelsea"], photos["rocket"]]
    first = extractor(pair, seed=11)
    again = extractor(pair, seed=11)
    other = extractor(pair, seed=12)
    alone = extractor([photos["rocket"]], seed=11)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # Each image draws its own noise, so its features do not depend on the batch.
    assert torch.allclose(first[1:], alone, atol=1e-4)


def test_empty_prompt_embedding_is_computed_once(extractor):
    first = extractor.empty_prompt_embedding()
    assert first.shape == (1, 77, 16)
    assert extractor.empty_prompt_embedding() is first


def test_bad_settings_and_missing_weights_are_explained(tiny_sd_path, tmp_path):
    with pytest.raises(ConfigError, match="timestep must be in"):
        DiffusionFeatures.from_pretrained(
            str(tiny_sd_path), config=FeatureConfig(image_size=256, timestep=1000), device=CPU
        )
    with pytest.raises(ConfigError, match="multiple of 64"):
        DiffusionFeatures.from_pretrained(
            str(tiny_sd_path), config=FeatureConfig(image_size=200), device=CPU
        )
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        DiffusionFeatures.from_pretrained(
            str(tmp_path / "nowhere"), config=FeatureConfig(), device=CPU
        )


def test_release_unused_frees_the_tail_and_keeps_the_features(tiny_sd_path, photos):
    kept = DiffusionFeatures.from_pretrained(
        str(tiny_sd_path), config=FeatureConfig(image_size=256), device=CPU
    )
    freed = DiffusionFeatures.from_pretrained(
        str(tiny_sd_path), config=FeatureConfig(image_size=256), device=CPU
    )
    released = freed.release_unused()
    # never run: the VAE decoder, and the UNet after the last paper layer's query projection
    assert set(released["vae"]) == {"decoder", "post_quant_conv"}
    last = "up_blocks.1.attentions.2"
    assert {
        f"{last}.transformer_blocks.0.attn2.to_k",
        f"{last}.transformer_blocks.0.ff",
        f"{last}.proj_out",
        "up_blocks.1.upsamplers",
        "up_blocks.2",
        "up_blocks.3",
        "conv_out",
    } <= set(released["unet"])
    assert not any(name.startswith(("down_blocks", "mid_block")) for name in released["unet"])
    assert all(p.device.type == "meta" for p in freed.vae.decoder.parameters())
    assert all(p.device.type == "meta" for p in freed.unet.up_blocks[2].parameters())
    images = [photos["chelsea"], photos["coffee"]]
    assert torch.equal(freed(images, seed=5), kept(images, seed=5))
    with pytest.raises(RuntimeError, match="full pass cannot run"):
        freed(images, stop_early=False)
    with pytest.raises(RuntimeError, match=r"freed by DiffusionFeatures\.release_unused"):
        freed.unet.up_blocks[2](torch.zeros(1, 32, 8, 8), (torch.zeros(1, 32, 8, 8),) * 3)


def test_the_pipeline_releases_what_it_never_runs(tiny_sd_path, tiny_clip_path):
    from freesegdiff.config import PipelineConfig
    from freesegdiff.pipeline import FreeSegDiff

    config = PipelineConfig.from_dict(
        {
            "models": {
                "diffusion": str(tiny_sd_path),
                "clip": str(tiny_clip_path),
                "captioner": None,
            },
            "features": {"image_size": 256},
        }
    )
    pipe = FreeSegDiff.from_config(config)
    assert "decoder" in pipe.features.released["vae"]
    assert "up_blocks.3" in pipe.features.released["unet"]


def test_several_timesteps_average_or_stack_the_single_timestep_features(tiny_sd_path, photos):
    """``features.timesteps``: each timestep's features are those of a run at that timestep
    alone (the same latent sample and noise draw per image), then averaged or concatenated."""

    def build(**settings):
        config = FeatureConfig(image_size=256, **settings)
        return DiffusionFeatures.from_pretrained(str(tiny_sd_path), config=config, device=CPU)

    images = [photos["chelsea"], photos["coffee"]]
    singles = [build(timestep=t)(images, seed=3) for t in (0, 300)]
    assert not torch.equal(singles[0], singles[1])  # the timestep matters
    mean = build(timesteps=(0, 300))(images, seed=3)
    assert torch.equal(mean, torch.stack(singles).mean(0))
    stacked_extractor = build(timesteps=(0, 300), timestep_combine="concat")
    stacked = stacked_extractor(images, seed=3)
    assert torch.equal(stacked, torch.cat(singles, dim=1))
    assert stacked.shape[1] == stacked_extractor.channels == 2 * singles[0].shape[1]
    with pytest.raises(ConfigError, match=r"features\.timesteps"):
        build(timesteps=(0, 5000))


@pytest.mark.parametrize("kind", ["hidden", "resnet"])
def test_the_pipeline_segments_with_hidden_state_and_resnet_features(kind, photos):
    from freesegdiff import FreeSegDiff

    overrides = {"features.kind": kind, "features.resolutions": [8]}
    pipe = FreeSegDiff.from_preset("tiny", overrides=overrides)
    assert [layer.name for layer in pipe.features.layers][-1] == (
        "up_blocks.1.attentions.2" if kind == "hidden" else "up_blocks.1.resnets.2"
    )
    result = pipe(photos["coffee"])
    assert result.label_map.shape == photos["coffee"].shape[:2]
    assert np.unique(result.cluster_map).size == 4  # the tiny preset's K


def test_layers_of_the_wrong_family_are_refused_before_loading():
    """The settings check themselves when made (config.FeatureConfig), before any model."""
    with pytest.raises(ConfigError, match=r"'resnet' reads resnet blocks.*features\.resolutions"):
        FeatureConfig(kind="resnet")  # the paper's attention layers
    with pytest.raises(ConfigError, match=r"'hidden' reads attention layers"):
        FeatureConfig(kind="hidden", layers=("up_blocks.1.resnets.0",))
    FeatureConfig(kind="resnet", resolutions=(16,))
    FeatureConfig(kind="resnet", layers=("up_blocks.1.resnets.0",))
