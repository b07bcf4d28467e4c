"""Config dataclasses, presets as data, and the published defaults."""

from __future__ import annotations

import pytest

from freesegdiff.config import PAPER_LAYERS, PipelineConfig, set_by_path
from freesegdiff.errors import ConfigError
from freesegdiff.presets import available_presets, load_preset


def test_paper_preset_is_the_published_setup():
    config = load_preset("paper")
    assert config.models.diffusion == "CompVis/stable-diffusion-v1-4"
    assert config.models.captioner == "Salesforce/blip-image-captioning-base"
    assert config.models.clip == "openai/clip-vit-base-patch32"
    assert config.features.image_size == 512 and config.features.timestep == 0
    assert config.features.layers == PAPER_LAYERS and config.features.feature_size == 32
    assert config.clustering.k == 4 and config.clustering.method == "kmeans"
    refine = config.refine
    assert (refine.gt_prob, refine.gaussian_sxy, refine.gaussian_compat) == (0.9, 20, 5)
    assert (refine.bilateral_sxy, refine.bilateral_srgb, refine.bilateral_compat) == (20, 20, 100)
    assert refine.iterations == 10
    assert config.vocabulary.class_template == "A photo of {}"


def test_presets_are_listed_and_differ_only_where_they_say():
    assert {"paper", "paper-blip2", "tiny"} <= set(available_presets())
    blip2 = load_preset("paper-blip2")
    assert blip2.models.captioner == "Salesforce/blip2-opt-2.7b"
    assert blip2.features == load_preset("paper").features
    tiny = load_preset("tiny")
    assert tiny.models.diffusion.startswith("tiny:") and tiny.features.image_size == 256


def test_overrides_by_dotted_path_and_dict_round_trip():
    config = set_by_path(PipelineConfig(), "clustering.k", 6)
    config = set_by_path(config, "features.layers", ["up_blocks.1.attentions.0"])
    assert config.clustering.k == 6
    assert config.features.layers == ("up_blocks.1.attentions.0",)
    assert PipelineConfig.from_dict(config.to_dict()) == config


def test_unknown_settings_and_presets_are_named():
    with pytest.raises(ConfigError, match=r"unknown setting 'clustering\.kk'.*k, k_range"):
        set_by_path(PipelineConfig(), "clustering.kk", 3)
    with pytest.raises(ConfigError, match="unknown preset 'fast'; choose one of"):
        load_preset("fast")
    with pytest.raises(ConfigError, match="must be true or false"):
        set_by_path(PipelineConfig(), "models.offline", "yes")
