"""One registry per stage kind: the implementations a setting can name.

A registry maps each name a setting may take (``features.extractor = "vit"``) to where its
implementation lives (``"freesegdiff.stages.features.vit:PatchFeatures"``), imported only when
it is used. So an implementation is one file plus one entry in its kind's registry; the setting
is checked against the registry's names before any model loads
(:func:`freesegdiff.pipeline.check_settings`), and nowhere else.

The registries: ``features.EXTRACTORS`` (``features.extractor``), ``clustering.METHODS``
(``clustering.method``), ``naming.NAMERS`` (``classify.namer``), ``refine.REFINERS``
(``refine.method``) and the captioner's checkpoint kinds (``captioner.CAPTIONERS``, by the
checkpoint's ``model_type``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from freesegdiff.errors import ConfigError

__all__ = ["Registry"]


class Registry:
    """The implementations of one stage kind, by name.

    Args:
        setting: the setting that names one (for messages), e.g. ``"features.extractor"``.
        implementations: ``{name: "module:attribute"}``, in the order they are listed to users.
    """

    def __init__(self, setting: str, implementations: Mapping[str, str]) -> None:
        self.setting = setting
        self._where = dict(implementations)

    def names(self) -> tuple[str, ...]:
        """Every name the setting may take."""
        return tuple(self._where)

    def check(self, name: str) -> None:
        """Raise :class:`ConfigError` unless ``name`` is registered (the choices listed)."""
        if name not in self._where:
            choices = ", ".join(repr(choice) for choice in self._where)
            raise ConfigError(f"{self.setting} must be one of {choices}, got {name!r}")

    def get(self, name: str) -> Any:
        """The implementation registered as ``name`` (its module imported now)."""
        self.check(name)
        module, _, attribute = self._where[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __repr__(self) -> str:
        return f"Registry({self.setting!r}, {self._where!r})"
