"""k-means, silhouette and K selection checked against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import silhouette_score as sklearn_silhouette

from freesegdiff.config import ClusterConfig
from freesegdiff.errors import ConfigError
from freesegdiff.stages.clustering import (
    cluster_features,
    cv2_nearest_indices,
    silhouette_score,
    upsample_cluster_map,
)
from freesegdiff.stages.clustering.kmeans import kmeans, sklearn_kmeans_labels


def blobs(seed: int = 0, centres: int = 3, per: int = 100, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = [rng.normal(size=(per, dim)) + 6 * rng.normal(size=dim) for _ in range(centres)]
    return np.concatenate(points).astype(np.float32)


def test_lloyd_matches_scikit_learn_from_the_same_start():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(1024, 64)).astype(np.float32)
    points[:300] += 2.0
    start = points[rng.choice(1024, 4, replace=False)]
    reference = KMeans(4, init=start, n_init=1).fit(points)
    ours = kmeans(torch.from_numpy(points), 4, init=torch.from_numpy(start))
    assert np.array_equal(ours.labels.numpy(), reference.labels_)
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-5)
    assert ours.iterations == reference.n_iter_
    assert np.allclose(ours.centers.numpy(), reference.cluster_centers_, atol=1e-4)


def test_seeded_kmeans_finds_the_same_partition_as_scikit_learn():
    points = blobs(seed=2, centres=4)
    ours = kmeans(torch.from_numpy(points), 4, seed=0)
    reference = KMeans(4, random_state=0).fit(points)
    assert adjusted_rand_score(reference.labels_, ours.labels.numpy()) == 1.0
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-4)


def test_kmeans_is_deterministic_per_seed():
    points = torch.from_numpy(np.random.default_rng(3).normal(size=(500, 8)).astype(np.float32))
    a = kmeans(points, 5, seed=4)
    b = kmeans(points, 5, seed=4)
    assert torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia


def test_kmeans_by_hand_on_four_points():
    # Two pairs on a line: {0, 1} and {10, 11}; centres 0.5 and 10.5, inertia 4 * 0.25 = 1.
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    result = kmeans(points, 2, init=torch.tensor([[0.0], [11.0]]))
    assert result.labels.tolist() == [0, 0, 1, 1]
    assert result.centers.flatten().tolist() == [0.5, 10.5]
    assert result.inertia == pytest.approx(1.0)


def test_kmeans_rejects_impossible_k():
    with pytest.raises(ConfigError, match="1 <= k <= number of points"):
        kmeans(torch.zeros(3, 2), 4)


def test_silhouette_matches_scikit_learn():
    points = blobs(seed=5)
    labels = KMeans(3, random_state=0).fit_predict(points)
    labels[:5] = 0  # some misassigned points, so scores are not all near 1
    ours = silhouette_score(torch.from_numpy(points), torch.from_numpy(labels))
    assert ours == pytest.approx(sklearn_silhouette(points, labels), abs=1e-5)


def test_silhouette_by_hand():
    # Clusters {0, 1} and {5}: point 0: a=1, b=5 -> 0.8; point 1: a=1, b=4 -> 0.75;
    # the singleton scores 0. Mean = 1.55 / 3.
    points = torch.tensor([[0.0], [1.0], [5.0]])
    assert silhouette_score(points, torch.tensor([0, 0, 1])) == pytest.approx(1.55 / 3)


def test_k_range_picks_the_true_number_of_blobs():
    points = blobs(seed=6, centres=3, per=64)  # 192 points
    features = torch.from_numpy(points).T.reshape(16, 12, 16)  # (C, h, w)
    cluster_map = cluster_features(features, ClusterConfig(k_range=(2, 6)))
    assert cluster_map.shape == (12, 16)
    assert torch.unique(cluster_map).numel() == 3


def test_adaptive_k_is_candidates_plus_offset():
    features = torch.from_numpy(blobs(seed=7, centres=5, per=20)).T.reshape(16, 10, 10)
    cluster_map = cluster_features(features, ClusterConfig(adaptive_offset=2), candidates=3)
    assert torch.unique(cluster_map).numel() == 5


def test_agglomerative_alternative_separates_blobs():
    points = blobs(seed=8, centres=2, per=50)
    features = torch.from_numpy(points).T.reshape(16, 10, 10)
    cluster_map = cluster_features(features, ClusterConfig(method="agglomerative", k=2))
    truth = np.repeat([0, 1], 50)
    assert adjusted_rand_score(truth, cluster_map.flatten().numpy()) == 1.0


def test_upsample_is_nearest_neighbour():
    small = torch.tensor([[0, 1], [2, 3]])
    big = upsample_cluster_map(small, 4, 6)
    expected = torch.tensor(
        [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [2, 2, 2, 3, 3, 3]]
    )
    assert torch.equal(big, expected)


def test_squared_distances_with_known_norms_are_the_same_values():
    from freesegdiff.stages.clustering.kmeans import _squared_distances, _squared_norms

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(50, 16, generator=generator)
    centers = points[[3, 17, 41]]
    plain = _squared_distances(points, centers)
    norms = _squared_norms(points)
    assert torch.equal(_squared_distances(points, centers, norms, norms[[3, 17, 41]]), plain)
    brute = ((points[:, None] - centers[None]) ** 2).sum(-1)
    assert torch.allclose(plain, brute, atol=1e-4)


def test_cluster_sums_match_the_one_hot_product():
    from freesegdiff.stages.clustering.kmeans import _cluster_sums

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(200, 9, generator=generator)
    labels = torch.randint(0, 5, (200,), generator=generator)
    labels[:5] = torch.arange(5)  # every cluster has a member
    expected = torch.nn.functional.one_hot(labels, 5).float().T @ points
    assert torch.allclose(_cluster_sums(points, labels, 5), expected, atol=1e-5)
    assert torch.equal(_cluster_sums(points, labels, 5), _cluster_sums(points, labels, 5))


def test_kmeans_of_a_transposed_feature_map_equals_its_row_major_copy():
    generator = torch.Generator().manual_seed(1)
    feature_map = torch.randn(64, 12, 12, generator=generator)  # (C, h, w)
    view = feature_map.reshape(64, 144).T  # (h*w, C), column-major: as cluster_features sees it
    assert not view.is_contiguous()
    from_view = kmeans(view, 4, seed=0)
    from_copy = kmeans(view.contiguous(), 4, seed=0)
    assert torch.equal(from_view.labels, from_copy.labels)
    assert from_view.inertia == from_copy.inertia


# ---------------------------------------- the released k-means (docs/method.md, step 8)
def test_sklearn_backend_is_the_released_call_with_its_seed():
    """Point 3: KMeans(n_clusters=4, n_init=10, random_state=seed) of the installed
    scikit-learn, label for label."""
    points = blobs(seed=3, centres=5, per=40).astype(np.float32)  # 5 blobs for 4 clusters
    for seed in (0, 1, 7):
        ours = sklearn_kmeans_labels(torch.from_numpy(points), 4, seed=seed)
        theirs = KMeans(n_clusters=4, n_init=10, random_state=seed).fit(points).labels_
        assert ours.tolist() == theirs.tolist()
    features = torch.from_numpy(points).T.reshape(16, 10, 20)  # (C, h, w), as the pipeline
    cluster_map = cluster_features(features, ClusterConfig(backend="sklearn"), seed=1)
    expected = KMeans(n_clusters=4, n_init=10, random_state=1).fit(points).labels_
    assert cluster_map.flatten().tolist() == expected.tolist()


def test_ten_restarts_keep_the_lowest_inertia():
    """Restarts matter: on 5 blobs for 4 clusters single runs land in several optima; the
    default (10 runs) keeps the lowest inertia of its runs, as scikit-learn 1.2 did."""
    points = blobs(seed=3, centres=5, per=40).astype(np.float32)
    singles = [KMeans(4, n_init=1, random_state=s).fit(points).inertia_ for s in range(10)]
    assert len({round(value, 1) for value in singles}) > 1  # the optima differ
    best = KMeans(4, n_init=10, random_state=0).fit(points).inertia_
    assert best <= min(singles) + 1e-3 * best
    assert ClusterConfig().n_init == 10


def test_cv2_nearest_indices_equal_opencv():
    """Point 9: OpenCV's INTER_NEAREST from 32 to every size up to 700 (and a few small)."""
    cv2 = pytest.importorskip("cv2")
    source = np.arange(32 * 32, dtype=np.int32).reshape(32, 32)
    for height in [*range(1, 40), *range(40, 700, 13)]:
        width = 700 - height
        expected = cv2.resize(source, (width, height), interpolation=cv2.INTER_NEAREST)
        ours = upsample_cluster_map(torch.from_numpy(source), height, width)
        assert np.array_equal(ours.numpy(), expected), (height, width)


