"""Model names: Hub ids, local folders, tiny models, and the message when weights are missing."""

from __future__ import annotations

import pytest

from freesegdiff.errors import ModelUnavailableError
from freesegdiff.hub import load_pretrained, resolve_source
from freesegdiff.tiny import TINY_VERSION


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
