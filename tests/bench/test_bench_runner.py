"""The benchmark end to end on the tiny preset: every figure, as a table and as JSON."""

from __future__ import annotations

import json

import pytest

from freesegdiff.bench.runner import STAGES, BenchSettings, bench_images, run_bench
from freesegdiff.cli import main
from freesegdiff.errors import ConfigError

JSON_KEYS = {
    "stages",
    "seconds_per_image",
    "images_per_second",
    "model_floor_seconds",
    "overhead",
    "peak_rss_gb",
    "settings",
}
SETTINGS_KEYS = {"preset", "dtype", "batch_size", "image_size", "device", "torch", "device_name"}


@pytest.fixture(scope="module")
def report():
    return run_bench(BenchSettings(preset="tiny", images=3, size=(80, 60), batch_size=2))


def test_the_json_has_every_figure(report):
    figures = report.to_json()
    assert figures.keys() >= JSON_KEYS
    assert figures["settings"].keys() >= SETTINGS_KEYS
    assert list(figures["stages"]) == list(STAGES)
    assert figures["settings"]["image_size"] == [80, 60]
    assert figures["settings"]["batch_size"] == 2
    assert figures["settings"]["preset"] == "tiny"
    json.dumps(figures)  # plain JSON values only


def test_the_figures_are_consistent(report):
    assert len(report.per_image) == 3
    assert all(seconds >= 0 for seconds in report.stages.values())
    assert report.seconds_per_image > 0 and report.images_per_second > 0
    # the stages cover the wall-clock time: what is left is the overhead
    named = sum(sum(v for k, v in image.items() if k != "total") for image in report.per_image)
    total = sum(image["total"] for image in report.per_image)
    assert report.overhead == pytest.approx(1 - named / total)
    assert -0.05 < report.overhead < 0.5
    assert set(report.model_floor) == {"caption", "vae", "unet", "clip"}
    assert report.model_floor_seconds == pytest.approx(sum(report.model_floor.values()))
    assert 0.1 < report.peak_rss_gb < 100
    assert "images per second" in report.table() and "peak resident" in report.table()


def test_bench_images_are_photos_of_the_asked_size():
    images = bench_images(4, (50, 30))
    assert [image.shape for image in images] == [(30, 50, 3)] * 4
    assert images[0].std() > 10  # a photo, not a flat field
    assert not (images[0] == images[3]).all()  # the second round is mirrored and rolled


def test_bad_settings_are_explained():
    with pytest.raises(ConfigError, match="--images"):
        run_bench(BenchSettings(preset="tiny", images=0))
    with pytest.raises(ConfigError, match="--batch-size"):
        run_bench(BenchSettings(preset="tiny", batch_size=0))


def test_the_command_prints_the_table_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(
        ["bench", "--preset", "tiny", "--images", "1", "--size", "64x48", "--json", str(path)]
    )
    assert code == 0
    assert "model floor" in capsys.readouterr().out
    assert json.loads(path.read_text()).keys() >= JSON_KEYS
    with pytest.raises(SystemExit):
        main(["bench", "--size", "64"])
