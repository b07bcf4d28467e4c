"""bfloat16 against float32 on the tiny models: features, CLIP scores, cluster and label maps.

Tolerances, and why:

- features: relative error (Frobenius) at most 3 %. bfloat16 keeps 8 significant bits, a
  rounding error of at most 2^-9 (0.2 %) per operation; through the VAE encoder and the UNet's
  normalised layers the errors add up, like a random walk, to about 1 %.
- CLIP scores of the same masks: within 0.008 (softmax probabilities; the towers run in
  bfloat16, the measured difference is 0.004 to 0.006).
- cluster maps: k-means runs in float32 on the assembled features either way, so bfloat16 can
  only move pixels whose feature lies within ~1 % of a boundary between two clusters. The tiny
  random UNet's features have little cluster structure, though: two float32 runs with different
  k-means seeds alone agree on only 43 to 98 % of the pixels of these scenes. The test keeps the
  best of 10 k-means starts (``clustering.n_init``), so that the clusters are a function of the
  features rather than of the seeding draws, and asks for at least 95 % of the pixels in the same
  cluster (up to a renumbering) in the median scene and 90 % on average: one scene of eight may
  switch between two near-equal k-means optima.
- label maps: with the tiny CLIP as built, they are not a stable quantity: its random towers
  score most labels within 0.01 of each other for every cluster (a tie that any perturbation,
  bfloat16 or another seed, breaks either way). :func:`test_bfloat16_label_maps_agree_with_float32`
  therefore gives the tiny CLIP trained CLIP's logit scale of 100, which turns the same cosine
  differences into clear decisions, and asks for 95 % of the pixels in the median scene.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from freesegdiff.config import PipelineConfig
from freesegdiff.pipeline import FreeSegDiff

CLASSES = ["cat", "sofa", "floor", "wall", "person", "sky"]
# bfloat16 keeps 8 significant bits (a relative step of 0.4 %), and a masked image goes through
# a dozen rounded layers: scores may move by a few percent of themselves. Measured with the tiny
# models of TINY_VERSION 2: at most 4.7 % of the score (0.0155 at 0.33) over the eight scenes.
SCORE_RELATIVE_TOLERANCE = 0.06
SCORE_ABSOLUTE_TOLERANCE = 0.002
SCENES = range(8)


def scene(seed: int, height: int = 240, width: int = 320) -> np.ndarray:
    """Four flat-coloured regions split at a random point, with mild noise: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4, 3))
    row, col = rng.integers(height // 3, 2 * height // 3), rng.integers(width // 3, 2 * width // 3)
    image = np.zeros((height, width, 3), np.float32)
    image[:row, :col], image[:row, col:] = colours[0], colours[1]
    image[row:, :col], image[row:, col:] = colours[2], colours[3]
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def matched_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels in the same cluster after the best one-to-one renumbering of ``b``."""
    from scipy.optimize import linear_sum_assignment

    counts = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(counts, (a.ravel(), b.ravel()), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / a.size)


def tiny_pipe(sd_path, clip_path, dtype: str) -> FreeSegDiff:
    """Closed vocabulary, no captioner, no refinement, best of 10 k-means starts in torch.

    The torch k-means backend, not the paper's scikit-learn one: this file measures what the
    reduced precision of the models does. scikit-learn's float32 k-means, given the bfloat16
    features, lands in another of several near-equal optima more often (measured on these eight
    scenes: median agreement 82.7 % with it against 98.5 % with the torch backend), which says
    more about those optima than about bfloat16.
    """
    config = PipelineConfig.from_dict(
        {
            "models": {"diffusion": str(sd_path), "clip": str(clip_path), "captioner": None},
            "features": {"image_size": 256},
            "clustering": {"n_init": 10, "backend": "torch"},
            "refine": {"method": "none"},
            "dtype": dtype,
        }
    )
    return FreeSegDiff.from_config(config)


class RememberedFeatures:
    """The pipeline's feature stage, each image's features kept after its first call, so that
    the label-map test below names the same clusters again without running the (emulated,
    slow) bfloat16 VAE and UNet a second time."""

    def __init__(self, features) -> None:
        self.inner = features
        self.kept: dict[tuple, torch.Tensor] = {}

    def __call__(self, images, seed=None, timer=None):
        keys = [(seed, image.tobytes()) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.kept]
        if missing:
            computed = self.inner([images[i] for i in missing], seed=seed, timer=timer)
            for i, row in zip(missing, computed, strict=True):
                self.kept[keys[i]] = row
        return torch.stack([self.kept[key] for key in keys])

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def pipes(tiny_sd_path, tiny_clip_path) -> dict[str, FreeSegDiff]:
    pipes = {}
    for dtype in ("float32", "bfloat16"):
        pipes[dtype] = tiny_pipe(tiny_sd_path, tiny_clip_path, dtype)
        pipes[dtype].features = RememberedFeatures(pipes[dtype].features)
    return pipes


@pytest.fixture(scope="module")
def results(pipes) -> dict[str, list]:
    images = [scene(seed) for seed in SCENES]
    return {
        dtype: [pipe(image, classes=CLASSES) for image in images] for dtype, pipe in pipes.items()
    }


def test_bfloat16_runs_in_bfloat16(pipes):
    assert pipes["bfloat16"].features.unet.dtype == torch.bfloat16
    assert pipes["bfloat16"].classifier.model.dtype == torch.bfloat16


def test_bfloat16_features_are_within_three_percent(pipes):
    images = [scene(seed) for seed in range(3)]
    full = pipes["float32"].features.inner(images, seed=0)
    half = pipes["bfloat16"].features.inner(images, seed=0)
    assert half.dtype == torch.float32  # assembled in float32 for the clustering
    error = torch.linalg.norm(half - full) / torch.linalg.norm(full)
    assert 0 < float(error) < 0.03


def test_bfloat16_scores_of_the_same_masks_are_within_tolerance(pipes, results):
    for seed, result in zip(SCENES, results["float32"], strict=True):
        masks = torch.from_numpy(result.coarse_masks.astype(bool))
        item = [(scene(seed), masks, CLASSES)]
        full = pipes["float32"].classifier.score(item)[0]
        half = pipes["bfloat16"].classifier.score(item)[0]
        bound = SCORE_ABSOLUTE_TOLERANCE + SCORE_RELATIVE_TOLERANCE * np.maximum(full, half)
        assert (np.abs(full - half) <= bound).all(), np.abs(full - half).max()


def test_bfloat16_cluster_maps_agree_with_float32(results):
    agreement = [
        matched_agreement(full.cluster_map, half.cluster_map)
        for full, half in zip(results["float32"], results["bfloat16"], strict=True)
    ]
    assert statistics.median(agreement) >= 0.95
    assert statistics.mean(agreement) >= 0.90


def test_batches_give_single_image_features_in_both_precisions(pipes):
    """In bfloat16 on the CPU oneDNN picks its convolution kernels by batch size, so the VAE
    and UNet see one image at a time there (``DiffusionFeatures.batch_step``) and a batch gives
    exactly the single-image features; in float32 they batch, to within 1e-4."""
    images = [scene(seed) for seed in range(3)]
    half = pipes["bfloat16"].features.inner
    assert half.batch_step(3) == 1
    alone = torch.cat([half([image], seed=0) for image in images])
    assert torch.equal(half(images, seed=0), alone)
    full = pipes["float32"].features.inner
    assert full.batch_step(3) == 3
    alone = torch.cat([full([image], seed=0) for image in images])
    assert torch.allclose(full(images, seed=0), alone, atol=1e-4)


def test_bfloat16_label_maps_agree_with_float32(pipes, results):
    """Label maps, bfloat16 against float32, with a CLIP whose decisions are not coin tosses:
    the tiny CLIP given trained CLIP's logit scale (100) instead of the initial 1/0.07. At the
    initial scale its random towers score every label within ~0.01 of the others, so which label
    claims a cluster is a coin toss that any rounding flips; at 100, as in the real
    ``openai/clip-vit-base-patch32``, the same cosine differences become clear decisions. (The
    same scenes' features as above, kept by :class:`RememberedFeatures`.)

    Tolerance: at least 95 % of the pixels carry the same label in the median scene. bfloat16
    rounding (~1 % of the features, above) moves only pixels near a cluster boundary and the
    labels of near-tied clusters; but a scene whose k-means has two near-equal optima can switch
    its whole partition (see the module docstring), so single scenes are not bounded. Measured:
    99.2 % in the median scene, six of eight scenes above 96 %.
    """
    label_maps = {}
    for dtype, pipe in pipes.items():
        scale = pipe.classifier.model.logit_scale
        initial = scale.detach().clone()
        with torch.no_grad():
            scale.fill_(float(np.log(100.0)))
        try:
            label_maps[dtype] = [pipe(scene(seed), classes=CLASSES).label_map for seed in SCENES]
        finally:
            with torch.no_grad():
                scale.copy_(initial)
    assert all(len(pipe.features.kept) >= len(SCENES) for pipe in pipes.values())
    agreement = [
        float((full == half).mean())
        for full, half in zip(label_maps["float32"], label_maps["bfloat16"], strict=True)
    ]
    assert statistics.median(agreement) >= 0.95
