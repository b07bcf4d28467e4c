"""k-means, the method's clustering (``clustering.method = "kmeans"``), in four backends.

The backends (``ClusterConfig.backend``):

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


def _sklearn_draws_labels(version: SklearnVersion) -> Any:
    def labels(points: torch.Tensor, k: int, **options: Any) -> torch.Tensor:
        return sklearn_kmeans(points, k, version=version, **options).labels

    return labels


# clustering.backend -> the scikit-learn version whose KMeans (draws included) it re-implements
SKLEARN_DRAWS: dict[str, SklearnVersion] = {"torch-sklearn-1.2": "1.2", "torch-sklearn": "1.3"}
# clustering.backend -> the k-means that runs: labels (N,) of points (N, C) into k clusters
BACKENDS: dict[str, Any] = {
    "sklearn": sklearn_kmeans_labels,
    "torch": _torch_kmeans_labels,
    **{name: _sklearn_draws_labels(version) for name, version in SKLEARN_DRAWS.items()},
}


def kmeans_labels(
    points: torch.Tensor, k: int, config: ClusterConfig, seed: int | None
) -> torch.Tensor:
    """``clustering.method = "kmeans"``: labels ``(N,)`` int64 of ``points`` ``(N, C)`` into
    ``k`` clusters by the k-means of ``config.backend`` (the module docstring)."""
    run = BACKENDS[config.backend]
    labels: torch.Tensor = run(
        points, k, seed=seed, n_init=config.n_init, max_iter=config.max_iter, tol=config.tol
    )
    return labels
