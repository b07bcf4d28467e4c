"""Presets are data: ``presets/<name>.json`` files of settings merged over the defaults."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from freesegdiff.config import PipelineConfig
from freesegdiff.errors import ConfigError


def available_presets() -> dict[str, str]:
    """Return ``{preset name: one-line description}`` for every shipped preset."""
    folder = resources.files("freesegdiff") / "presets"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            found[entry.name[: -len(".json")]] = json.loads(entry.read_text())["description"]
    return found


def preset_settings(name: str) -> dict[str, Any]:
    """Return the raw nested settings of preset ``name`` (a partial :class:`PipelineConfig`)."""
    names = available_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    text = (resources.files("freesegdiff") / "presets" / f"{name}.json").read_text()
    settings: dict[str, Any] = json.loads(text)["settings"]
    return settings


def load_preset(name: str) -> PipelineConfig:
    """Return the :class:`PipelineConfig` of preset ``name`` (defaults merged with its file)."""
    return PipelineConfig.from_dict(preset_settings(name))
