"""Result adapters and files: transformers dicts, label PNGs, JSON, overlay, explain, COCO."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from freesegdiff.io.images import load_image
from freesegdiff.io.outputs import label_png, write_outputs
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
    import freesegdiff.io.outputs as outputs

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
    from freesegdiff.io.export import CocoResults

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


def test_label_ids_up_to_300_round_trip_exactly(tmp_path):
    """No ``mode=`` for Image.fromarray (Pillow 13 refuses "I;16" for uint16 data)."""
    import warnings

    label_map = np.arange(301, dtype=np.int32).reshape(7, 43)
    labels = {int(i): f"class {i}" for i in range(301)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow 12 warns where Pillow 13 raises
        big = label_png(label_map, labels)
        small = label_png(label_map % 200, {i: labels[i] for i in range(200)})
    assert big.mode == "I;16" and small.mode == "P"
    result = hand_made_result()
    result.label_map, result.labels, result.segments = label_map, labels, []
    written = write_outputs(result, None, tmp_path, stem="big")
    with Image.open(written["png"]) as png:
        assert np.array_equal(np.asarray(png), label_map)
    small.save(tmp_path / "small.png")
    with Image.open(tmp_path / "small.png") as png:
        assert np.array_equal(np.asarray(png), label_map % 200)


def _all_names(stems):
    from freesegdiff.io.outputs import output_names

    return [name.casefold() for stem in stems for name in output_names(stem).values()]


def test_stems_keep_their_extension_where_two_images_would_share_a_file():
    from freesegdiff.io.outputs import assign_stems

    files = [
        ("", "x.jpg"),  # x.jpg beside x.png: same stem
        ("", "x.png"),
        ("", "y.png"),  # y_overlay.png would be y's overlay and y_overlay.jpg's label map
        ("", "y_overlay.jpg"),
        ("", "z.png"),  # z_explain.png likewise with --explain
        ("", "z_explain.png"),
        ("", "failures.png"),  # failures.json is the run's own file
        ("", "coco_results.jpg"),
        ("", "Q.png"),  # case-insensitive file systems: one file
        ("", "q.jpg"),
        ("sub", "x.png"),  # alone in its folder
        ("sub", "failures.png"),  # run files are at the top only
        ("", "alone.png"),
    ]
    stems = assign_stems(files)
    assert stems == [
        "x.jpg",
        "x.png",
        "y.png",
        "y_overlay.jpg",
        "z.png",
        "z_explain.png",
        "failures.png",
        "coco_results.jpg",
        "Q.png",
        "q.jpg",
        "x",
        "failures",
        "alone",
    ]
    assert assign_stems(files) == stems  # deterministic
    top = [stem for (folder, _), stem in zip(files, stems, strict=True) if folder == ""]
    names = _all_names(top)
    assert len(names) == len(set(names))  # no two images share a file
    assert not {"failures.json", "coco_results.json", "index.html"} & set(names)


def test_the_same_name_from_two_inputs_is_numbered_in_order():
    from freesegdiff.io.outputs import assign_stems

    files = [("", "x.png"), ("", "x.png"), ("", "x.png-2.png"), ("", "x.png")]
    stems = assign_stems(files)
    assert stems[0] == "x.png" and stems[1] == "x.png-2"
    names = _all_names(stems)
    assert len(names) == len(set(names))


def test_the_json_is_written_last_and_a_failed_write_abandons_the_image(tmp_path, monkeypatch):
    import os

    import freesegdiff.io.outputs as outputs
    from freesegdiff.io.outputs import outputs_complete

    result = hand_made_result()
    image = np.full((2, 3, 3), 100, np.uint8)
    renames: list[str] = []
    real_replace = os.replace

    def replace(source, target):
        renames.append(os.path.basename(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    write_outputs(result, image, tmp_path, stem="x")
    assert renames == ["x.png", "x_overlay.png", "x.json"]
    assert outputs_complete(tmp_path, "x")

    def broken_overlay(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(outputs, "render_overlay", broken_overlay)
    with pytest.raises(OSError, match="no space"):
        write_outputs(result, image, tmp_path, stem="x")
    # the old JSON went first, the new label map again: nothing of x looks complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_overlay.png"]
    assert not outputs_complete(tmp_path, "x")


def test_outputs_are_complete_only_with_every_file_of_these_settings(tmp_path):
    from freesegdiff.io.outputs import outputs_complete

    result = hand_made_result()
    result.source = "photos/x.png"
    write_outputs(result, np.full((2, 3, 3), 100, np.uint8), tmp_path, stem="x")
    assert outputs_complete(tmp_path, "x", source="photos/x.png")
    assert not outputs_complete(tmp_path, "x", source="photos/other.png")  # another image
    assert not outputs_complete(tmp_path, "x", explain=True)  # no explain figure
    assert not outputs_complete(tmp_path, "x", overlay=False)  # the JSON lists an overlay
    (tmp_path / "x_overlay.png").unlink()
    assert not outputs_complete(tmp_path, "x")
    result.source = None
    write_outputs(result, None, tmp_path, stem="y")  # no image: no overlay
    assert outputs_complete(tmp_path, "y", overlay=False)
    (tmp_path / "y.json").write_text('{"files": ')  # cut short (not by freesegdiff)
    assert not outputs_complete(tmp_path, "y", overlay=False)
    assert not outputs_complete(tmp_path, "missing")


def test_failures_json_is_written_and_a_stale_one_removed(tmp_path):
    from freesegdiff.io.outputs import write_failures

    path = write_failures(tmp_path, {"b.jpg": "cannot read", "a/locked": "cannot list"})
    assert json.loads(path.read_text()) == {
        "failed": {"a/locked": "cannot list", "b.jpg": "cannot read"},
        "count": 2,
    }
    assert write_failures(tmp_path, {}) is None and not path.exists()


def test_an_output_folder_that_cannot_be_used_is_a_config_error(tmp_path):
    from freesegdiff.errors import ConfigError
    from freesegdiff.io.outputs import prepare_output_folder

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_output_folder(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot create the output folder"):
        prepare_output_folder(tmp_path / "file" / "below")
    made = prepare_output_folder(tmp_path / "new" / "out")
    assert made.is_dir() and list(made.iterdir()) == []  # the probe is gone


def test_saved_files_give_back_the_same_coco_entries(tmp_path):
    pytest.importorskip("pycocotools", reason="COCO output needs pycocotools")
    from freesegdiff.io.export import coco_entries
    from freesegdiff.io.saved import read_saved_result

    result = hand_made_result()
    result.segments[0].score = 0.123456789  # rounded alike in the JSON and the COCO entry
    write_outputs(result, None, tmp_path, stem="x")
    assert coco_entries("x", read_saved_result(tmp_path, "x")) == coco_entries("x", result)


def test_the_explain_figure_shows_timings_only_when_asked(tmp_path):
    """Off by default, so the figure's bytes do not change with the timings."""
    pytest.importorskip("matplotlib", reason="the explain figure needs matplotlib")
    from freesegdiff.io.visualize.explain import write_explain

    result = hand_made_result()
    image = np.full((2, 3, 3), 100, np.uint8)

    def figure(name, seconds, **options):
        result.timings = {"unet": seconds}
        return write_explain(result, image, tmp_path, name, dpi=30, **options).read_bytes()

    assert figure("a", 0.5) == figure("b", 1.75)
    assert figure("c", 0.5, timings=True) != figure("d", 1.75, timings=True)
