"""Class-agnostic masks: clustering the feature vectors of one image (docs/method.md, step 8).

Two k-means backends (``ClusterConfig.backend``):

- ``"sklearn"`` (released): scikit-learn's ``KMeans`` on the CPU, ``random_state`` = the seed,
  exactly the released call with its seed made explicit.
- ``"torch"``: :func:`kmeans`, the same algorithm in torch on the features' device (no copy
  to the CPU): greedy k-means++ seeding, Lloyd iterations, convergence when the labels stop
  changing or the centres move less than ``tol`` times the mean feature variance, best of
  ``n_init``. From the same initial centres it gives scikit-learn's labels; its random draws
  are torch's, so from a seed it may reach another local optimum than scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.config import ClusterConfig
from freesegdiff.errors import ConfigError


@dataclass
class KMeansResult:
    """Labels ``(N,)`` int64, centres ``(K, C)`` float32, inertia and iterations of the best run."""

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: float
    iterations: int


def _squared_norms(points: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` -> ``(N,)`` squared Euclidean norms of the rows."""
    return (points * points).sum(1)


def _squared_distances(
    points: torch.Tensor,
    centers: torch.Tensor,
    points_sq: torch.Tensor | None = None,
    centers_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, C)`` x ``(K, C)`` -> ``(N, K)`` squared Euclidean distances (clamped at 0).

    ``points_sq`` / ``centers_sq``: their squared norms if already known. Lloyd's iterations
    reuse the points' norms instead of recomputing them (less memory traffic per iteration;
    measured in benchmarks/RESULTS.md); the values are the same either way.
    """
    cross = points @ centers.T
    if points_sq is None:
        points_sq = _squared_norms(points)
    if centers_sq is None:
        centers_sq = _squared_norms(centers)
    return (points_sq[:, None] - 2 * cross + centers_sq).clamp_(min=0)


def kmeans_plusplus(
    points: torch.Tensor,
    k: int,
    generator: torch.Generator,
    points_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding as scikit-learn: ``2 + log(k)`` candidates per new centre.

    Returns ``(k, C)`` initial centres taken from ``points`` ``(N, C)`` (``points_sq``: their
    squared norms, if already known).
    """
    if points_sq is None:
        points_sq = _squared_norms(points)
    count = points.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(count, (1,), generator=generator, device=generator.device).item())
    centers = [points[first]]
    closest = _squared_distances(
        points, points[first : first + 1], points_sq, points_sq[first : first + 1]
    )[:, 0]
    potential = closest.sum()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, device=generator.device, dtype=points.dtype)
        cumulative = torch.cumsum(closest, 0)
        candidates = torch.searchsorted(cumulative, draws * potential).clamp_(max=count - 1)
        # (trials, N): each candidate's distances, capped by the current closest centre
        distances = torch.minimum(
            closest[None],
            _squared_distances(points[candidates], points, points_sq[candidates], points_sq),
        )
        potentials = distances.sum(1)
        best = int(torch.argmin(potentials).item())
        closest, potential = distances[best], potentials[best]
        centers.append(points[candidates[best]])
    return torch.stack(centers)


