"""The ``paper`` preset reproduces the authors' released script, pixel for pixel.

``tests/reference/released.py`` re-implements, independently of the package (it imports nothing
from ``freesegdiff``), the order of operations of the released ``script-stable-segmentation``:
BLIP caption with the LAVIS prompt and beam settings, spaCy nouns and adjectives, the VOC19 +
caption vocabulary (or the caption-pruned closed vocabulary), the seeded VAE sample and noise,
the five 16x16 ``attn2.to_q`` maps upsampled to 32x32, scikit-learn k-means, the nearest-neighbour
resize of the cluster map, CLIP on each masked image, the released assignment rule, pydensecrf
refinement and first-come painting.

Both run on the same tiny random models (from the session fixtures) and real photos of varied
sizes (square, landscape, portrait, odd, smaller and larger than the 512 feature input). For
every photo the caption, the label texts, the cluster map, the CLIP scores and the final label
map must agree, the maps on every pixel; so, on these models and photos, the package's ``paper``
preset computes exactly what the released script computes, not merely something close. A
failure names every stage that differs, the first one first, since each later stage depends on
the earlier ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("cv2")

from reference.released import ReleasedOutput, released_segment

CLOSED_CLASSES = ["cat", "potted plant", "dining table", "person", "dog"]
# name: (H, W). Sizes are kept small (the CRF runs at image size, on one core) but varied:
# landscape and portrait, odd sides, both smaller and larger than the 512 x 512 VAE input (PIL's
# bilinear filter up- and down-sampling, in one photo both at once), non-integer
# 32 -> size nearest-neighbour factors, and a PIL-resampled photo.
OPEN_PHOTOS = {
    "chelsea": (300, 451),  # as bundled
    "astronaut": (512, 512),  # as bundled: exactly the VAE input size
    "astronaut_half": (256, 256),  # every other pixel: an exact 8x cluster-map factor
    "coffee_half": (200, 300),
    "rocket": (427, 640),  # as bundled
    "rocket_strip": (200, 640),  # wider than 512, lower than 512
    "hubble_portrait": (277, 187),
    "ihc_odd": (199, 263),
    "motorcycle_third": (167, 247),
    # resampled by PIL to an odd size; read-only, as np.asarray(PIL image) always is
    "astronaut_233x317": (233, 317),
}
CLOSED_PHOTOS = ["chelsea", "coffee_half"]


def _photo(name: str) -> np.ndarray:
    """An (H, W, 3) uint8 RGB photo bundled with scikit-image (no download)."""
    from PIL import Image
    from skimage import data

    photos = {
        "chelsea": lambda: data.chelsea(),
        "astronaut": lambda: data.astronaut(),
        "astronaut_half": lambda: data.astronaut()[::2, ::2],
        "coffee_half": lambda: data.coffee()[::2, ::2],
        "rocket": lambda: data.rocket(),
        "rocket_strip": lambda: data.rocket()[150:350],
        "hubble_portrait": lambda: data.hubble_deep_field()[300:577, 400:587],
        "ihc_odd": lambda: data.immunohistochemistry()[100:299, 50:313],
        "motorcycle_third": lambda: data.stereo_motorcycle()[0][::3, ::3],
        "astronaut_233x317": lambda: np.asarray(
            Image.fromarray(data.astronaut()).resize((317, 233), Image.BILINEAR)
        ),
    }
    image = np.ascontiguousarray(photos[name]())
    assert image.shape == (*OPEN_PHOTOS[name], 3) and image.dtype == np.uint8, image.shape
    return image


@pytest.fixture(scope="module")
def folders(tiny_sd_path: Path, tiny_clip_path: Path, tiny_blip_path: Path) -> dict[str, str]:
    return {"sd": str(tiny_sd_path), "clip": str(tiny_clip_path), "blip": str(tiny_blip_path)}


@pytest.fixture(scope="module")
def pipe(folders: dict[str, str]) -> Any:
    import sklearn

    from freesegdiff import FreeSegDiff

    # The reference clusters with the installed scikit-learn; the preset re-implements
    # scikit-learn 1.2 (the released environment's), whose k-means++ draws differ from 1.3 on.
    # Here the preset takes the installed version's draws, so that the two compute the same
    # thing; tests/test_clustering.py shows that each set of draws equals its scikit-learn.
    newer = tuple(int(part) for part in sklearn.__version__.split(".")[:2]) >= (1, 3)
    overrides = {
        "models.diffusion": folders["sd"],
        "models.captioner": folders["blip"],
        "models.clip": folders["clip"],
        "clustering.backend": "torch-sklearn" if newer else "torch-sklearn-1.2",
    }
    return FreeSegDiff.from_preset("paper", overrides=overrides)


@pytest.fixture(scope="module")
def released(folders: dict[str, str]) -> Any:
    """``released(photo, classes)``: the reference's output, computed once per module."""
    cache: dict[tuple[str, tuple[str, ...] | None], ReleasedOutput] = {}

    def run(name: str, classes: list[str] | None = None) -> ReleasedOutput:
        key = (name, None if classes is None else tuple(classes))
        if key not in cache:
            cache[key] = released_segment(
                _photo(name),
                sd_folder=folders["sd"],
                clip_folder=folders["clip"],
                blip_folder=folders["blip"],
                classes=classes,
            )
        return cache[key]

    return run