def test_cv2_nearest_differs_from_torch_nearest_on_some_sizes():
    """Why it is a setting: OpenCV multiplies by 1 / (target / source), torch by a float32
    source / target; e.g. 32 -> 375 rows pick a different source row at some positions."""
    differing = [
        size
        for size in range(33, 700)
        if not np.array_equal(
            cv2_nearest_indices(32, size),
            torch.nn.functional.interpolate(
                torch.arange(32.0)[None, None, :, None], size=(size, 1), mode="nearest"
            )[0, 0, :, 0]
            .long()
            .numpy(),
        )
    ]
    assert differing  # a few percent of sizes
    by_hand = cv2_nearest_indices(2, 5)  # floor(i * 0.4) for i = 0..4
    assert by_hand.tolist() == [0, 0, 0, 1, 1]


def test_nearest_exact_upsampling_is_centred():
    small = torch.tensor([[0, 1, 2]])
    assert upsample_cluster_map(small, 1, 5, "nearest-exact").tolist() == [[0, 0, 1, 2, 2]]
    assert upsample_cluster_map(small, 1, 5).tolist() == [[0, 0, 1, 1, 2]]  # floor(i * 0.6)
    with pytest.raises(ConfigError, match=r"clustering\.upsample must be one of"):
        ClusterConfig(upsample="bilinear")  # type: ignore[arg-type]  # checked once, here


