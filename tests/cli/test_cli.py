"""The command line end to end on real photos with the tiny preset (offline, no download)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from freesegdiff.cli import main


@pytest.fixture(scope="module")
def small(photos):
    """The photos at a third of their size: what is checked here does not depend on size,
    and the explain figures of full-size photos cost seconds each."""
    return {name: np.asarray(Image.fromarray(pixels).reduce(3)) for name, pixels in photos.items()}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, small):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(small["chelsea"]).save(folder / "chelsea.png")
    Image.fromarray(small["astronaut"]).save(folder / "astronaut.jpg", quality=90)
    sub = folder / "more"
    sub.mkdir()
    Image.fromarray(small["coffee"]).convert("L").save(sub / "coffee_gray.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


def check_image_outputs(out, stem, photo_shape):
    label_png = Image.open(out / f"{stem}.png")
    assert label_png.mode == "P"
    assert label_png.size == (photo_shape[1], photo_shape[0])
    summary = json.loads((out / f"{stem}.json").read_text())
    values = set(np.unique(np.asarray(label_png)).tolist())
    ids = {label["id"] for label in summary["labels"]}
    # every pixel value is an id of the JSON, and every segment listed is in the picture
    assert values <= ids
    assert {label["id"] for label in summary["labels"] if label["area"] > 0} == values
    for label in summary["labels"]:
        assert label["area"] == int((np.asarray(label_png) == label["id"]).sum())
    assert summary["width"] == photo_shape[1] and summary["height"] == photo_shape[0]
    assert isinstance(summary["caption"], str) and isinstance(summary["entities"], list)
    assert {"caption", "unet", "clip", "refinement"} <= set(summary["timings"])
    overlay = Image.open(out / f"{stem}_overlay.png")
    assert overlay.size[1] >= photo_shape[0] and overlay.size[0] >= photo_shape[1]
    return summary


def test_segment_a_folder_with_a_broken_image(photo_folder, small, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--explain needs the [viz] extra")
    pytest.importorskip("pycocotools", reason="--format coco-rle needs the [eval] extra")
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(photo_folder),
            "--output",
            str(out),
            "--preset",
            "tiny",
            "--no-progress",
            "--explain",
            "--format",
            "png,coco-rle",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # one image failed ...
    assert "broken.jpg" in captured.out + captured.err
    assert "segmented 3 of 4 images" in captured.out
    # ... and the three others were all written
    check_image_outputs(out, "chelsea", small["chelsea"].shape)
    check_image_outputs(out, "astronaut", small["astronaut"].shape)
    gray = check_image_outputs(out, "more/coffee_gray", small["coffee"].shape)  # mirrored
    assert gray["image"].endswith("coffee_gray.png")
    assert not (out / "broken.png").exists()
    for stem in ("chelsea", "astronaut", "more/coffee_gray"):
        assert (out / f"{stem}_explain.png").is_file()
    assert (out / "index.html").is_file() and "chelsea_overlay" in (out / "index.html").read_text()
    coco = json.loads((out / "coco_results.json").read_text())
    assert {entry["image_id"] for entry in coco} <= {"chelsea", "astronaut", "more/coffee_gray"}


def test_fixed_classes_name_the_segments(photos, tmp_path):
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    out = tmp_path / "out"
    classes = ["cat", "sofa", "wall", "floor"]
    code = main(
        [
            "segment",
            str(photo),
            "-o",
            str(out),
            "--preset",
            "tiny",
            "--no-progress",
            "--classes",
            ", ".join(classes),
            "--k",
            "3",
            "--refine",
            "none",
        ]
    )
    assert code == 0
    summary = check_image_outputs(out, "cat", photos["chelsea"].shape)
    assert summary["vocabulary"] == classes
    named = {label["name"]: label["id"] for label in summary["labels"] if label["id"]}
    assert all(classes[index - 1] == name for name, index in named.items())


def test_naclip_names_every_pixel_and_loads_only_clip(photos, tmp_path):
    pytest.importorskip("cv2")
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    out = tmp_path / "out"
    classes = ["cat", "sofa", "wall"]
    tiny = ["--clip-model", "tiny:clip", "--set", "dense.short_side=64", "--no-progress"]
    code = main(
        [
            "segment",
            str(photo),
            "-o",
            str(out),
            "--preset",
            "naclip",
            "--classes",
            ", ".join(classes),
            *tiny,
        ]
    )
    assert code == 0
    summary = json.loads((out / "cat.json").read_text())
    assert summary["vocabulary"] == classes and summary["caption"] is None
    assert "clip" in summary["timings"] and "unet" not in summary["timings"]  # no features
    manifest = json.loads((out / "freesegdiff-run.json").read_text())
    assert manifest["preset"] == "naclip"
    assert manifest["settings"]["classify"]["namer"] == "dense"
    with Image.open(out / "cat.png") as png:
        labels = np.asarray(png)
    assert labels.shape == photos["chelsea"].shape[:2]
    assert set(np.unique(labels).tolist()) <= {1, 2, 3}  # every pixel named (prob_thd 0)
    for label in summary["labels"]:
        assert label["area"] == int((labels == label["id"]).sum())


def test_user_errors_give_messages_not_tracebacks(photos, tmp_path, capsys, monkeypatch):
    """Usage and set-up errors exit with 2 and one message; a failed image with 1."""
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    out = str(tmp_path / "out")
    assert main(["segment", str(photo), "-o", out, "--preset", "tiny", "--classes", " , "]) == 2
    assert "holds no class name" in capsys.readouterr().err
    missing = str(tmp_path / "no-model-here")
    assert main(["segment", str(photo), "-o", out, "--diffusion-model", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    absent = ["--diffusion-model", missing, "--clip-model", missing + "-clip", "--offline"]
    assert main(["segment", str(photo), "-o", out, *absent]) == 2
    error = capsys.readouterr().err  # all three in one message, before any loading
    assert "3 models cannot be loaded" in error and "Traceback" not in error
    assert f"the CLIP model '{missing}-clip' (--clip-model): the folder does not exist" in error
    assert "the captioner model 'Salesforce/blip-image-captioning-base'" in error
    # nothing can run: a usage error, named (an input that is missing beside others: exit 1,
    # tests/test_segment_robustness.py)
    assert main(["segment", str(tmp_path / "nope.png"), "-o", out, "--preset", "tiny"]) == 2
    assert "nope.png': the input does not exist" in capsys.readouterr().err
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    assert main(["segment", str(photo), "-o", out, "--preset", "paper", "--offline"]) == 2
    error = capsys.readouterr().err
    assert "the Stable Diffusion model 'CompVis/stable-diffusion-v1-4'" in error
    assert "hf download CompVis/stable-diffusion-v1-4 && hf download openai/clip-vit" in error
    assert "--preset tiny" in error
    assert (
        main(["segment", str(photo), "-o", out, "--preset", "tiny", "--set", "clustering.kk=3"])
        == 2
    )
    assert "unknown setting 'clustering.kk'" in capsys.readouterr().err
    assert main(["segment", str(photo), "-o", out, "--preset", "tiny", "--format", "tiff"]) == 2
    assert "unknown --format" in capsys.readouterr().err


def test_help_lists_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "freesegdiff", "segment", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in (
        "--output",
        "--classes",
        "--preset",
        "--device",
        "--dtype",
        "--seed",
        "--diffusion-model",
        "--captioner-model",
        "--clip-model",
        "--timestep",
        "--k",
        "--refine",
        "--set",
        "--offline",
        "--batch-size",
        "--format",
    ):
        assert option in result.stdout
    top = subprocess.run(
        [sys.executable, "-m", "freesegdiff", "--help"], capture_output=True, text=True, check=True
    )
    assert "segment" in top.stdout


def test_config_file_merges_over_the_preset_section_by_section(tmp_path):
    """Regression: a --config section replaced the preset's whole section with the defaults
    (tiny + {"caption": {"num_beams": 2}} lost the tiny preset's caption lengths)."""
    import argparse

    from freesegdiff.cli.common import add_pipeline_arguments, config_from_args
    from freesegdiff.presets import load_preset

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"caption": {"num_beams": 2}, "clustering": {"k": 5}}))
    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--config", str(settings), "--k", "6"])
    config = config_from_args(args)
    tiny = load_preset("tiny")
    assert config.caption.num_beams == 2
    assert config.caption.max_length == tiny.caption.max_length == 16  # kept from the preset
    assert config.caption.min_length == tiny.caption.min_length == 10
    assert config.models == tiny.models and config.features == tiny.features
    assert config.clustering.k == 6  # flags come after the file
    args = parser.parse_args(["--preset", "tiny", "--config", str(settings)])
    assert config_from_args(args).clustering.k == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--k", "0"], "clustering.k must be at least 1"),
        (["--k-range", "5", "2"], "clustering.k_range must be 1 <= lo <= hi"),
        (["--refine", "bogus"], "refine.method must be one of"),
        (["--feature-size", "0"], "features.feature_size must be at least 1"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--set", "clustering.k=abc"], "clustering.k must be an integer, got 'abc'"),
        (["--set", "refine.gt_prob=1.5"], "refine.gt_prob must be in (0, 1)"),
        (["--crf-backend", "cuda"], "refine.backend must be one of"),
        (["--max-pixels", "0"], "limits.max_pixels must be at least 1 or null"),
        (["--working-size", "-5"], "limits.working_size must be at least 1 or null"),
        (["--oversize", "crop"], "limits.oversize must be one of 'refuse', 'downscale'"),
        (["--seed", "-1"], "seed must be in 0..4294967295"),
        (["--set", "seed=4294967296"], "seed must be in 0..4294967295"),
        (["--set", "seed=1e23"], "seed must be an integer or null, got 1e+23"),
        (["--k", "1000000"], "clustering.k asks for 1000000 clusters, but an image has 1024"),
        (["--k-range", "2", "5000"], "clustering.k_range asks for 5000 clusters"),
        (["--feature-size", "8", "--k", "65"], "an image has 64 feature vectors (8 x 8"),
        (["--set", "clustering.n_init=0"], "clustering.n_init must be at least 1"),
        (["--set", "clustering.max_iter=0"], "clustering.max_iter must be at least 1"),
        (["--set", "clustering.tol=-1"], "clustering.tol must be 0 or more"),
        (["--namer", "patches"], "classify.namer must be one of 'masked-crops', 'dense'"),
        (["--namer", "dense", "--dense-regions", "all"], "dense.regions must be one of"),
        (["--set", "dense.prob_thd=2"], "dense.prob_thd must be in [0, 1], got 2"),
    ],
)
def test_invalid_settings_exit_2_before_any_model_loads(photos, tmp_path, capsys, options, message):
    """The models named do not exist: had any loading started, its error would show instead."""
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    absent = ["--diffusion-model", str(tmp_path / "absent"), "--clip-model", str(tmp_path / "x")]
    code = main(["segment", str(photo), "-o", str(tmp_path / "out"), *absent, *options])
    error = capsys.readouterr().err
    assert code == 2
    assert message in error and "Traceback" not in error
    assert "does not exist" not in error  # no model was looked for


def test_segment_help_documents_resume_and_robustness(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in (
        "--resume",
        "--explain-timings",
        "failures.json",
        ".tmp",
        "x.jpg.png",
        "130 interrupted",
        "checked writable before any model loads",
    ):
        assert words in text, words


def test_explain_timings_needs_explain(photos, tmp_path, capsys):
    photo = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(photo)
    out = str(tmp_path / "out")
    assert main(["segment", str(photo), "-o", out, "--preset", "tiny", "--explain-timings"]) == 2
    assert "add --explain" in capsys.readouterr().err
