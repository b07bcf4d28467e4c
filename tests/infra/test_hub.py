"""Model names: Hub ids, local folders, tiny models, and the message when weights are missing."""

from __future__ import annotations

import pytest

from freesegdiff.errors import ModelUnavailableError
from freesegdiff.infra.hub import load_pretrained, resolve_source
from freesegdiff.infra.tiny import TINY_VERSION


def test_folders_hub_ids_and_missing_paths(tmp_path):
    assert resolve_source(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_source("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        resolve_source(str(tmp_path / "missing" / "model"))


def test_offline_hub_id_says_which_model_and_how_to_get_it(monkeypatch, tmp_path):
    from transformers import CLIPModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelUnavailableError) as caught:
        load_pretrained(
            CLIPModel.from_pretrained,
            "openai/clip-vit-base-patch32",
            what="CLIP",
            flag="--clip-model",
            cache_dir=str(tmp_path),
        )
    message = str(caught.value)
    assert "could not load the CLIP model 'openai/clip-vit-base-patch32'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download openai/clip-vit-base-patch32" in message
    assert "--clip-model" in message and "--preset tiny" in message


def test_tiny_names_build_a_local_folder_once(monkeypatch, tmp_path):
    monkeypatch.setenv("FREESEGDIFF_CACHE", str(tmp_path))
    folder = resolve_source("tiny:clip")
    assert (tmp_path / "tiny" / f"clip-v{TINY_VERSION}" / "config.json").is_file()
    assert resolve_source("tiny:clip") == folder
    with pytest.raises(ModelUnavailableError, match="unknown tiny model 'tiny:huge'"):
        resolve_source("tiny:huge")


def test_missing_models_are_found_together_without_loading(tmp_path, monkeypatch):
    from freesegdiff.config import ModelConfig
    from freesegdiff.errors import ModelUnavailableError
    from freesegdiff.infra.hub import check_models_available, missing_models

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    models = ModelConfig(
        diffusion=str(empty), clip=str(clip), captioner="Salesforce/blip-x", offline=True
    )
    found = missing_models(models)
    assert [(what, why) for what, _, _, why in found] == [
        ("Stable Diffusion", "the folder has no model_index.json"),
        ("captioner", "not in the HF cache and the Hub is switched off"),
    ]
    with pytest.raises(ModelUnavailableError, match="2 models cannot be loaded") as caught:
        check_models_available(models)
    assert "`hf download Salesforce/blip-x`" in str(caught.value)
    check_models_available(ModelConfig(diffusion="tiny:sd", clip=str(clip), captioner=None))
