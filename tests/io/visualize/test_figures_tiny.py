"""Every picture and export made from a real (tiny, random) pipeline result of a bundled photo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freesegdiff.demo.app import bundled_examples
from freesegdiff.io.export import CocoResults, decode_rle
from freesegdiff.io.images import load_image
from freesegdiff.io.visualize.index_page import write_index_page
from freesegdiff.io.visualize.overlay import render_overlay
from freesegdiff.result import SegmentationResult

pytest.importorskip("matplotlib", reason="the explain figure needs matplotlib")


@pytest.fixture(scope="module")
def tiny_cat() -> tuple[np.ndarray, SegmentationResult]:
    from freesegdiff.pipeline import FreeSegDiff

    photo = next(path for path in bundled_examples() if path.name == "cat.jpg")
    pipe = FreeSegDiff.from_preset("tiny", device="cpu")
    return load_image(photo), pipe(photo)


def test_figures_coco_and_index_from_a_tiny_run(
    tmp_path: Path, tiny_cat: tuple[np.ndarray, SegmentationResult]
) -> None:
    from freesegdiff.io.visualize.explain import write_explain

    image, result = tiny_cat
    assert result.segments, "the tiny preset names at least one cluster of the cat photo"
    render_overlay(image, result).save(tmp_path / "cat_overlay.png")
    explain = write_explain(result, image, tmp_path, "cat")
    with Image.open(explain) as figure:
        assert figure.width >= 1000 and figure.height >= 1000

    coco = CocoResults()
    coco.add("cat", result)
    entries = json.loads(coco.write(tmp_path).read_text())
    rebuilt = np.zeros_like(result.label_map)
    ids = {segment.label: segment.id for segment in result.segments}
    for entry in entries:
        assert entry["image_id"] == "cat"
        rebuilt[decode_rle(entry["segmentation"])] = ids[entry["category_name"]]
    assert (rebuilt == result.label_map).all()

    page = write_index_page(tmp_path).read_text(encoding="utf-8")
    assert 'href="cat_explain.png"' in page and 'href="coco_results.json"' in page
