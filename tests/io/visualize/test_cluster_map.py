"""Cluster map pictures: one fixed colour per cluster index."""

from __future__ import annotations

import numpy as np

from freesegdiff.io.visualize.cluster_map import cluster_color, render_cluster_map


def test_cluster_map_colours_by_index() -> None:
    cluster_map = np.array([[0, 1], [2, -1]], dtype=np.int32)
    picture = np.asarray(render_cluster_map(cluster_map))
    assert picture.shape == (2, 2, 3)
    assert picture[0, 0].tolist() == [31, 119, 180]  # tab10 blue
    assert picture[0, 1].tolist() == [255, 127, 14]  # tab10 orange
    assert picture[1, 0].tolist() == [44, 160, 44]  # tab10 green
    assert picture[1, 1].tolist() == [0, 0, 0]  # no cluster


def test_clusters_beyond_the_table_get_distinct_stable_colours() -> None:
    assert cluster_color(25) == cluster_color(25)
    assert cluster_color(25) != cluster_color(26)
