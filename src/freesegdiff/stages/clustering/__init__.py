"""Step 8: class-agnostic masks, one cluster map per image (docs/method.md, step 8).

The stage (:class:`Clusterer`): the feature vectors of an image, normalised as
``clustering.normalize`` says, are labelled by the method ``clustering.method`` names in
:data:`METHODS` (``kmeans.py``: the method's k-means, in four backends; ``agglomerative.py``),
with K fixed, chosen by silhouette over a range, or the number of candidate labels plus an
offset; the cluster map is brought to the image's size as the released script does.

A clustering method is a function ``(points (N, C) float32, k, config, seed) -> labels (N,)
int64`` in a file of this package, plus one entry in :data:`METHODS`.
"""

from __future__ import annotations

import math
import typing

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.config import ClusterConfig
from freesegdiff.stages.registry import Registry

__all__ = [
    "METHODS",
    "NORMALIZATIONS",
    "Clusterer",
    "choose_k",
    "cluster_features",
    "cv2_nearest_indices",
    "normalize_points",
    "silhouette_score",
    "upsample_cluster_map",
]

# clustering.normalize's choices (the setting's own type lists them)
NORMALIZATIONS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ClusterConfig)["normalize"])
# clustering.method -> labels (N,) of points (N, C) into k clusters
METHODS = Registry(
    "clustering.method",
    {
        "kmeans": "freesegdiff.stages.clustering.kmeans:kmeans_labels",
        "agglomerative": "freesegdiff.stages.clustering.agglomerative:agglomerative_labels",
    },
)