# ------------------------- scikit-learn's KMeans re-implemented, draws included (step 8)
def test_torch_sklearn_1_2_gives_scikit_learn_1_2s_labels_on_real_photos():
    """``torch-sklearn-1.2`` (the default) against scikit-learn 1.2.2 itself, the version the
    released script pinned: labels written by tests/golden/make_kmeans_sklearn12.py on patches
    of five real photos; every K, seed and photo, label for label (cluster numbers included)."""
    from freesegdiff.stages.clustering.kmeans import sklearn_kmeans
    from golden.make_kmeans_sklearn12 import GOLDEN, PHOTOS, photo_patches

    golden = np.load(GOLDEN)
    checked = 0
    for name in PHOTOS:
        points = torch.from_numpy(photo_patches(name))
        for k in (3, 4):
            for seed in (0, 1, 2, 3):
                ours = sklearn_kmeans(points, k, seed=seed, version="1.2").labels
                assert ours.tolist() == golden[f"{name}-{k}-{seed}"].tolist(), (name, k, seed)
                checked += 1
    assert checked == 40
    assert ClusterConfig().backend == "torch-sklearn-1.2"


def test_torch_sklearn_gives_the_installed_scikit_learns_labels_on_real_photos():
    """``torch-sklearn`` (scikit-learn 1.3+'s draws) against the installed scikit-learn, live."""
    import sklearn

    from freesegdiff.stages.clustering.kmeans import sklearn_kmeans
    from golden.make_kmeans_sklearn12 import photo_patches

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    version = "1.2" if (major, minor) < (1, 3) else "1.3"
    for name in ("chelsea", "coffee", "camera"):
        points = photo_patches(name)
        for k, seed in ((3, 0), (4, 1), (6, 2)):
            theirs = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points).labels_
            ours = sklearn_kmeans(torch.from_numpy(points), k, seed=seed, version=version)
            assert ours.labels.tolist() == theirs.tolist(), (name, k, seed)


def test_the_two_draws_differ_and_the_backends_are_wired():
    """The versions' draws pick other centres (so the released numbers need 1.2's); each
    backend name runs the implementation it names."""
    from freesegdiff.stages.clustering.kmeans import sklearn_kmeans
    from golden.make_kmeans_sklearn12 import GOLDEN, photo_patches

    golden = np.load(GOLDEN)
    points = torch.from_numpy(photo_patches("astronaut"))
    newer = [sklearn_kmeans(points, 4, seed=s, version="1.3").labels for s in range(4)]
    assert any(a.tolist() != golden[f"astronaut-4-{s}"].tolist() for s, a in enumerate(newer))
    features = points.T.reshape(points.shape[1], 1, -1)  # (C, 1, N), as the pipeline's maps
    for backend, version in (("torch-sklearn-1.2", "1.2"), ("torch-sklearn", "1.3")):
        config = ClusterConfig(backend=backend)  # type: ignore[arg-type]
        labels = cluster_features(features, config, seed=2).flatten()
        assert labels.tolist() == sklearn_kmeans(points, 4, seed=2, version=version).labels.tolist()


# ------------------------------------------ normalisation before clustering (issue 12)
def test_l2_normalisation_gives_unit_vectors_and_keeps_zero_ones():
    from freesegdiff.stages.clustering import normalize_points

    points = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])
    assert torch.equal(normalize_points(points, "l2"), expected)
    assert normalize_points(points, "none") is points


def test_pca_equals_scikit_learns_pca_up_to_each_components_sign():
    """On real photo patches: the same projection as ``sklearn.decomposition.PCA``, component
    by component (a component's sign is a convention), with the largest loading positive."""
    from sklearn.decomposition import PCA

    from freesegdiff.stages.clustering import normalize_points
    from golden.make_kmeans_sklearn12 import photo_patches

    points = photo_patches("astronaut")  # (N, 192)
    ours = normalize_points(torch.from_numpy(points), "pca", pca_dim=8).numpy()
    theirs = PCA(n_components=8, svd_solver="full").fit_transform(points.astype(np.float64))
    assert ours.shape == (points.shape[0], 8)
    for column in range(8):
        sign = np.sign(np.dot(ours[:, column], theirs[:, column]))
        np.testing.assert_allclose(ours[:, column], sign * theirs[:, column], atol=1e-4)
    assert normalize_points(torch.from_numpy(points), "pca", pca_dim=500).shape[1] == 192


def test_normalisation_is_checked_and_reaches_the_clustering():
    from freesegdiff.stages.clustering import normalize_points

    with pytest.raises(ConfigError, match=r"clustering\.normalize"):
        ClusterConfig(normalize="zscore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pca_dim"):
        ClusterConfig(normalize="pca", pca_dim=0)
    points = torch.from_numpy(blobs(seed=3, centres=5, per=40).astype(np.float32))
    features = points.T.reshape(points.shape[1], 10, 20)
    config = ClusterConfig(normalize="l2", backend="torch-sklearn")
    expected = KMeans(4, n_init=10, random_state=0).fit(normalize_points(points, "l2").numpy())
    labels = cluster_features(features, config, seed=0).flatten()
    assert labels.tolist() == expected.labels_.tolist()
