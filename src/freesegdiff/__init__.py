"""freesegdiff: training-free open-vocabulary semantic segmentation with diffusion features.

The public names are imported lazily so that ``import freesegdiff`` stays cheap (no torch,
diffusers or transformers until a model is needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from freesegdiff import _moved

__version__ = "0.1.0"

_moved.install()  # the module paths of 0.1 (freesegdiff.image_io, ...) keep working, deprecated

_LAZY = {
    "FreeSegDiff": "freesegdiff.pipeline",
    "PipelineConfig": "freesegdiff.config",
    "SegmentationResult": "freesegdiff.result",
    "Segment": "freesegdiff.result",
    "load_preset": "freesegdiff.presets",
    "available_presets": "freesegdiff.presets",
    "extract_entities": "freesegdiff.stages.entities",
    "load_image": "freesegdiff.io.images",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from freesegdiff.config import PipelineConfig  # noqa: F401
    from freesegdiff.io.images import load_image  # noqa: F401
    from freesegdiff.pipeline import FreeSegDiff  # noqa: F401
    from freesegdiff.presets import available_presets, load_preset  # noqa: F401
    from freesegdiff.result import Segment, SegmentationResult  # noqa: F401
    from freesegdiff.stages.entities import extract_entities  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'freesegdiff' has no attribute {name!r}")
