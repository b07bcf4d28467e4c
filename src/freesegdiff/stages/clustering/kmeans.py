"""Class-agnostic masks: clustering the feature vectors of one image (docs/method.md, step 8).

k-means backends (``ClusterConfig.backend``):

- ``"sklearn"`` (released): scikit-learn's ``KMeans`` on the CPU, ``random_state`` = the seed,
  exactly the released call with its seed made explicit, run by the installed scikit-learn.
- ``"torch-sklearn-1.2"`` and ``"torch-sklearn"``: :func:`sklearn_kmeans`, scikit-learn's
  ``KMeans`` step for step in torch on the features' device, its ``RandomState`` draws included,
  as scikit-learn 1.2 (the version the released script pinned) or 1.3 and later draw them.
- ``"torch"``: :func:`kmeans`, the same algorithm in torch on the features' device (no copy
  to the CPU): greedy k-means++ seeding, Lloyd iterations, convergence when the labels stop
  changing or the centres move less than ``tol`` times the mean feature variance, best of
  ``n_init``. From the same initial centres it gives scikit-learn's labels; its random draws
  are torch's, so from a seed it may reach another local optimum than scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

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
    """Lloyd iterations from ``centers`` until labels are stable or the shift is below ``tol``,
    step for step as scikit-learn's ``_kmeans_single_lloyd``.

    Each point takes the centre minimising ``|c|^2 - 2 x.c`` (scikit-learn's expression: the
    point's own norm would only round the comparison); new centres are the sums times the
    float32 reciprocal of the counts (``_average_centers``); an empty cluster takes the point
    farthest from its old centre, which leaves its own cluster's sum
    (``_relocate_empty_clusters_dense``). After a stop on ``tol`` or ``max_iter`` the labels are
    taken once more from the final centres. The inertia is summed in float64. ``points_sq`` is
    unused (kept for callers that have it).
    """
    if points_sq is None:
        points_sq = _squared_norms(points)
    labels = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    iterations, strict = 0, False
    for iterations in range(1, max_iter + 1):  # noqa: B007 (iterations is returned)
        new_labels = _nearest_centers(points, centers)
        if torch.equal(new_labels, labels):
            strict = True  # the centres of these labels are the current ones
            break
        labels = new_labels
        new_centers = _mean_centers(points, labels, centers)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if shift <= tol:
            break
    if not strict:  # stopped on tol or max_iter: the labels of the final centres
        labels = _nearest_centers(points, centers)
    return KMeansResult(labels, centers, _inertia(points, centers, labels, points_sq), iterations)


def _inertia(
    points: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, points_sq: torch.Tensor
) -> float:
    """Sum of squared distances of ``points`` ``(N, C)`` to their centres: float32 products
    (as scikit-learn's float32 inertia), summed in float64; one ``(N, C) x (C, K)`` product
    instead of an ``(N, C)`` difference. ``points_sq``: the points' squared norms ``(N,)``."""
    cross = (points @ centers.T).gather(1, labels[:, None])[:, 0].double()  # (N,)
    own = _squared_norms(centers).double()[labels]
    return float((points_sq.double() - 2 * cross + own).sum())


def _nearest_centers(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``(N,)`` index of each point's nearest centre by ``|c|^2 - 2 x.c`` (float32)."""
    return (_squared_norms(centers)[None] - 2 * (points @ centers.T)).argmin(1)


def _mean_centers(
    points: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
) -> torch.Tensor:
    """The new centres of one Lloyd step, empty clusters relocated as scikit-learn does."""
    k = centers.shape[0]
    sizes = torch.bincount(labels, minlength=k).to(points.dtype)  # (K,)
    sums = _cluster_sums(points, labels, k)  # (K, C)
    empty = torch.nonzero(sizes == 0).flatten()
    if empty.numel():
        # the points farthest from their (old) centres, farthest first
        far = ((points - centers[labels]) ** 2).sum(1).topk(int(empty.numel())).indices
        for new_id, index in zip(empty.tolist(), far.tolist(), strict=True):
            old_id = int(labels[index])
            sums[old_id] -= points[index]
            sums[new_id] = points[index]
            sizes[new_id] += 1
            sizes[old_id] -= 1
    reciprocal = (1.0 / sizes.double()).to(points.dtype)  # float32, as _average_centers
    return torch.where(sizes[:, None] > 0, sums * reciprocal[:, None], centers)


def _check_points(points: torch.Tensor, k: int) -> None:
    """k-means' input: ``(N, C)`` points and ``1 <= k <= N``."""
    if points.ndim != 2:
        raise ValueError(f"points must be (N, C), got {tuple(points.shape)}")
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ConfigError(f"k-means needs 1 <= k <= number of points ({count}), got k={k}")


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
    _check_points(points, k)
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


SklearnVersion = Literal["1.2", "1.3"]


def sklearn_kmeans(
    points: torch.Tensor,
    k: int,
    *,
    seed: int | None = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    version: SklearnVersion = "1.2",
) -> KMeansResult:
    """scikit-learn's ``KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol,
    random_state=seed)`` (Lloyd, k-means++) re-implemented in torch on the points' device, its
    random draws included: a ``numpy.random.RandomState(seed)`` drawn in scikit-learn's order.

    As ``KMeans.fit``: the tolerance is ``tol`` times the mean per-feature variance of the
    points, the points are centred, each of the ``n_init`` runs seeds with k-means++
    (:func:`sklearn_plusplus`) and iterates (:func:`_lloyd`), and a later run replaces the best
    one only with a lower inertia and a different partition (``_is_same_clustering``).
    ``version``: whose draws: ``"1.2"``, the scikit-learn the released script pinned (the first
    centre from ``randint``), or ``"1.3"``, scikit-learn 1.3 and later (from ``choice`` with
    the sample weights). Distances are computed as scikit-learn computes them; sums and products
    run in another order, so a label can differ where two centres are equally near up to float32
    rounding (tests/test_clustering.py compares both on real photos).

    Args:
        points: ``(N, C)`` feature vectors (any float dtype; computed in float32).

    Returns:
        The best run: labels ``(N,)``, centres ``(k, C)`` (uncentred), inertia, iterations.
    """
    _check_points(points, k)
    if version not in ("1.2", "1.3"):
        raise ConfigError(f"scikit-learn draws of version '1.2' or '1.3', got {version!r}")
    points = points.float().contiguous()
    absolute_tol = tol * float(points.double().var(0, unbiased=False).mean()) if tol else 0.0
    mean = points.mean(0)
    centred = points - mean
    random_state = np.random.RandomState(seed)
    centred64 = centred.double()  # shared by every seeding
    norms64 = (centred64 * centred64).sum(1)
    centred_sq = _squared_norms(centred)
    best: KMeansResult | None = None
    for _ in range(max(1, n_init)):
        start = sklearn_plusplus(centred, k, random_state, version, (centred64, norms64))
        run = _lloyd(centred, start, max_iter, absolute_tol, centred_sq)
        if best is None or (
            run.inertia < best.inertia and not same_clustering(run.labels, best.labels, k)
        ):
            best = run
    assert best is not None  # n_init >= 1
    return KMeansResult(best.labels, best.centers + mean, best.inertia, best.iterations)


def _upcast_distances(
    points64: torch.Tensor, norms64: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Squared distances ``(len(rows), N)`` from the points at ``rows`` to every point, as
    scikit-learn's ``_euclidean_distances`` gives them for float32 data: in float64
    (``-2 a.b + |a|^2 + |b|^2``), rounded to float32, clamped at 0."""
    distances = -2 * (points64[rows] @ points64.T)
    distances += norms64[rows][:, None]
    distances += norms64[None]
    return distances.float().clamp_(min=0)


def sklearn_plusplus(
    points: torch.Tensor,
    k: int,
    random_state: np.random.RandomState,
    version: SklearnVersion = "1.2",
    float64: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """scikit-learn's greedy k-means++ seeding (``_kmeans_plusplus``) with its random draws.

    ``2 + int(log(k))`` candidates per new centre, drawn from ``random_state`` as scikit-learn
    draws them (``version``: see :func:`sklearn_kmeans`). Returns ``(k, C)`` rows of ``points``
    ``(N, C)`` float32 (already centred, as ``KMeans.fit`` seeds on centred data).
    ``float64``: the points in float64 and their squared norms, if already made.
    """
    count, device = points.shape[0], points.device
    trials = 2 + int(np.log(k))
    if float64 is None:
        points64 = points.double()
        float64 = points64, (points64 * points64).sum(1)
    points64, norms64 = float64
    if version == "1.2":
        first = int(random_state.randint(count))
    else:
        weights = np.ones(count, dtype=np.float32)
        first = int(random_state.choice(count, p=weights / weights.sum()))
    rows = [first]
    closest = _upcast_distances(points64, norms64, torch.tensor([first], device=device))[0]
    potential = closest.double().sum().float()
    for _ in range(1, k):
        draws = torch.from_numpy(random_state.uniform(size=trials)).to(device)
        if version == "1.2":  # stable_cumsum: float64
            cumulative = torch.cumsum(closest.double(), 0)
        else:  # numpy's float32 running sum (torch would accumulate in float64)
            cumulative = torch.from_numpy(np.cumsum(closest.cpu().numpy())).to(device).double()
        candidates = torch.searchsorted(cumulative, draws * potential.double())
        candidates = candidates.clamp_(max=count - 1)
        distances = torch.minimum(closest[None], _upcast_distances(points64, norms64, candidates))
        potentials = distances.double().sum(1).float()  # (trials,)
        best = int(potentials.argmin())
        potential, closest = potentials[best], distances[best]
        rows.append(int(candidates[best]))
    return points[torch.tensor(rows, device=device)]


def same_clustering(first: torch.Tensor, second: torch.Tensor, k: int) -> bool:
    """scikit-learn's ``_is_same_clustering``: whether every label of ``first`` (``(N,)``)
    always meets the same label of ``second``."""
    pairs = torch.unique(first * k + second)
    return bool(pairs.numel() == torch.unique(first).numel())


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


NORMALIZATIONS = ("none", "l2", "pca")


def normalize_points(points: torch.Tensor, how: str = "none", pca_dim: int = 64) -> torch.Tensor:
    """The feature vectors ``(N, C)`` float32 as clustering sees them (``clustering.normalize``).

    ``"none"``: as they are (the released script). ``"l2"``: each vector divided by its
    Euclidean norm (zero vectors stay zero), so k-means compares directions, as cosine
    similarity. ``"pca"``: centred and projected on the first ``min(pca_dim, N, C)`` principal
    components (an SVD of the centred points, in float64): ``(N, D)``, the components ordered by
    explained variance, each with the sign that makes its largest loading positive (as
    scikit-learn's ``svd_flip``), so the result is deterministic.
    """
    if how == "none":
        return points
    if how == "l2":
        return points / points.norm(dim=1, keepdim=True).clamp_min(torch.finfo(points.dtype).tiny)
    if how == "pca":
        if pca_dim < 1:
            raise ConfigError(f"clustering.pca_dim must be at least 1, got {pca_dim}")
        centred = (points - points.mean(0)).double()
        _, _, right = torch.linalg.svd(centred, full_matrices=False)  # (min(N, C), C)
        components = right[: min(pca_dim, *points.shape)]
        largest = components.abs().argmax(1)
        signs = torch.sign(components.gather(1, largest[:, None]))
        return (centred @ (components * signs).T).float()
    raise ConfigError(f"unknown clustering.normalize {how!r}; use " + ", ".join(NORMALIZATIONS))


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
        options: dict[str, Any] = {
            "seed": seed,
            "n_init": config.n_init,
            "max_iter": config.max_iter,
            "tol": config.tol,
        }
        if config.backend == "sklearn":
            return sklearn_kmeans_labels(points, k, **options)
        if config.backend == "torch":
            return _torch_kmeans_labels(points, k, **options)
        if config.backend in SKLEARN_DRAWS:
            return sklearn_kmeans(
                points, k, version=SKLEARN_DRAWS[config.backend], **options
            ).labels
        raise ConfigError(_unknown_backend(config.backend))
    if config.method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=k).fit_predict(points.cpu().numpy())
        return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(points.device)
    raise ConfigError(f"unknown clustering.method {config.method!r}; use kmeans or agglomerative")


# clustering.backend -> the scikit-learn version whose KMeans (draws included) it re-implements
SKLEARN_DRAWS: dict[str, SklearnVersion] = {"torch-sklearn-1.2": "1.2", "torch-sklearn": "1.3"}
BACKENDS = ("sklearn", "torch", *SKLEARN_DRAWS)


def _unknown_backend(name: str) -> str:
    return f"unknown clustering.backend {name!r}; use " + ", ".join(BACKENDS)


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
        if config.backend not in BACKENDS:
            raise ConfigError(_unknown_backend(config.backend))
        if config.upsample not in ("cv2-nearest", "nearest-exact"):
            raise ConfigError(
                f"unknown clustering.upsample {config.upsample!r}; use cv2-nearest or nearest-exact"
            )
        if config.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown clustering.normalize {config.normalize!r}; use "
                + ", ".join(NORMALIZATIONS)
            )
        if config.pca_dim < 1:
            raise ConfigError(f"clustering.pca_dim must be at least 1, got {config.pca_dim}")
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
