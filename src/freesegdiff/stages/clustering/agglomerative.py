"""Agglomerative clustering (``clustering.method = "agglomerative"``): scikit-learn's Ward
linkage on the CPU, for the ablations."""

from __future__ import annotations

import numpy as np
import torch

from freesegdiff.config import ClusterConfig


def agglomerative_labels(
    points: torch.Tensor, k: int, config: ClusterConfig, seed: int | None
) -> torch.Tensor:
    """Labels ``(N,)`` int64 of scikit-learn's ``AgglomerativeClustering(n_clusters=k)`` (Ward)
    on ``points`` ``(N, C)``, returned on the points' device (deterministic: no seed)."""
    from sklearn.cluster import AgglomerativeClustering

    labels = AgglomerativeClustering(n_clusters=k).fit_predict(points.cpu().numpy())
    return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(points.device)
