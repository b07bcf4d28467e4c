"""Write ``kmeans_sklearn12.npz``: scikit-learn 1.2.2's KMeans labels on real photo patches.

The released script pinned scikit-learn 1.2, whose k-means++ draws differ from scikit-learn 1.3
and later (its first centre comes from ``randint``, later ones from a float64 running sum).
tests/test_clustering.py compares ``clustering.sklearn_kmeans(version="1.2")`` with these
labels. To write them again, make an environment with that scikit-learn, then::

    python3 -m venv /tmp/sk12 && /tmp/sk12/bin/pip install "scikit-learn==1.2.2" "numpy<2"
    .venv/bin/python tests/golden/make_kmeans_sklearn12.py --sklearn12-python /tmp/sk12/bin/python

The points are 8x8 RGB patches every 16 pixels of five scikit-image photos, in [0, 1].
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")
KS = (2, 3, 4, 6)
SEEDS = (0, 1, 2, 3)
GOLDEN = Path(__file__).with_name("kmeans_sklearn12.npz")

_FIT = """
import sys
import numpy as np
import sklearn
from sklearn.cluster import KMeans
assert sklearn.__version__.startswith("1.2"), sklearn.__version__
points = np.load(sys.argv[1])
labels = {}
for name in points.files:
    for k in (2, 3, 4, 6):
        for seed in (0, 1, 2, 3):
            fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points[name])
            labels[f"{name}-{k}-{seed}"] = fit.labels_.astype(np.int8)
np.savez_compressed(sys.argv[2], **labels)
"""


def photo_patches(name: str, step: int = 16, size: int = 8) -> np.ndarray:
    """``(N, size * size * channels)`` float32 patches of the scikit-image photo ``name``."""
    from skimage import data

    image = getattr(data, name)().astype(np.float32) / 255
    if image.ndim == 2:
        image = image[..., None]
    rows = [
        image[y : y + size, x : x + size].ravel()
        for y in range(0, image.shape[0] - size, step)
        for x in range(0, image.shape[1] - size, step)
    ]
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sklearn12-python", required=True, help="python with scikit-learn 1.2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        points = Path(folder) / "points.npz"
        np.savez(points, **{name: photo_patches(name) for name in PHOTOS})
        subprocess.run([args.sklearn12_python, "-c", _FIT, str(points), str(GOLDEN)], check=True)
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
