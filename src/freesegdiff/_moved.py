"""The module paths of freesegdiff 0.1, which moved to the layered tree: kept for one release.

``import freesegdiff.image_io`` (or ``from freesegdiff.clustering import Clusterer``) still
works, with a :class:`DeprecationWarning` that names the new path; the old path is removed in
0.3. An old module is a stand-in that finds each name in the module(s) it moved to, so a module
split in two still answers for both halves. Installed by ``freesegdiff/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

# old module -> the module(s) its names now live in, the first being where it moved
MOVED: dict[str, tuple[str, ...]] = {
    "freesegdiff.captioner": ("freesegdiff.stages.captioner",),
    "freesegdiff.entities": ("freesegdiff.stages.entities",),
    "freesegdiff.vocabulary": ("freesegdiff.stages.vocabulary",),
    "freesegdiff.features": (
        "freesegdiff.stages.features.diffusion",
        "freesegdiff.stages.features",
        "freesegdiff.stages.features.unet",
    ),
    "freesegdiff.attention_maps": ("freesegdiff.stages.features.attention_maps",),
    "freesegdiff.backbones": ("freesegdiff.stages.features.vit",),
    "freesegdiff.clustering": (
        "freesegdiff.stages.clustering",
        "freesegdiff.stages.clustering.kmeans",
    ),
    "freesegdiff.classify": ("freesegdiff.stages.naming.masked_crops",),
    "freesegdiff.refine": ("freesegdiff.stages.refine",),
    "freesegdiff.refine.crf": ("freesegdiff.stages.refine.crf",),
    "freesegdiff.refine.pamr": ("freesegdiff.stages.refine.pamr",),
    "freesegdiff.refine.densecrf_reference": ("freesegdiff.stages.refine.densecrf_reference",),
    "freesegdiff.compose": ("freesegdiff.stages.compose", "freesegdiff.infra.arrays"),
    "freesegdiff.image_io": ("freesegdiff.io.images", "freesegdiff.infra.arrays"),
    "freesegdiff.outputs": ("freesegdiff.io.outputs", "freesegdiff.io.saved"),
    "freesegdiff.export": ("freesegdiff.io.export",),
    "freesegdiff.atomic": ("freesegdiff.io.atomic",),
    "freesegdiff.visualize": ("freesegdiff.io.visualize",),
    "freesegdiff.visualize.cluster_map": ("freesegdiff.io.visualize.cluster_map",),
    "freesegdiff.visualize.colors": ("freesegdiff.io.visualize.colors",),
    "freesegdiff.visualize.explain": ("freesegdiff.io.visualize.explain",),
    "freesegdiff.visualize.index_page": (
        "freesegdiff.io.visualize.index_page",
        "freesegdiff.io.outputs",
    ),
    "freesegdiff.visualize.overlay": ("freesegdiff.io.visualize.overlay",),
    "freesegdiff.devices": ("freesegdiff.infra.devices",),
    "freesegdiff.hub": ("freesegdiff.infra.hub",),
    "freesegdiff.weights": ("freesegdiff.infra.weights",),
    "freesegdiff.extras": ("freesegdiff.infra.extras",),
    "freesegdiff.timing": ("freesegdiff.infra.timing",),
    "freesegdiff.runtime": ("freesegdiff.infra.tuning",),
    "freesegdiff.memory": ("freesegdiff.infra.memory",),
    "freesegdiff.workers": ("freesegdiff.infra.workers",),
    "freesegdiff.tiny": ("freesegdiff.infra.tiny",),
    "freesegdiff.tiny.captioner": ("freesegdiff.infra.tiny.captioner",),
    "freesegdiff.tiny.clip": ("freesegdiff.infra.tiny.clip",),
    "freesegdiff.tiny.diffusion": ("freesegdiff.infra.tiny.diffusion",),
    "freesegdiff.tiny.vocab": ("freesegdiff.infra.tiny.vocab",),
    "freesegdiff.commands": ("freesegdiff.cli",),
    "freesegdiff.commands.ablate": ("freesegdiff.cli.ablate",),
    "freesegdiff.commands.bench": ("freesegdiff.cli.bench",),
    "freesegdiff.commands.common": ("freesegdiff.cli.common", "freesegdiff.distributed"),
    "freesegdiff.commands.demo": ("freesegdiff.cli.demo",),
    "freesegdiff.commands.eval": ("freesegdiff.cli.eval",),
    "freesegdiff.commands.segment": (
        "freesegdiff.cli.segment",
        "freesegdiff.cli.folder",
        "freesegdiff.distributed",
    ),
}
# 0.1 names that were renamed: old module -> {old name: new name}
RENAMED: dict[str, dict[str, str]] = {
    # two functions of that name meant different things; the vocabulary's keeps it
    "freesegdiff.attention_maps": {"class_embeddings": "pooled_prompt_embeddings"},
}
# 0.1 functions whose job is done elsewhere now: still callable at their old paths, deprecated
_CHECKED_BY_CONFIG = "the settings check themselves when they are made (freesegdiff.config)"
RETIRED: dict[str, dict[str, str]] = {
    "freesegdiff.features": {"check_feature_config": _CHECKED_BY_CONFIG},
    "freesegdiff.captioner": {"check_caption_config": _CHECKED_BY_CONFIG},
}
# old modules that were packages (their submodules above can be imported through them)
_PACKAGES = {
    "freesegdiff.refine",
    "freesegdiff.visualize",
    "freesegdiff.tiny",
    "freesegdiff.commands",
}
REMOVED_IN = "0.3"


class _MovedModule(types.ModuleType):
    """An old module path: each attribute is looked up where the module moved."""

    def __init__(self, name: str, targets: Sequence[str]) -> None:
        super().__init__(name, f"Moved to {targets[0]} (this path is removed in {REMOVED_IN}).")
        self.__targets = tuple(targets)
        if name in _PACKAGES:
            self.__path__: list[str] = []

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        renamed = RENAMED.get(self.__name__, {})
        if attribute in renamed:
            warnings.warn(
                f"{self.__name__}.{attribute} is {renamed[attribute]} now; the old name is "
                f"removed in freesegdiff {REMOVED_IN}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(self, renamed[attribute])
        retired = RETIRED.get(self.__name__, {})
        if attribute in retired:
            return _retired(f"{self.__name__}.{attribute}", retired[attribute])
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r}")

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self.__targets:
            names.update(dir(importlib.import_module(target)))
        return sorted(names)


def _retired(name: str, reason: str) -> Any:
    """A stand-in for a function that is no longer needed: it warns, and does nothing."""

    def retired(*args: Any, **kwargs: Any) -> None:
        warnings.warn(
            f"{name} is no longer needed: {reason}; it is removed in freesegdiff {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )

    retired.__name__ = name.rpartition(".")[2]
    return retired


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and makes their stand-ins."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in _PACKAGES)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name][0]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path is removed in freesegdiff {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,  # (the warnings module skips importlib's own frames)
        )
        return _MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the stand-in finds its names on use."""


# names that left a module which still exists: module -> {name: the module it lives in now}
MOVED_NAMES: dict[str, dict[str, str]] = {
    "freesegdiff.pipeline": {"MAX_SEED": "freesegdiff.config"},
    "freesegdiff.demo.app": {
        "MB": "freesegdiff.demo.limits",
        "DemoServer": "freesegdiff.demo.server",
        "ensure_port_free": "freesegdiff.demo.server",
        "serve_demo": "freesegdiff.demo.server",
    },
}


def moved_name(module: str, name: str) -> Any:
    """For a module's ``__getattr__``: ``name`` from where it moved (with a warning), or
    :class:`AttributeError`. Looked up by name when used, so no import ties the two modules."""
    target = MOVED_NAMES.get(module, {}).get(name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {target}; the old path is removed in freesegdiff {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(target), name)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
