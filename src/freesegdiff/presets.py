"""Presets are data: ``presets/<name>.json`` files of settings merged over the defaults.

A preset file holds ``description``, ``settings`` (a partial :class:`PipelineConfig`) and,
optionally, ``datasets``: per benchmark (a key of
:data:`freesegdiff.evaluation.datasets.DATASETS`), settings merged over ``settings`` when that
benchmark is evaluated, for a method whose released configs differ per dataset (``naclip``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from freesegdiff.config import PipelineConfig, merge_config
from freesegdiff.errors import ConfigError


def available_presets() -> dict[str, str]:
    """Return ``{preset name: one-line description}`` for every shipped preset."""
    folder = resources.files("freesegdiff") / "presets"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            found[entry.name[: -len(".json")]] = json.loads(entry.read_text())["description"]
    return found


def _preset_file(name: str) -> dict[str, Any]:
    names = available_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    text = (resources.files("freesegdiff") / "presets" / f"{name}.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def preset_settings(name: str) -> dict[str, Any]:
    """Return the raw nested settings of preset ``name`` (a partial :class:`PipelineConfig`)."""
    settings: dict[str, Any] = _preset_file(name)["settings"]
    return settings


def load_preset(name: str, dataset: str | None = None) -> PipelineConfig:
    """Return the :class:`PipelineConfig` of preset ``name`` (defaults merged with its file);
    with ``dataset``, the preset's settings for that benchmark merged over it."""
    data = _preset_file(name)
    config = PipelineConfig.from_dict(data["settings"])
    extra = data.get("datasets", {}).get(dataset, {}) if dataset is not None else {}
    return merge_config(config, extra, "") if extra else config