def silhouette_score(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette coefficient (Euclidean), as ``sklearn.metrics.silhouette_score``.

    Points in singleton clusters score 0. Needs 2 <= number of clusters <= N - 1.
    """
    points = points.float()
    distances = torch.cdist(points, points)  # (N, N)
    ids, labels = torch.unique(labels, return_inverse=True)
    k = ids.numel()
    if not 2 <= k <= points.shape[0] - 1:
        raise ValueError(f"silhouette needs 2..N-1 clusters, got {k}")
    one_hot = F.one_hot(labels, k).to(points.dtype)  # (N, K)
    sizes = one_hot.sum(0)
    sums = distances @ one_hot  # (N, K) summed distance to each cluster
    own_size = sizes[labels]
    intra = sums.gather(1, labels[:, None])[:, 0] / (own_size - 1).clamp(min=1)
    mean_to = sums / sizes
    mean_to.scatter_(1, labels[:, None], float("inf"))
    inter = mean_to.min(1).values
    score = (inter - intra) / torch.maximum(intra, inter)
    score = torch.where(own_size > 1, score, torch.zeros_like(score))
    return float(torch.nan_to_num(score, nan=0.0).mean())


def choose_k(config: ClusterConfig, candidates: int) -> int | tuple[int, int]:
    """The number of clusters: fixed, ``candidates + adaptive_offset``, or a range to search."""
    if config.adaptive_offset is not None:
        return max(1, candidates + config.adaptive_offset)
    if config.k_range is not None:
        low, high = config.k_range
        return (low, high) if low < high else low
    return config.k


def normalize_points(points: torch.Tensor, how: str = "none", pca_dim: int = 64) -> torch.Tensor:
    """The feature vectors ``(N, C)`` float32 as clustering sees them (``clustering.normalize``).

    ``"none"``: as they are (the released script). ``"l2"``: each vector divided by its
    Euclidean norm (zero vectors stay zero), so k-means compares directions, as cosine
    similarity. ``"pca"``: centred and projected on the first ``min(pca_dim, N, C)`` principal
    components (an SVD of the centred points, in float64): ``(N, D)``, the components ordered by
    explained variance, each with the sign that makes its largest loading positive (as
    scikit-learn's ``svd_flip``), so the result is deterministic.
    """
    if how == "l2":
        return points / points.norm(dim=1, keepdim=True).clamp_min(torch.finfo(points.dtype).tiny)
    if how == "pca":
        centred = (points - points.mean(0)).double()
        _, _, right = torch.linalg.svd(centred, full_matrices=False)  # (min(N, C), C)
        components = right[: min(pca_dim, *points.shape)]
        largest = components.abs().argmax(1)
        signs = torch.sign(components.gather(1, largest[:, None]))
        return (centred @ (components * signs).T).float()
    return points  # "none"


def cluster_features(
    features: torch.Tensor,
    config: ClusterConfig,
    *,
    candidates: int = 0,
    seed: int | None = 0,
) -> torch.Tensor:
    """Cluster one image's feature map into class-agnostic masks.

    Args:
        features: ``(C, h, w)`` feature map (any float dtype, any device).
        candidates: number of candidate labels (used by ``adaptive_offset``).

    Returns:
        ``(h, w)`` int64 cluster index map on the features' device, indices in ``[0, K)``.
    """
    channels, height, width = features.shape
    points = features.reshape(channels, height * width).T.float()  # (C, h, w) -> (h*w, C)
    points = normalize_points(points, config.normalize, config.pca_dim)
    label = METHODS.get(config.method)
    k = choose_k(config, candidates)
    k_range = (k, k) if isinstance(k, int) else k
    k_range = (min(k_range[0], points.shape[0]), min(k_range[1], points.shape[0]))
    best_labels: torch.Tensor | None = None
    best_score = -math.inf
    for k_value in range(k_range[0], k_range[1] + 1):
        labels = label(points, k_value, config, seed)
        if k_range[0] == k_range[1]:
            return labels.reshape(height, width)
        if torch.unique(labels).numel() < 2:
            continue
        score = silhouette_score(points, labels)
        if score > best_score:
            best_labels, best_score = labels, score
    if best_labels is None:
        best_labels = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    return best_labels.reshape(height, width)


def cv2_nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each of ``target`` output positions, as OpenCV's ``INTER_NEAREST``.

    OpenCV computes, in double precision, ``min(floor(i * (1 / (target / source))), source-1)``
    for output position ``i``; the reciprocal of the scale (not ``source / target``) is what it
    multiplies by, and on some sizes that moves a boundary by one position.
    """
    inverse_scale = 1.0 / (target / source)
    positions = np.floor(np.arange(target, dtype=np.float64) * inverse_scale).astype(np.int64)
    return np.minimum(positions, source - 1)


def upsample_cluster_map(
    cluster_map: torch.Tensor, height: int, width: int, mode: str = "cv2-nearest"
) -> torch.Tensor:
    """``(h, w)`` cluster map -> ``(height, width)`` int64 on its device (docs/method.md, step 8).

    ``mode="cv2-nearest"``: OpenCV's ``INTER_NEAREST`` (the released script), without OpenCV
    (:func:`cv2_nearest_indices`). ``"nearest-exact"``: each output pixel takes the cell its
    centre falls in (symmetric: no row or column is favoured).
    """
    if mode == "cv2-nearest":
        rows = torch.from_numpy(cv2_nearest_indices(cluster_map.shape[0], height))
        cols = torch.from_numpy(cv2_nearest_indices(cluster_map.shape[1], width))
        device = cluster_map.device
        return cluster_map[rows.to(device)][:, cols.to(device)].long()
    resized = F.interpolate(
        cluster_map[None, None].float(), size=(height, width), mode="nearest-exact"
    )
    return resized[0, 0].long()


class Clusterer:
    """Stage 8: the class-agnostic masks of one image, as a cluster map at the image's size.

    Built from the ``clustering`` settings (checked when they were made) and the pipeline's
    seed; ``clustering.method`` picks the labelling from :data:`METHODS`.
    """

    def __init__(self, config: ClusterConfig, seed: int | None = 0) -> None:
        METHODS.check(config.method)
        self.config = config
        self.seed = seed

    def __call__(
        self, features: torch.Tensor, candidates: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """``(C, h, w)`` features -> ``(H, W)`` int64 cluster map on their device.

        ``candidates``: the image's number of candidate labels (for an adaptive K);
        ``size``: ``(H, W)`` of the image.
        """
        small = cluster_features(features, self.config, candidates=candidates, seed=self.seed)
        return upsample_cluster_map(small, size[0], size[1], self.config.upsample)
