"""``freesegdiff eval`` end to end on synthetic datasets in every on-disk layout."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from freesegdiff import cli
from freesegdiff.evaluation.classnames import label_texts, load_class_names
from freesegdiff.evaluation.datasets import open_dataset
from freesegdiff.evaluation.runner import prediction_palette
from freesegdiff.evaluation.synthetic import write_synthetic_dataset
from freesegdiff.infra.interrupts import Terminated

LAYOUTS = [
    ("voc21", "stuff"),
    ("voc20", "stuff"),
    ("context60", "stuff"),
    ("context59", "stuff"),
    ("coco-object", "stuff"),
    ("coco-object", "json"),
    ("coco-stuff171", "stuff"),
    ("coco-stuff27", "stuff"),
    ("ade150", "stuff"),
    ("cityscapes", "stuff"),
]


class OraclePipe:
    """Stands in for FreeSegDiff: labels every pixel with a label text of its true class.

    Void pixels stay unlabelled (0), which grounding turns into background or "no class"; so do
    background pixels when the background class has no text (``mode="names"``).
    """

    def __init__(self, name, root, mode="names"):
        dataset = open_dataset(name, root)
        self.truth = {str(s.image_path): s.label_map for s in dataset}
        vocabulary = label_texts(load_class_names(name), dataset.background_id, mode)
        self.first_text = {}
        for index, class_id in enumerate(vocabulary.class_ids):
            self.first_text.setdefault(class_id, index + 1)
        self.calls = 0

    def iter_segment(self, paths, classes):
        lookup = np.zeros(256, dtype=np.int32)
        for class_id, label_id in self.first_text.items():
            lookup[class_id] = label_id
        for path in paths:
            self.calls += 1
            truth = self.truth[path]
            label_map = np.where(truth == 255, 0, lookup[truth])
            yield (
                path,
                SimpleNamespace(label_map=label_map, vocabulary=classes, timings={"x": 0.25}),
            )


def run_eval(*args):
    return cli.main(["eval", "--preset", "tiny", "--no-progress", *args])


def read_results(folder):
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("mode", ["names", "synonyms"])
@pytest.mark.parametrize(("name", "source"), LAYOUTS)
def test_perfect_predictions_score_100_in_every_layout(tmp_path, monkeypatch, name, source, mode):
    if source == "json":
        pytest.importorskip("pycocotools")
    write_synthetic_dataset(name, tmp_path / "data", num_images=2, coco_source=source)
    oracle = OraclePipe(name, tmp_path / "data", mode)
    monkeypatch.setattr(
        "freesegdiff.cli.common.pipeline_from_args", lambda args, runtime=None: oracle
    )
    out = tmp_path / "out"
    texts = ["--set", f'vocabulary.dataset_texts="{mode}"']
    data = ["--dataset", name, "--data-root", str(tmp_path / "data"), "-o", str(out), *texts]
    assert run_eval(*data) == 0
    results = read_results(out)
    expected = label_texts(
        load_class_names(name), open_dataset(name, tmp_path / "data").background_id, mode
    )
    assert results["settings"]["label_texts"] == list(expected.texts)
    assert results["dataset"] == name and results["images"] == 2
    assert results["miou"] == 100.0 and results["pixel_accuracy"] == 100.0
    assert results["seconds_per_image"] == 0.25
    assert results["settings"]["preset"] == "tiny"
    assert results["settings"]["pipeline"]["clustering"]["k"] == 4
    assert len(results["per_class_iou"]) == len(load_class_names(name))
    assert (out / "results.md").is_file() and (out / "confusion.png").is_file()
    # the paper protocol re-scores the cached predictions without predicting again
    assert run_eval(*data, "--protocol", "paper") == 0
    assert read_results(out)["miou"] == 100.0 and oracle.calls == 2


@pytest.fixture(scope="module")
def tiny_pipe():
    """The real tiny pipeline, loaded once for the module."""
    from freesegdiff.cli.common import pipeline_from_args

    loaded = {}

    def load(args, runtime=None):
        if "pipe" not in loaded:
            loaded["pipe"] = pipeline_from_args(args, runtime)
        loaded["loads"] = loaded.get("loads", 0) + 1
        return loaded["pipe"]

    return load


def test_tiny_pipeline_end_to_end_resume_and_rescore(tmp_path, monkeypatch, tiny_pipe):
    pytest.importorskip("diffusers")
    written = write_synthetic_dataset("voc21", tmp_path / "data", num_images=3, size=(40, 32))
    monkeypatch.setattr("freesegdiff.cli.common.pipeline_from_args", tiny_pipe)
    data = ["--dataset", "voc21", "--data-root", str(tmp_path / "data")]

    # interrupted after one image, then resumed, versus one uninterrupted run
    assert run_eval(*data, "-o", str(tmp_path / "resumed"), "--limit", "1") == 0
    assert read_results(tmp_path / "resumed")["images"] == 1
    assert run_eval(*data, "-o", str(tmp_path / "resumed")) == 0
    assert run_eval(*data, "-o", str(tmp_path / "straight")) == 0
    resumed, straight = read_results(tmp_path / "resumed"), read_results(tmp_path / "straight")
    assert resumed["from_cache"] == 1 and resumed["predicted_now"] == 2
    for key in ("images", "miou", "per_class_iou", "pixel_accuracy", "mean_accuracy"):
        assert resumed[key] == straight[key]
    assert straight["images"] == 3 and 0.0 <= straight["miou"] <= 100.0
    predictions = tmp_path / "straight" / "predictions"
    for image_id, truth in written.labels.items():
        with Image.open(predictions / f"{image_id}.png") as cached:
            assert cached.mode == "P" and np.asarray(cached).shape == truth.shape

    def no_models(args, runtime=None):
        raise AssertionError("re-scoring must not load the models")

    monkeypatch.setattr("freesegdiff.cli.common.pipeline_from_args", no_models)

    def score(predictions_by_id):
        for image_id, prediction in predictions_by_id.items():
            png = Image.fromarray(prediction.astype(np.uint8), mode="P")
            png.putpalette(prediction_palette())
            png.save(predictions / f"{image_id}.png")
        assert run_eval(*data, "-o", str(tmp_path / "straight")) == 0
        return read_results(tmp_path / "straight")

    # perfect: the ground truth itself (void predicted as background, which is ignored)
    perfect = score({i: np.where(t == 255, 0, t) for i, t in written.labels.items()})
    assert perfect["miou"] == 100.0 and perfect["from_cache"] == 3

    # known confusion: everything background. Background IoU = its pixels / all valid pixels;
    # every other class in the ground truth scores 0; classes never seen have no IoU.
    everything_background = score({i: np.zeros_like(t) for i, t in written.labels.items()})
    truth = np.concatenate([t.ravel() for t in written.labels.values()])
    valid = truth[truth != 255]
    present = set(np.unique(valid).tolist())
    background_iou = 100.0 * np.sum(valid == 0) / valid.size
    expected = (background_iou if 0 in present else 0.0) / len(present | {0})
    assert everything_background["miou"] == pytest.approx(expected)
    assert everything_background["per_class_iou"]["aeroplane"] in (None, 0.0)


def test_cli_errors_are_messages(tmp_path, capsys):
    assert run_eval("--dataset", "voc21", "--data-root", str(tmp_path), "-o", str(tmp_path)) == 2
    assert "ImageSets/Segmentation/val.txt" in capsys.readouterr().err
    write_synthetic_dataset("voc21", tmp_path / "data", num_images=1)
    code = run_eval(
        "--dataset", "voc21", "--data-root", str(tmp_path / "data"), "-o", str(tmp_path / "o"),
        "--limit", "0",
    )  # fmt: skip
    assert code == 2 and "--limit must be at least 1" in capsys.readouterr().err


def test_open_vocabulary_grounds_caption_entities(tmp_path, monkeypatch, tiny_pipe):
    pytest.importorskip("diffusers")
    written = write_synthetic_dataset("voc20", tmp_path / "data", num_images=1, size=(40, 32))
    monkeypatch.setattr("freesegdiff.cli.common.pipeline_from_args", tiny_pipe)
    out = tmp_path / "out"
    code = run_eval(
        "--dataset", "voc20", "--data-root", str(tmp_path / "data"), "-o", str(out),
        "--vocabulary", "open", "--text-encoder", "diffusion",
    )  # fmt: skip
    assert code == 0
    results = read_results(out)
    assert results["settings"]["vocabulary"] == "open"
    assert results["settings"]["unlabelled_pixels"] == "no class"
    (image_id,) = written.labels
    with Image.open(out / "predictions" / f"{image_id}.png") as cached:
        values = set(np.unique(np.asarray(cached)).tolist())
    assert values <= set(range(20)) | {255}  # VOC20 class ids, or 255 where nothing was named


def test_an_id_listed_twice_is_scored_once_with_a_warning(tmp_path, monkeypatch, caplog):
    """``good`` and ``  good  `` in val.txt: one image, predicted and scored once."""
    written = write_synthetic_dataset("voc21", tmp_path / "data", num_images=2)
    split = tmp_path / "data" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    first, second = sorted(written.labels)
    split.write_text(f"{first}\n  {first}  \n{second}\n{first}\n")
    with caplog.at_level("WARNING"):
        dataset = open_dataset("voc21", tmp_path / "data")
    assert [sample.image_id for sample in dataset] == [first, second]
    message = caplog.text
    assert (
        "lists 2 image ids again" in message and f"'{first}' on line 2 (first on line 1)" in message
    )
    oracle = OraclePipe("voc21", tmp_path / "data")
    monkeypatch.setattr(
        "freesegdiff.cli.common.pipeline_from_args", lambda args, runtime=None: oracle
    )
    out = tmp_path / "out"
    assert (
        run_eval("--dataset", "voc21", "--data-root", str(tmp_path / "data"), "-o", str(out)) == 0
    )
    assert read_results(out)["images"] == 2 and oracle.calls == 2


@pytest.mark.parametrize(("stop", "code"), [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_ctrl_c_or_sigterm_keeps_the_predictions_and_says_how_to_finish(
    tmp_path, monkeypatch, capsys, stop, code
):
    write_synthetic_dataset("voc21", tmp_path / "data", num_images=3)
    oracle = OraclePipe("voc21", tmp_path / "data")
    real = oracle.iter_segment

    def stopped_after_two(paths, classes):
        for count, outcome in enumerate(real(paths, classes)):
            if count == 2:
                raise stop
            yield outcome

    monkeypatch.setattr(oracle, "iter_segment", stopped_after_two)
    monkeypatch.setattr(
        "freesegdiff.cli.common.pipeline_from_args", lambda args, runtime=None: oracle
    )
    out = tmp_path / "out"
    data = ["--dataset", "voc21", "--data-root", str(tmp_path / "data"), "-o", str(out)]
    assert run_eval(*data) == code
    error = capsys.readouterr().err
    assert "2 predictions are cached" in error and "run the same command again" in error
    assert "Traceback" not in error
    assert len(list((out / "predictions").glob("*.png"))) == 2
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]
    monkeypatch.setattr(oracle, "iter_segment", real)
    assert run_eval(*data) == 0
    results = read_results(out)
    assert (results["from_cache"], results["predicted_now"], results["miou"]) == (2, 1, 100.0)
