"""COCO RLE results and the supervision adapter, read back with the tools that consume them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from freesegdiff.io.export import (
    CocoResults,
    category_ids,
    coco_results,
    decode_rle,
    encode_rle,
    to_supervision,
    write_coco_results,
)
from freesegdiff.result import Segment, SegmentationResult

mask_api = pytest.importorskip("pycocotools.mask", reason="COCO output needs pycocotools")


def _result(
    label_map: np.ndarray, names: dict[int, str], scores: dict[int, float]
) -> SegmentationResult:
    label_map = np.asarray(label_map, dtype=np.int32)
    segments = [
        Segment(
            id=i,
            label=names[i],
            score=scores[i],
            area=int((label_map == i).sum()),
            mask=label_map == i,
            cluster=i,
        )
        for i in sorted(names)
    ]
    empty = np.zeros((0, *label_map.shape), dtype=bool)
    return SegmentationResult(
        label_map=label_map,
        labels={0: "background", **names},
        segments=segments,
        caption=None,
        entities=[],
        vocabulary=[names[i] for i in sorted(names)],
        candidates=[],
        cluster_map=label_map.copy(),
        scores=np.zeros((len(names), 0), dtype=np.float32),
        cluster_labels=[],
        coarse_masks=empty,
        refined_masks=empty,
        image_size=(label_map.shape[1], label_map.shape[0]),
    )


@pytest.fixture
def two_images() -> list[tuple[str, SegmentationResult]]:
    first = np.zeros((6, 7), dtype=np.int32)
    first[1:4, 1:3] = 1  # dog: 6 px
    first[2:6, 4:7] = 2  # cat: 12 px
    second = np.zeros((5, 4), dtype=np.int32)
    second[0:2, :] = 1  # cat: 8 px
    return [
        ("street", _result(first, {1: "dog", 2: "cat"}, {1: 0.75, 2: 0.5})),
        ("sofa", _result(second, {1: "cat"}, {1: 0.9})),
    ]


def test_rle_round_trip_keeps_the_mask_and_is_text() -> None:
    mask = np.zeros((5, 3), dtype=bool)
    mask[1:4, 1] = True
    rle = encode_rle(mask)
    assert rle["size"] == [5, 3] and isinstance(rle["counts"], str)
    json.dumps(rle)  # plain JSON
    assert (decode_rle(rle) == mask).all()
    assert int(mask_api.area({**rle, "counts": rle["counts"].encode()})) == 3


def test_category_ids_follow_the_classes_then_the_alphabet() -> None:
    assert category_ids(["zebra", "cat", "ant"]) == {"ant": 1, "cat": 2, "zebra": 3}
    assert category_ids(["zebra", "cat"], classes=["dog", "cat"]) == {
        "dog": 1,
        "cat": 2,
        "zebra": 3,
    }


def test_a_name_has_one_id_across_images_whatever_their_order(
    two_images: list[tuple[str, SegmentationResult]],
) -> None:
    forward = coco_results(two_images)
    backward = coco_results(list(reversed(two_images)))
    ids = {(e["image_id"], e["category_name"]): e["category_id"] for e in forward}
    assert ids == {("street", "dog"): 2, ("street", "cat"): 1, ("sofa", "cat"): 1}
    assert ids == {(e["image_id"], e["category_name"]): e["category_id"] for e in backward}
    assert [e["score"] for e in forward] == [0.75, 0.5, 0.9]


def test_coco_file_loads_in_pycocotools_and_decodes_to_the_label_maps(
    tmp_path: Path, two_images: list[tuple[str, SegmentationResult]]
) -> None:
    from pycocotools.coco import COCO

    coco = CocoResults()
    for image_id, result in two_images:
        coco.add(image_id, result)
    path = coco.write(tmp_path)
    assert path == tmp_path / "coco_results.json"

    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [
            {"id": image_id, "height": r.label_map.shape[0], "width": r.label_map.shape[1]}
            for image_id, r in two_images
        ],
        "categories": coco.categories(),
        "annotations": [],
    }
    ground_truth.createIndex()
    loaded = ground_truth.loadRes(str(path))
    names = {c["id"]: c["name"] for c in coco.categories()}
    for image_id, result in two_images:
        annotations = loaded.loadAnns(loaded.getAnnIds(imgIds=[image_id]))
        assert len(annotations) == len(result.segments)
        rebuilt = np.zeros_like(result.label_map)
        by_name = {name: i for i, name in result.labels.items()}
        for annotation in annotations:
            rebuilt[loaded.annToMask(annotation) > 0] = by_name[names[annotation["category_id"]]]
        assert (rebuilt == result.label_map).all()
    areas = sorted(a["area"] for a in loaded.dataset["annotations"])
    assert areas == [6, 8, 12]


def test_write_coco_results_with_a_closed_vocabulary(
    tmp_path: Path, two_images: list[tuple[str, SegmentationResult]]
) -> None:
    path = write_coco_results(two_images, tmp_path, classes=["cat", "dog", "bird"])
    entries = json.loads(path.read_text())
    assert {(e["category_name"], e["category_id"]) for e in entries} == {("cat", 1), ("dog", 2)}


def test_empty_segments_are_left_out() -> None:
    result = _result(np.zeros((3, 3), dtype=np.int32), {1: "cat"}, {1: 0.5})
    assert coco_results([("empty", result)]) == []


def test_to_supervision_without_the_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, two_images: list[tuple[str, SegmentationResult]]
) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(ImportError, match="pip install supervision"):
        to_supervision(two_images[0][1])


def test_to_supervision_boxes_masks_and_names(
    two_images: list[tuple[str, SegmentationResult]],
) -> None:
    supervision = pytest.importorskip("supervision")
    result = two_images[0][1]
    detections = to_supervision(result)
    assert isinstance(detections, supervision.Detections)
    assert detections.xyxy.tolist() == [[1, 1, 2, 3], [4, 2, 6, 5]]
    assert (detections.xyxy == supervision.mask_to_xyxy(detections.mask)).all()
    assert detections.class_id.tolist() == [1, 2]
    assert detections.data["class_name"].tolist() == ["dog", "cat"]
    assert detections.confidence.tolist() == [0.75, 0.5]