def _differences(result: Any, ref: ReleasedOutput) -> list[str]:
    """Every stage at which the package's result differs from the reference, in stage order."""
    found = []
    if result.caption != ref.caption:
        found.append(f"caption: {result.caption!r} != {ref.caption!r}")
    if list(result.vocabulary) != ref.texts:
        found.append(f"vocabulary: {list(result.vocabulary)} != {ref.texts}")
    ref_candidates = {ref.texts[i] for i in ref.candidates}
    if set(result.candidates) != ref_candidates:
        found.append(f"candidates: {sorted(set(result.candidates))} != {sorted(ref_candidates)}")
    cluster_map = np.asarray(result.cluster_map)
    if cluster_map.shape != ref.cluster_map.shape:
        found.append(f"cluster_map shape: {cluster_map.shape} != {ref.cluster_map.shape}")
    elif not np.array_equal(cluster_map, ref.cluster_map):
        changed = int((cluster_map != ref.cluster_map).sum())
        found.append(f"cluster_map: {changed} of {cluster_map.size} pixels differ")
    scores = np.asarray(result.scores)
    if scores.shape != ref.scores.shape:
        found.append(f"scores shape: {scores.shape} != {ref.scores.shape}")
    elif not np.allclose(scores, ref.scores, rtol=0, atol=1e-5):
        gap = float(np.abs(scores - ref.scores).max())
        found.append(f"scores: max abs difference {gap:.3g} > 1e-5")
    label_map = np.asarray(result.label_map)
    if label_map.shape != ref.label_map.shape:
        found.append(f"label_map shape: {label_map.shape} != {ref.label_map.shape}")
    elif not np.array_equal(label_map, ref.label_map):
        changed = int((label_map != ref.label_map).sum())
        found.append(
            f"label_map: {changed} of {label_map.size} pixels differ "
            f"(package ids {np.unique(label_map).tolist()}, "
            f"released ids {np.unique(ref.label_map).tolist()})"
        )
    return found


@pytest.mark.parametrize("name", OPEN_PHOTOS)
def test_open_vocabulary_matches_released_script(name: str, pipe: Any, released: Any) -> None:
    image = _photo(name)
    ref = released(name)
    result = pipe(image)

    assert result.label_map.shape == image.shape[:2]
    found = _differences(result, ref)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", CLOSED_PHOTOS)
def test_closed_vocabulary_matches_released_script(name: str, pipe: Any, released: Any) -> None:
    ref = released(name, CLOSED_CLASSES)
    result = pipe(_photo(name), classes=CLOSED_CLASSES)

    assert ref.texts == CLOSED_CLASSES
    found = _differences(result, ref)
    assert not found, "\n".join(found)


def test_comparison_is_not_trivial(released: Any) -> None:
    """The reference labels something, so equal label maps are not just equal backgrounds."""
    labelled = {name: int((released(name).label_map > 0).sum()) for name in OPEN_PHOTOS}
    assert sum(n > 0 for n in labelled.values()) >= len(OPEN_PHOTOS) // 2, labelled
    closed = {n: int((released(n, CLOSED_CLASSES).label_map > 0).sum()) for n in CLOSED_PHOTOS}
    assert any(n > 0 for n in closed.values()), closed
