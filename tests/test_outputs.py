"""Result adapters and files: transformers dicts, label PNGs, JSON, overlay, explain, COCO."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from freesegdiff.image_io import load_image
from freesegdiff.outputs import label_png, write_outputs
from freesegdiff.result import Segment, SegmentationResult


def hand_made_result() -> SegmentationResult:
    label_map = np.array([[0, 2, 2], [1, 1, 0]], dtype=np.int32)
    segments = [
        Segment(id=2, label="cat", score=0.75, area=2, mask=label_map == 2, cluster=0),
        Segment(id=1, label="sofa", score=0.5, area=2, mask=label_map == 1, cluster=1),
    ]
    return SegmentationResult(
        label_map=label_map,
        labels={0: "background", 2: "cat", 1: "sofa"},
        segments=segments,
        caption="a cat on a sofa",
        entities=["cat", "sofa"],
        vocabulary=["sofa", "cat"],
        candidates=["sofa", "cat"],
        cluster_map=np.array([[2, 0, 0], [1, 1, 2]], dtype=np.int32),
        scores=np.array([[0.2, 0.5, 0.1], [0.75, 0.5, 0.9]], np.float32),
        cluster_labels=[1, 0, -1],
        coarse_masks=np.zeros((3, 2, 3), bool),
        refined_masks=np.zeros((3, 2, 3), bool),
        timings={"unet": 0.5},
        source=None,
        image_size=(3, 2),
    )


def test_to_hf_gives_transformers_segmentation_dicts():
    entries = hand_made_result().to_hf()
    assert [(e["label"], e["score"]) for e in entries] == [("cat", 0.75), ("sofa", 0.5)]
    assert entries[0]["mask"].mode == "L"
    assert np.asarray(entries[0]["mask"]).tolist() == [[0, 255, 255], [0, 0, 0]]


def test_files_hold_exactly_the_ids_of_the_json(tmp_path):
    result = hand_made_result()
    image = np.full((2, 3, 3), 100, np.uint8)
    written = result.save(tmp_path, stem="x", image=image)
    assert sorted(written) == ["json", "overlay", "png"]
    png = Image.open(tmp_path / "x.png")
    assert png.mode == "P" and np.asarray(png).tolist() == [[0, 2, 2], [1, 1, 0]]
    summary = json.loads((tmp_path / "x.json").read_text())
    assert summary["labels"] == [
        {"id": 0, "name": "background", "score": None, "area": 2},
        {"id": 2, "name": "cat", "score": 0.75, "area": 2},
        {"id": 1, "name": "sofa", "score": 0.5, "area": 2},
    ]
    assert summary["caption"] == "a cat on a sofa" and summary["width"] == 3
    assert summary["files"] == {"png": "x.png", "overlay": "x_overlay.png"}


def test_no_image_means_no_overlay(tmp_path):
    written = write_outputs(hand_made_result(), None, tmp_path, stem="y")
    assert sorted(written) == ["json", "png"]


def test_ids_above_255_are_written_as_16_bit(tmp_path):
    label_map = np.array([[0, 300], [70000 - 69000, 2]], dtype=np.int32)
    image = label_png(label_map, {0: "background", 300: "x", 1000: "y", 2: "z"})
    assert image.mode == "I;16"
    image.save(tmp_path / "big.png")
    assert np.asarray(Image.open(tmp_path / "big.png")).tolist() == [[0, 300], [1000, 2]]


def test_write_outputs_reads_the_source_once_for_overlay_and_explain(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the explain figure needs matplotlib")
    import freesegdiff.outputs as outputs

    result = hand_made_result()
    result.source = str(tmp_path / "photo.png")
    Image.fromarray(np.full((2, 3, 3), 100, np.uint8)).save(result.source)
    reads = []
    monkeypatch.setattr(
        outputs, "load_image", lambda image: reads.append(image) or load_image(image)
    )
    written = write_outputs(result, None, tmp_path / "out", explain=True)
    assert sorted(written) == ["explain", "json", "overlay", "png"]
    assert reads == [result.source]
    assert written["explain"].name == "photo_explain.png" and written["explain"].is_file()


def test_write_outputs_uses_the_image_in_memory_and_collects_coco(tmp_path, monkeypatch):
    pytest.importorskip("pycocotools", reason="COCO output needs pycocotools")
    from freesegdiff.export import CocoResults

    result = hand_made_result()
    result.source = str(tmp_path / "never-read.png")  # no such file: the array is used
    coco = CocoResults()
    written = write_outputs(
        result,
        np.full((2, 3, 3), 100, np.uint8),
        tmp_path,
        formats=["png", "coco-rle"],
        coco=coco,
    )
    assert sorted(written) == ["json", "overlay", "png"]
    assert written["png"].name == "never-read.png"
    assert [entry["category_name"] for entry in coco.entries()] == ["cat", "sofa"]
    assert {entry["image_id"] for entry in coco.entries()} == {"never-read"}
    only_coco = write_outputs(result, None, tmp_path / "c", formats=["coco-rle"], coco=coco)
    assert only_coco == {} and len(coco.entries()) == 4


def test_write_outputs_says_what_is_wrong(tmp_path):
    result = hand_made_result()
    with pytest.raises(ValueError, match="unknown output formats"):
        write_outputs(result, None, tmp_path, formats=["tiff"])
    with pytest.raises(ValueError, match="pass coco="):
        write_outputs(result, None, tmp_path, formats=["coco-rle"])
    with pytest.raises(ValueError, match="the explain figure needs the image"):
        write_outputs(result, None, tmp_path, explain=True)
    with pytest.raises(ValueError, match="pass the image that was segmented"):
        write_outputs(result, np.zeros((5, 5, 3), np.uint8), tmp_path)
