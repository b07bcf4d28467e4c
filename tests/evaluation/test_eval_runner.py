"""The eval loop: known predictions give hand-computed scores; the cache resumes and re-scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.datasets import open_dataset
from freesegdiff.evaluation.runner import evaluate, prediction_palette

V = 255
# Two 2x4 VOC images. Classes: 0 background, 12 dog, 15 person.
GROUND_TRUTH = {
    "2007_000001": np.array([[0, 0, 15, 15], [0, 0, 15, V]], dtype=np.uint8),
    "2007_000002": np.array([[12, 12, 12, 12], [0, 0, 0, 0]], dtype=np.uint8),
}
PREDICTION = {
    "2007_000001": np.array([[0, 15, 15, 15], [0, 0, 15, 0]], dtype=np.uint8),
    "2007_000002": np.array([[12, 12, 0, 0], [0, 0, 0, 0]], dtype=np.uint8),
}
# standard protocol (void ignored, 15 valid pixels pooled):
#   background: gt 8, predicted 9, TP 7 -> 7/10 = 70
#   person:     gt 3, predicted 4, TP 3 -> 3/4  = 75
#   dog:        gt 4, predicted 2, TP 2 -> 2/4  = 50      mIoU (70 + 75 + 50) / 3 = 65
#   pixel accuracy 12/15 = 80; mean accuracy (7/8 + 3/3 + 2/4) / 3 = 79.1666...
# paper protocol (void -> background, per image):
#   image 1: background gt 5, pred 4, TP 4 -> 80; person 75           -> 77.5
#   image 2: background gt 4, pred 6, TP 4 -> 66.67; dog 2/4 -> 50    -> 58.333...
#   mean (77.5 + 58.333) / 2 = 67.9166...
STANDARD_MIOU = 65.0
PAPER_MIOU = (77.5 + (200 / 3 + 50) / 2) / 2


def write_voc(root, labels):
    folder = root / "VOCdevkit" / "VOC2012"
    (folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    (folder / "SegmentationClass").mkdir()
    (folder / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(labels))
    for image_id, label in labels.items():
        Image.new("RGB", (label.shape[1], label.shape[0])).save(
            folder / "JPEGImages" / f"{image_id}.jpg"
        )
        png = Image.fromarray(label, mode="P")
        png.putpalette(prediction_palette())  # Pillow renumbers a P image saved without one
        png.save(folder / "SegmentationClass" / f"{image_id}.png")
    return root


def predictor_from(maps, log=None, stop_after=None, fail=()):
    """A predictor returning ``maps[image id]``; records ids, can fail or be interrupted."""

    def make():
        def predict(samples):
            for count, sample in enumerate(samples):
                if stop_after is not None and count == stop_after:
                    raise KeyboardInterrupt
                if log is not None:
                    log.append(sample.image_id)
                if sample.image_id in fail:
                    yield sample, RuntimeError("out of memory"), None
                else:
                    yield sample, maps[sample.image_id], 0.5

        return predict

    return make


@pytest.fixture
def voc(tmp_path):
    return open_dataset("voc21", write_voc(tmp_path / "data", GROUND_TRUTH))


def test_perfect_predictions_score_100(voc, tmp_path):
    perfect = {k: np.where(v == V, 0, v) for k, v in GROUND_TRUTH.items()}
    report = evaluate(voc, tmp_path / "out", predictor_from(perfect), progress=False)
    assert report.scores.miou == 100.0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["miou"] == 100.0 and results["pixel_accuracy"] == 100.0
    assert results["per_class_iou"]["person"] == 100.0
    assert results["per_class_iou"]["cat"] is None  # never occurs
    assert results["images"] == 2 and results["seconds_per_image"] == 0.5


def test_a_known_confusion_gives_the_hand_computed_scores(voc, tmp_path):
    report = evaluate(voc, tmp_path / "out", predictor_from(PREDICTION), progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) >= {
        "dataset",
        "protocol",
        "settings",
        "images",
        "miou",
        "per_class_iou",
        "pixel_accuracy",
        "mean_accuracy",
        "seconds_per_image",
    }
    assert results["dataset"] == "voc21" and results["protocol"] == "standard"
    assert results["miou"] == pytest.approx(STANDARD_MIOU)
    assert results["per_class_iou"]["background"] == pytest.approx(70.0)
    assert results["per_class_iou"]["person"] == pytest.approx(75.0)
    assert results["per_class_iou"]["dog"] == pytest.approx(50.0)
    assert results["pixel_accuracy"] == pytest.approx(80.0)
    assert results["mean_accuracy"] == pytest.approx(100 * (7 / 8 + 1 + 0.5) / 3, abs=1e-5)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| 15 | person | 75.00 |" in markdown and "| 8 | cat | - |" in markdown
    with Image.open(tmp_path / "out" / "confusion.png") as picture:
        assert picture.width > 21 * 3
    for image_id, prediction in PREDICTION.items():
        with Image.open(tmp_path / "out" / "predictions" / f"{image_id}.png") as cached:
            assert cached.mode == "P"
            np.testing.assert_array_equal(np.asarray(cached), prediction)
    assert report.predicted == 2 and report.cached == 0


def test_rescoring_needs_no_predictor_and_switches_protocol(voc, tmp_path):
    evaluate(voc, tmp_path / "out", predictor_from(PREDICTION), progress=False)
    again = evaluate(voc, tmp_path / "out", None, protocol="standard", progress=False)
    assert again.scores.miou == pytest.approx(STANDARD_MIOU) and again.cached == 2
    paper = evaluate(voc, tmp_path / "out", None, protocol="paper", progress=False)
    assert paper.scores.miou == pytest.approx(PAPER_MIOU)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["protocol"] == "paper" and results["miou"] == pytest.approx(PAPER_MIOU)


def test_an_interrupted_run_resumes_to_the_same_numbers(voc, tmp_path):
    straight = evaluate(voc, tmp_path / "straight", predictor_from(PREDICTION), progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            voc, tmp_path / "resumed", predictor_from(PREDICTION, stop_after=1), progress=False
        )
    assert len(list((tmp_path / "resumed" / "predictions").glob("*.png"))) == 1
    asked: list[str] = []
    resumed = evaluate(
        voc, tmp_path / "resumed", predictor_from(PREDICTION, log=asked), progress=False
    )
    assert asked == ["2007_000002"]  # only the image the interruption lost
    assert (resumed.cached, resumed.predicted) == (1, 1)
    first = json.loads((tmp_path / "straight" / "results.json").read_text())
    second = json.loads((tmp_path / "resumed" / "results.json").read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy", "mean_accuracy", "images"):
        assert first[key] == second[key]
    assert straight.scores.miou == pytest.approx(STANDARD_MIOU)


def test_limit_scores_the_first_images_only(voc, tmp_path):
    report = evaluate(voc, tmp_path / "out", predictor_from(PREDICTION), limit=1, progress=False)
    # image 1 alone: background gt 4 pred 3 TP 3 -> 3/4; person gt 3 pred 4 TP 3 -> 3/4
    assert report.images == 1 and report.scores.miou == pytest.approx(75.0)


def test_a_failed_image_is_scored_as_unpredicted_and_retried_next_time(voc, tmp_path):
    report = evaluate(
        voc, tmp_path / "out", predictor_from(PREDICTION, fail={"2007_000002"}), progress=False
    )
    assert report.failed == {"2007_000002": "out of memory"}
    assert not (tmp_path / "out" / "predictions" / "2007_000002.png").exists()
    # image 2 counted as all background: background gt 8 pred 11 TP 7 -> 7/12; person 3/4;
    # dog gt 4, never predicted -> 0
    assert report.scores.miou == pytest.approx(100 * (7 / 12 + 0.75 + 0) / 3)
    asked: list[str] = []
    evaluate(voc, tmp_path / "out", predictor_from(PREDICTION, log=asked), progress=False)
    assert asked == ["2007_000002"]


def test_cached_predictions_of_other_settings_are_refused(voc, tmp_path):
    make = predictor_from(PREDICTION)
    evaluate(voc, tmp_path / "out", make, settings={"k": 4, "device": "cpu"}, progress=False)
    # the device changes speed only
    evaluate(voc, tmp_path / "out", make, settings={"k": 4, "device": "cuda"}, progress=False)
    with pytest.raises(ConfigError, match="k: 4 then, 5 now"):
        evaluate(voc, tmp_path / "out", make, settings={"k": 5}, progress=False)
    asked: list[str] = []
    evaluate(
        voc,
        tmp_path / "out",
        predictor_from(PREDICTION, log=asked),
        settings={"k": 5},
        overwrite=True,
        progress=False,
    )
    assert sorted(asked) == sorted(GROUND_TRUTH)
