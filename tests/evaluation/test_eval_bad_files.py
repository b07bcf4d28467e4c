"""The eval loop on broken inputs: every bad file is reported for its image and the run goes on.

Ground truth of the wrong size or unreadable (a decompression bomb too), cached predictions of
the wrong size or values, predictions of the wrong size, and an image whose header claims
20000x20000 pixels, this last one through the real tiny pipeline in a subprocess with a timeout
(its failure once killed the reader thread and hung the run).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from freesegdiff import cli
from freesegdiff.evaluation.datasets import DatasetError, open_dataset
from freesegdiff.evaluation.grounding import Grounder
from freesegdiff.evaluation.runner import evaluate, pipeline_predictor, prediction_palette
from freesegdiff.evaluation.synthetic import write_synthetic_dataset

V = 255
SUBPROCESS_TIMEOUT = 300  # seconds: a hang fails the test instead of the whole suite


def write_palette_png(path: Path, label: np.ndarray) -> None:
    png = Image.fromarray(label.astype(np.uint8))  # mode L
    png.putpalette(prediction_palette())  # -> P, values kept
    png.save(path)


def write_bomb_png(path: Path, size: tuple[int, int] = (20000, 20000)) -> None:
    """A tiny PNG whose header (IHDR) claims ``size``: Pillow refuses to open it."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"  # after the signature and the chunk's length
    data[16:24] = struct.pack(">II", *size)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def voc_folder(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def label_path(root: Path, image_id: str) -> Path:
    return voc_folder(root) / "SegmentationClass" / f"{image_id}.png"


def image_path(root: Path, image_id: str) -> Path:
    return voc_folder(root) / "JPEGImages" / f"{image_id}.jpg"


def perfect_predictor(truth: dict[str, np.ndarray], asked: list[str] | None = None, shape=None):
    """Predicts the ground truth (void as background); ``shape`` forces another size."""

    def make():
        def predict(samples):
            for sample in samples:
                if asked is not None:
                    asked.append(sample.image_id)
                label = np.where(truth[sample.image_id] == V, 0, truth[sample.image_id])
                if shape is not None:
                    label = np.zeros(shape, dtype=np.uint8)
                yield sample, label.astype(np.uint8), 0.1

        return predict

    return make


@pytest.fixture
def voc(tmp_path):
    """Three 40x30 VOC images with their expected labels."""
    return write_synthetic_dataset("voc21", tmp_path / "data", num_images=3)


def test_ground_truth_of_another_size_is_reported_naming_both_files(voc, tmp_path):
    bad = voc.image_ids[1]
    write_palette_png(label_path(voc.root, bad), np.zeros((20, 25), dtype=np.uint8))
    dataset = open_dataset("voc21", voc.root)
    asked: list[str] = []
    report = evaluate(
        dataset, tmp_path / "out", perfect_predictor(voc.labels, asked), progress=False
    )
    # the run went on: the two good images were predicted and score 100; the bad one was
    # neither predicted nor scored
    assert sorted(asked) == sorted(i for i in voc.image_ids if i != bad)
    assert report.images == 2 and report.scores.miou == 100.0
    assert list(report.failed) == [bad] and report.unscored == [bad]
    reason = report.failed[bad]
    assert str(label_path(voc.root, bad)) in reason and str(image_path(voc.root, bad)) in reason
    assert "25x20" in reason and "40x30" in reason
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failed"] == {bad: reason} and results["unscored"] == [bad]
    assert results["images"] == 2
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "unusable ground truth (not scored)" in markdown and f"`{bad}`" in markdown
    # re-scoring the cache reports it again and needs no predictor
    again = evaluate(dataset, tmp_path / "out", None, progress=False)
    assert again.failed == {bad: reason} and again.cached == 2


def test_a_coco_json_image_of_another_size_than_its_annotation_is_reported(tmp_path):
    pytest.importorskip("pycocotools")
    written = write_synthetic_dataset("coco-object", tmp_path, num_images=2, coco_source="json")
    bad = written.image_ids[0]
    Image.new("RGB", (41, 30)).save(written.root / "val2017" / f"{bad}.jpg")
    samples = {s.image_id: s for s in open_dataset("coco-object", tmp_path)}
    assert samples[written.image_ids[1]].error is None
    reason = str(samples[bad].error)
    assert "instances_val2017.json" in reason and f"{bad}.jpg" in reason
    assert "40x30" in reason and "41x30" in reason


def test_cli_summary_lists_each_failed_image_with_its_reason(voc, tmp_path, monkeypatch, capsys):
    bad = voc.image_ids[0]
    write_palette_png(label_path(voc.root, bad), np.zeros((30, 39), dtype=np.uint8))

    class Oracle:  # stands in for FreeSegDiff: "background" everywhere
        def iter_segment(self, paths, classes):
            for path in paths:
                with Image.open(path) as image:
                    width, height = image.size
                label_map = np.zeros((height, width), dtype=np.int32)
                yield path, SimpleNamespace(label_map=label_map, vocabulary=classes, timings={})

    monkeypatch.setattr(
        "freesegdiff.cli.common.pipeline_from_args", lambda args, runtime=None: Oracle()
    )
    out = tmp_path / "out"
    data = ["--dataset", "voc21", "--data-root", str(voc.root), "-o", str(out)]
    code = cli.main(["eval", "--preset", "tiny", "--no-progress", *data])
    assert code == 1
    printed = capsys.readouterr().out
    assert "1 images failed (0 scored as unpredicted, 1 not scored" in printed
    line = next(line for line in printed.splitlines() if line.strip().startswith(bad))
    assert "(not scored)" in line and "39x30" in line and "40x30" in line
    assert json.loads((out / "results.json").read_text())["images"] == 2


def test_unreadable_and_bomb_ground_truth_are_reported_per_image(voc, tmp_path):
    truncated, bomb = voc.image_ids[0], voc.image_ids[2]
    data = label_path(voc.root, truncated).read_bytes()
    label_path(voc.root, truncated).write_bytes(data[: len(data) // 2])
    write_bomb_png(label_path(voc.root, bomb))
    report = evaluate(
        open_dataset("voc21", voc.root),
        tmp_path / "out",
        perfect_predictor(voc.labels),
        progress=False,
    )
    assert sorted(report.failed) == sorted([truncated, bomb]) == sorted(report.unscored)
    assert str(label_path(voc.root, bomb)) in report.failed[bomb]
    assert "DecompressionBomb" in report.failed[bomb]
    assert str(label_path(voc.root, truncated)) in report.failed[truncated]
    assert report.images == 1 and report.scores.miou == 100.0


@pytest.mark.parametrize(
    "damage",
    ["smaller", "transposed", "values", "rgb", "truncated", "bomb"],
)
def test_a_cached_prediction_that_cannot_be_scored_is_predicted_again(voc, tmp_path, damage):
    dataset = open_dataset("voc21", voc.root)
    out = tmp_path / "out"
    first = evaluate(dataset, out, perfect_predictor(voc.labels), progress=False)
    assert first.scores.miou == 100.0
    target = voc.image_ids[1]
    cached = out / "predictions" / f"{target}.png"
    if damage == "smaller":
        write_palette_png(cached, np.zeros((29, 40), dtype=np.uint8))
    elif damage == "transposed":
        write_palette_png(cached, np.zeros((40, 30), dtype=np.uint8))
    elif damage == "values":
        write_palette_png(cached, np.full((30, 40), 21, dtype=np.uint8))  # VOC ids are 0..20
    elif damage == "rgb":
        Image.new("RGB", (40, 30)).save(cached)
    elif damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:40])
    else:
        write_bomb_png(cached)
    asked: list[str] = []
    again = evaluate(dataset, out, perfect_predictor(voc.labels, asked), progress=False)
    assert asked == [target]
    assert (again.cached, again.predicted, again.failed) == (2, 1, {})
    assert again.scores.miou == 100.0
    with Image.open(cached) as image:
        assert image.size == (40, 30) and image.mode == "P"


def test_a_prediction_of_another_size_fails_its_image_and_is_not_cached(voc, tmp_path):
    report = evaluate(
        open_dataset("voc21", voc.root),
        tmp_path / "out",
        perfect_predictor(voc.labels, shape=(30, 41)),
        progress=False,
    )
    assert sorted(report.failed) == voc.image_ids and report.unscored == []
    assert all("41x30" in r and "40x30" in r for r in report.failed.values())
    assert report.images == 3  # scored as unpredicted (all background)
    assert not list((tmp_path / "out" / "predictions").glob("*.png"))


def test_pipeline_predictor_refuses_a_result_of_another_size(voc):
    """An image whose EXIF orientation turns it gives a transposed result: an error."""
    samples = list(open_dataset("voc21", voc.root))

    class Turning:
        def iter_segment(self, paths, classes):
            for index, path in enumerate(paths):
                shape = (40, 30) if index == 0 else (30, 40)
                label_map = np.zeros(shape, dtype=np.int32)
                yield path, SimpleNamespace(label_map=label_map, vocabulary=[], timings={})

    grounder = Grounder(open_dataset_vocabulary(), unlabelled_id=0)
    outcomes = list(pipeline_predictor(Turning(), grounder, None)(iter(samples)))
    assert [sample.image_id for sample, _, _ in outcomes] == voc.image_ids
    first, second = outcomes[0][1], outcomes[1][1]
    assert isinstance(first, DatasetError) and "30x40" in str(first) and "40x30" in str(first)
    assert isinstance(second, np.ndarray) and second.shape == (30, 40)


def open_dataset_vocabulary():
    from freesegdiff.evaluation.classnames import label_texts, load_class_names

    return label_texts(load_class_names("voc21"), 0, "names")


# ------------------------------------------------------------------------------ subprocess


def run_eval_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    """``freesegdiff eval`` in a fresh interpreter; a hang fails at the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        return subprocess.run(
            [sys.executable, "-m", "freesegdiff", "eval", "--no-progress", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=SUBPROCESS_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"freesegdiff eval hung (no exit in {SUBPROCESS_TIMEOUT} s): {error.stderr}")


def test_decompression_bomb_image_fails_alone_through_the_tiny_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    voc = write_synthetic_dataset("voc21", tmp_path / "data", num_images=2)
    bomb = voc.image_ids[0]
    # a real bomb: 400 Mpx of 1-bit pixels, 50 kB on disk, 1.2 GB once decoded to RGB
    Image.new("1", (20000, 20000)).save(image_path(voc.root, bomb), format="PNG")
    out = tmp_path / "out"
    done = run_eval_subprocess(
        "--preset", "tiny", "--dataset", "voc21", "--data-root", str(voc.root), "-o", str(out)
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["failed"]) == [bomb] and results["unscored"] == []
    reason = results["failed"][bomb]
    assert f"{bomb}.jpg" in reason, reason
    assert "20000x20000" in reason or "400000000 pixels" in reason, reason  # says how large
    assert results["images"] == 2 and results["predicted_now"] == 1  # the other went on
    assert f"{bomb}: " in done.stdout and "Traceback" not in done.stderr
    assert not (out / "predictions" / f"{bomb}.png").exists()
