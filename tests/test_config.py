"""Config dataclasses, presets as data, and the published defaults."""

from __future__ import annotations

import json
import re

import pytest

import freesegdiff.config as config_module
from freesegdiff.config import PAPER_LAYERS, PipelineConfig, set_by_path, with_settings
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


SECTIONS = {
    "caption": config_module.CaptionConfig,
    "entities": config_module.EntityConfig,
    "features": config_module.FeatureConfig,
    "clustering": config_module.ClusterConfig,
    "vocabulary": config_module.VocabularyConfig,
    "classify": config_module.ClassifyConfig,
    "refine": config_module.RefineConfig,
    "limits": config_module.LimitsConfig,
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_choice_is_checked_when_a_section_is_made(section):
    """Built directly (the Python API) or merged (presets, --set, grids): a value outside a
    setting's choices is refused in the section itself, with the setting and its choices named.
    No stage checks it again."""
    kind = SECTIONS[section]
    literals = config_module._literal_fields(kind)
    assert literals or section in ("caption", "limits", "features"), section
    for name in literals:
        with pytest.raises(ConfigError, match=rf"^{section}\.{name} must be one of .*, got 'x'$"):
            kind(**{name: "x"})
        with pytest.raises(ConfigError, match=rf"{section}\.{name} must be one of"):
            PipelineConfig.from_dict({section: {name: "x"}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"caption.num_beams": 0}, "caption.num_beams must be >= 1"),
        ({"caption.min_length": 40}, "caption.min_length must be between 0 and caption.max_length"),
        ({"features.image_size": 0}, "features.image_size must be at least 1"),
        ({"features.timesteps": []}, "features.timesteps must be a non-empty list"),
        ({"clustering.k_range": [5, 2]}, "clustering.k_range must be 1 <= lo <= hi"),
        ({"clustering.tol": float("inf")}, "clustering.tol must be 0 or more"),
        ({"classify.label_template": "a photo"}, "must contain '{}'"),
        ({"vocabulary.class_template": "x"}, "vocabulary.class_template 'x' must contain"),
        ({"refine.pamr_dilations": [0]}, "refine.pamr_dilations must be positive integers"),
        ({"limits.working_size": 0}, "limits.working_size must be at least 1 or null"),
        ({"dtype": "float8"}, "dtype must be one of float32, bfloat16, float16, auto"),
        ({"seed": -1}, "seed must be in 0..4294967295"),
        ({"clustering.k": 1025}, "an image has 1024 feature vectors"),
        ({"features.extractor": "vit"}, "features.extractor 'vit' takes its features from"),
    ],
)
def test_ranges_and_relations_are_checked_once_when_made(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        with_settings(PipelineConfig(), settings)


def test_settings_merged_together_are_checked_together():
    """One merge for many settings: a pair valid together is not refused half-way."""
    config = with_settings(PipelineConfig(), {"caption.min_length": 40, "caption.max_length": 50})
    assert (config.caption.min_length, config.caption.max_length) == (40, 50)
    config = with_settings(PipelineConfig(), {"clustering.k": 2000, "features.feature_size": 64})
    assert config.clustering.k == 2000
    vit = {"features.extractor": "vit", "models.backbone": "facebook/dinov2-base"}
    assert with_settings(PipelineConfig(), vit).features.extractor == "vit"


def test_implementation_names_are_checked_by_their_kinds_registry():
    from freesegdiff.pipeline import check_settings

    for setting, kind in [
        ("features.extractor", "stable-diffusion"),
        ("clustering.method", "kmeans"),
        ("refine.method", "crf"),
    ]:
        config = with_settings(PipelineConfig(), {setting: "x"})  # a name, not a choice here
        with pytest.raises(ConfigError, match=rf"{re.escape(setting)} must be one of '{kind}'"):
            check_settings(config)


def test_crf_params_is_refine_config_now():
    with pytest.warns(DeprecationWarning, match="CRFParams is RefineConfig now"):
        from freesegdiff.config import CRFParams
    assert CRFParams is config_module.RefineConfig


def test_a_tuple_read_back_from_json_as_a_list_is_no_difference():
    from freesegdiff.config import settings_differences

    now = PipelineConfig().to_dict()
    then = json.loads(json.dumps(now))  # tuples come back as lists
    assert settings_differences(then, now) == []
    then["features"]["layers"] = then["features"]["layers"][:2]
    assert settings_differences(then, now)[0].startswith("features.layers: ['down_blocks.2")
