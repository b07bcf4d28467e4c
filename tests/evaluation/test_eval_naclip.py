"""``eval --preset naclip``: NACLIP's release on the synthetic VOC21 split with a tiny CLIP,
every prediction checked against the release's post-processing done here by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from freesegdiff import cli
from freesegdiff.evaluation.classnames import load_class_names
from freesegdiff.evaluation.datasets import open_dataset
from freesegdiff.evaluation.synthetic import write_synthetic_dataset
from freesegdiff.presets import load_preset

pytest.importorskip("cv2")

# The tiny CLIP at a short side of 64 (10 x 8 patches) instead of the release's 336: the
# geometry at full size is checked in tests/stages/naming/test_dense_reference.py.
SMALL = ["--set", "dense.short_side=64"]


def released_prediction(dense, image, classes, prob_thd):
    """NACLIP's ``postprocess_result``: one query per synonym, the softmax over all queries, a
    class's probability its best synonym's, argmax, and class 0 below ``prob_thd``."""
    queries = [text for entry in classes for text in entry.synonyms]
    owner = torch.tensor([i for i, entry in enumerate(classes) for _ in entry.synonyms])
    probs = dense.probabilities(image, queries)  # (Q, H, W), softmax over the queries
    per_class = torch.stack([probs[owner == c].max(dim=0).values for c in range(len(classes))])
    best, prediction = per_class.max(dim=0)
    prediction[best < prob_thd] = 0
    return prediction.numpy().astype(np.uint8)


def test_naclip_on_voc21_loads_only_clip_and_predicts_as_released(tmp_path, monkeypatch):
    written = write_synthetic_dataset("voc21", tmp_path / "data", num_images=2, size=(40, 32))
    loaded = {}

    from freesegdiff.cli import common

    real = common.pipeline_from_args

    def keep(args, runtime=None):
        loaded["pipe"] = real(args, runtime)
        return loaded["pipe"]

    monkeypatch.setattr("freesegdiff.cli.common.pipeline_from_args", keep)
    output = tmp_path / "out"
    data = ["--dataset", "voc21", "--data-root", str(tmp_path / "data"), "-o", str(output)]
    code = cli.main(
        ["eval", "--preset", "naclip", "--clip-model", "tiny:clip", "--no-progress", *data, *SMALL]
    )
    assert code == 0
    pipe = loaded["pipe"]
    # only CLIP: no captioner, no diffusion features, nothing clustered or refined
    assert pipe.captioner is None and pipe.features is None
    assert pipe.config.refine.method == "none"
    # the release's VOC21 config: prob_thd 0.1, no sliding window
    assert pipe.config.dense.prob_thd == 0.1 and pipe.config.dense.slide_crop == 0
    assert load_preset("naclip").dense.slide_crop == 224  # other datasets keep the window
    results = json.loads((output / "results.json").read_text())
    assert results["settings"]["preset"] == "naclip"
    assert results["images"] == 2

    classes = load_class_names("voc21")
    assert classes[0].synonyms[:3] == ("sky", "wall", "tree")  # background by stuff words
    dataset = open_dataset("voc21", tmp_path / "data")
    for sample in dataset:
        image = np.asarray(Image.open(sample.image_path).convert("RGB"))
        expected = released_prediction(pipe.namer.dense, image, classes, 0.1)
        with Image.open(output / "predictions" / f"{sample.image_id}.png") as png:
            assert np.array_equal(np.asarray(png), expected)
    assert set(written.labels) == {sample.image_id for sample in dataset}