def _cluster_sums(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, C)`` points, ``(N,)`` labels in ``[0, k)`` -> ``(k, C)`` sum of each cluster.

    On the CPU one ``index_add_`` pass (faster than ``one_hot.T @ points``, see
    benchmarks/RESULTS.md, and deterministic there); elsewhere the matrix product, whose sums
    do not depend on the order atomic additions land in.
    """
    if points.device.type == "cpu":
        return points.new_zeros(k, points.shape[1]).index_add_(0, labels, points)
    return F.one_hot(labels, k).to(points.dtype).T @ points


def _lloyd(
    points: torch.Tensor,
    centers: torch.Tensor,
    max_iter: int,
    tol: float,
    points_sq: torch.Tensor | None = None,
) -> KMeansResult:
    """Lloyd iterations from ``centers`` until labels are stable or the shift is below ``tol``."""
    if points_sq is None:
        points_sq = _squared_norms(points)
    k = centers.shape[0]
    labels = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (iterations is returned)
        distances = _squared_distances(points, centers, points_sq)
        new_labels = distances.argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sizes = torch.bincount(labels, minlength=k).to(points.dtype)  # (K,)
        sums = _cluster_sums(points, labels, k)  # (K, C)
        new_centers = centers.clone()
        filled = sizes > 0
        new_centers[filled] = sums[filled] / sizes[filled, None]
        for empty in torch.nonzero(~filled).flatten().tolist():
            # As scikit-learn: an empty cluster takes the point farthest from its centre.
            far = distances.gather(1, labels[:, None])[:, 0].argmax()
            new_centers[empty] = points[far]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if shift <= tol:
            break
    distances = _squared_distances(points, centers, points_sq)
    labels = distances.argmin(1)
    inertia = float(distances.gather(1, labels[:, None]).sum())
    return KMeansResult(labels, centers, inertia, iterations)


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    seed: int | None = 0,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    init: torch.Tensor | None = None,
) -> KMeansResult:
    """k-means of ``points`` ``(N, C)`` into ``k`` clusters, computed in float32 on their device.

    Args:
        seed: seeds the k-means++ draws (None: random).
        n_init: runs from different seeds; the lowest inertia wins.
        tol: relative tolerance, multiplied by the mean per-feature variance (as scikit-learn).
        init: ``(k, C)`` starting centres instead of k-means++ (then ``n_init`` is 1).
    """
    if points.ndim != 2:
        raise ValueError(f"points must be (N, C), got {tuple(points.shape)}")
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ConfigError(f"k-means needs 1 <= k <= number of points ({count}), got k={k}")
    # Row-major: the transposed view of a feature map makes every product in the iterations
    # much slower than one copy up front (benchmarks/RESULTS.md).
    points = points.float().contiguous()
    # the mean per-feature variance, as points.var(0, unbiased=False).mean() but faster
    absolute_tol = tol * float((points - points.mean(0)).square_().mean())
    points_sq = _squared_norms(points)  # (N,), shared by the seeding and every iteration
    if init is not None:
        return _lloyd(points, init.to(points), max_iter, absolute_tol, points_sq)
    generator = torch.Generator(device=points.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        start = kmeans_plusplus(points, k, generator, points_sq)
        run = _lloyd(points, start, max_iter, absolute_tol, points_sq)
        if best is None or run.inertia < best.inertia:
            best = run
    assert best is not None  # n_init >= 1
    return best


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
        if not 1 <= low <= high:
            raise ConfigError(f"clustering.k_range must be 1 <= lo <= hi, got {config.k_range}")
        return (low, high) if low < high else low
    if config.k < 1:
        raise ConfigError(f"clustering.k must be at least 1, got {config.k}")
    return config.k


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
    k = choose_k(config, candidates)
    k_range = (k, k) if isinstance(k, int) else k
    k_range = (min(k_range[0], points.shape[0]), min(k_range[1], points.shape[0]))
    best_labels: torch.Tensor | None = None
    best_score = -math.inf
    for k_value in range(k_range[0], k_range[1] + 1):
        labels = _cluster(points, k_value, config, seed)
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


def sklearn_kmeans_labels(
    points: torch.Tensor,
    k: int,
    *,
    seed: int | None = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Labels ``(N,)`` int64 of scikit-learn's ``KMeans`` on ``points`` ``(N, C)``, float32.

    ``KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol, random_state=seed)``: the
    released script's call (k-means++, lowest inertia of ``n_init`` runs), on the CPU; the
    labels are returned on the points' device.
    """
    from sklearn.cluster import KMeans

    data = np.ascontiguousarray(points.detach().float().cpu().numpy())  # (N, C) float32
    model = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol, random_state=seed)
    labels = model.fit(data).labels_
    return torch.from_numpy(labels.astype(np.int64)).to(points.device)


def _torch_kmeans_labels(points: torch.Tensor, k: int, **options: Any) -> torch.Tensor:
    """Labels ``(N,)`` of :func:`kmeans` (the torch backend), same keywords as scikit-learn's."""
    return kmeans(points, k, **options).labels


def _cluster(points: torch.Tensor, k: int, config: ClusterConfig, seed: int | None) -> torch.Tensor:
    """Labels ``(N,)`` of one clustering of ``points`` ``(N, C)`` into ``k`` groups."""
    if config.method == "kmeans":
        if config.backend not in ("sklearn", "torch"):
            raise ConfigError(
                f"unknown clustering.backend {config.backend!r}; use sklearn or torch"
            )
        run = sklearn_kmeans_labels if config.backend == "sklearn" else _torch_kmeans_labels
        return run(
            points, k, seed=seed, n_init=config.n_init, max_iter=config.max_iter, tol=config.tol
        )
    if config.method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=k).fit_predict(points.cpu().numpy())
        return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(points.device)
    raise ConfigError(f"unknown clustering.method {config.method!r}; use kmeans or agglomerative")


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
    if mode != "nearest-exact":
        raise ConfigError(f"unknown clustering.upsample {mode!r}; use cv2-nearest or nearest-exact")
    resized = F.interpolate(
        cluster_map[None, None].float(), size=(height, width), mode="nearest-exact"
    )
    return resized[0, 0].long()


class Clusterer:
    """Stage 8: the class-agnostic masks of one image, as a cluster map at the image's size.

    Built from the ``clustering`` settings and the pipeline's seed; the settings are checked
    here, before any feature is computed.
    """

    def __init__(self, config: ClusterConfig, seed: int | None = 0) -> None:
        if config.method not in ("kmeans", "agglomerative"):
            raise ConfigError(
                f"unknown clustering.method {config.method!r}; use kmeans or agglomerative"
            )
        if config.backend not in ("sklearn", "torch"):
            raise ConfigError(
                f"unknown clustering.backend {config.backend!r}; use sklearn or torch"
            )
        if config.upsample not in ("cv2-nearest", "nearest-exact"):
            raise ConfigError(
                f"unknown clustering.upsample {config.upsample!r}; use cv2-nearest or nearest-exact"
            )
        choose_k(config, 1)  # raises on a K or K range that cannot work
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
