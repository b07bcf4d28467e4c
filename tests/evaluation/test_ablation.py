"""``freesegdiff ablate``: grid files, shared work computed once (counted), resume, tables.

The end-to-end tests run the tiny preset on a synthetic VOC split with a 2x2 grid (timestep x
K): the features depend on the timestep, not on K, so each image's features are computed twice
(once per timestep) and reused twice; its caption and entities once, reused three times.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from freesegdiff import cli
from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.ablation import expand, load_grid, parse_grid, shipped_grids
from freesegdiff.evaluation.synthetic import write_synthetic_dataset
from freesegdiff.presets import load_preset

IMAGES = 2
GRID = {
    "description": "timestep x K",
    "set": {"refine.method": "none"},
    "studies": [
        {"name": "t-k", "axes": {"features.timestep": [0, 100], "clustering.k": [2, 3]}},
        {"name": "k", "axes": {"clustering.k": [2, 3]}},  # both runs already in t-k
    ],
}


def _columns(table: str) -> list[list[str]]:
    """The rows of a markdown table without the seconds column (timings differ run to run)."""
    rows = []
    for line in table.splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows.append(cells[:-2] + cells[-1:])  # drop "s / image"
    return rows


def _ablate(tmp_path, out, *extra):
    return cli.main(
        [
            "ablate",
            "--preset",
            "tiny",
            "--dataset",
            "voc21",
            "--data-root",
            str(tmp_path / "data"),
            "--grid",
            str(tmp_path / "grid.json"),
            "--output",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """The 2x2 grid run once, uninterrupted: (folder, shared_work.json)."""
    tmp_path = tmp_path_factory.mktemp("ablate")
    write_synthetic_dataset("voc21", tmp_path / "data", num_images=IMAGES)
    (tmp_path / "grid.json").write_text(json.dumps(GRID))
    assert _ablate(tmp_path, tmp_path / "out") == 0
    return tmp_path, json.loads((tmp_path / "out" / "shared_work.json").read_text())


# ------------------------------------------------------------------------------ grid files


def test_axes_expand_to_their_product_and_equal_runs_are_merged():
    grid = parse_grid(GRID)
    runs = expand(grid)
    assert len(runs) == 6  # by their settings, the k study's runs differ from t-k's
    by_labels = {tuple(sorted(r.appears[0][1].items())): r for r in runs}
    run = by_labels[(("clustering.k", "3"), ("features.timestep", "0"))]
    assert run.settings == {"refine.method": "none", "features.timestep": 0, "clustering.k": 3}
    assert [name for name, _ in run.appears] == ["t-k"]
    # with the base config, t = 0 is the preset's timestep: {"clustering.k": 3} equals it
    merged = expand(grid, load_preset("tiny"))
    assert len(merged) == 4
    shared = [r for r in merged if len(r.appears) == 2]
    assert sorted(r.settings["clustering.k"] for r in shared) == [2, 3]
    assert {name for r in shared for name, _ in r.appears} == {"t-k", "k"}


def test_named_options_set_several_settings_and_toml_is_read(tmp_path):
    pytest.importorskip("tomllib")
    (tmp_path / "g.toml").write_text(
        'preset = "tiny"\n'
        "[[studies]]\n"
        'name = "backbone"\n'
        "[[studies.axes.backbone]]\n"
        'label = "sd"\n'
        "set = {}\n"
        "[[studies.axes.backbone]]\n"
        'label = "dino"\n'
        'set = { "features.extractor" = "vit", "models.backbone" = "x" }\n'
    )
    grid = load_grid(tmp_path / "g.toml")
    assert grid.preset == "tiny"
    runs = expand(grid)
    assert [r.settings for r in runs] == [{}, {"features.extractor": "vit", "models.backbone": "x"}]
    assert runs[1].appears == [("backbone", {"backbone": "dino"})]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"axes": {"clustering.k": [2]}, "runs": []}, "unknown grid keys"),
        ({"axes": {"k": [2, 3]}}, "dotted setting"),
        ({"axes": {"clustering.k": []}}, "non-empty list"),
        ({"axes": {"x": [{"label": "a"}]}}, "'label' and 'set'"),
        ({"axes": {"x": [{"label": "a", "set": {}}, {"label": "a", "set": {}}]}}, "must differ"),
        ({"studies": [{"name": "a"}]}, "non-empty 'axes'"),
        ({}, "either 'studies'"),
    ],
)
def test_malformed_grids_are_refused_with_the_reason(grid, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(grid)


def test_the_shipped_grid_has_the_paper_axes_and_every_run_is_a_valid_config():
    from freesegdiff.evaluation.ablation import run_config
    from freesegdiff.pipeline import check_settings

    grid = load_grid("paper-ablation")
    assert "paper-ablation" in shipped_grids()
    names = [study.name for study in grid.studies]
    assert names[:4] == ["backbone", "layers", "timestep", "k"]
    timesteps = grid.studies[2].axes[0]
    assert [o.label for o in timesteps.options] == ["0", "100", "300", "500"]
    layers = [o.settings.get("features.resolutions") for o in grid.studies[1].axes[0].options]
    assert layers == [None, [32], [64]]  # 16x16: the paper's five layers
    base = load_preset("paper")
    runs = expand(grid, base)
    for run in runs:
        check_settings(run_config(base, run.settings))
    baseline = [r for r in runs if r.settings == {}]
    assert len(baseline) == 1 and len(baseline[0].appears) == len(grid.studies)
    assert "facebook/dinov2-base" in json.dumps([r.settings for r in runs])
    assert "facebook/vit-mae-base" in json.dumps([r.settings for r in runs])
    assert [study.name for study in grid.studies][-2:] == ["unet-features", "naming"]
    naming = grid.studies[-1]
    assert [axis.name for axis in naming.axes] == ["namer", "pruning"]
    namers = [option.settings.get("classify.namer") for option in naming.axes[0].options]
    regions = [option.settings.get("dense.regions") for option in naming.axes[0].options]
    assert namers == [None, "dense", "dense"] and regions == [None, None, "pixels"]
    # 23 runs before the naming study; it adds its 3 x 2 runs but the baseline
    assert len(runs) == 28


@pytest.mark.heavy  # whole grids of tiny-model runs: the main environment's
def test_a_bad_run_setting_is_refused_before_anything_loads(tmp_path):
    write_synthetic_dataset("voc21", tmp_path / "data", num_images=1)
    (tmp_path / "grid.json").write_text(json.dumps({"axes": {"clustering.k": [2, 0]}}))
    assert _ablate(tmp_path, tmp_path / "out") == 2
    assert not (tmp_path / "out" / "cache").exists()


# ------------------------------------------------------------------------------ running


@pytest.mark.heavy  # whole grids of tiny-model runs: the main environment's
def test_shared_work_is_computed_once_per_image_and_setting(grid_run):
    _, shared = grid_run
    # captions and entities: one setting (4 runs); features: one per timestep (2 runs each)
    computed = shared["computed"]
    assert {k: computed[k] for k in ("caption", "entities", "features")} == {
        "caption": IMAGES,
        "entities": IMAGES,
        "features": 2 * IMAGES,
    }
    # text embeddings (class prompts and entities, for pruning): once; the other runs reuse
    assert computed["text"] >= 21 and shared["reused"]["text"] == 3 * computed["text"]
    assert shared["reused"]["caption"] == 3 * IMAGES
    assert shared["reused"]["entities"] == 3 * IMAGES
    assert shared["reused"]["features"] == 2 * IMAGES
    # each model loaded once; the UNet once per timestep setting (one in memory at a time)
    assert shared["loads"] == {"caption": 1, "clip": 1, "features": 2, "text": 1}


@pytest.mark.heavy  # whole grids of tiny-model runs: the main environment's
def test_the_table_has_a_row_per_run_and_equals_plain_evaluations(grid_run, tmp_path):
    """Each run's scores equal ``freesegdiff eval`` with the same settings and no cache."""
    folder, _ = grid_run
    out = folder / "out"
    with open(out / "ablation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["study"], r["features.timestep"], r["clustering.k"]) for r in rows] == [
        ("t-k", "0", "2"),
        ("t-k", "0", "3"),
        ("t-k", "100", "2"),
        ("t-k", "100", "3"),
        ("k", "", "2"),
        ("k", "", "3"),
    ]
    assert all(float(r["seconds_per_image"]) > 0 for r in rows)
    markdown = (out / "ablation.md").read_text()
    assert "## t-k" in markdown and "## k" in markdown
    row = next(r for r in rows if r["features.timestep"] == "100" and r["clustering.k"] == "3")
    for protocol, column in (("standard", "miou"), ("paper", "miou_paper_protocol")):
        plain = tmp_path / protocol
        args = ["eval", "--preset", "tiny", "--dataset", "voc21", "--no-progress"]
        args += ["--data-root", str(folder / "data"), "--output", str(plain)]
        args += ["--protocol", protocol, "--timestep", "100", "--k", "3", "--refine", "none"]
        assert cli.main(args) == 0
        expected = json.loads((plain / "results.json").read_text())["miou"]
        assert float(row[column]) == pytest.approx(expected, abs=1e-6)
        cached = out / "runs" / row["run"] / "predictions"
        for path in sorted((plain / "predictions").glob("*.png")):
            from PIL import Image

            assert np.array_equal(
                np.asarray(Image.open(path)), np.asarray(Image.open(cached / path.name))
            )


@pytest.mark.heavy  # whole grids of tiny-model runs: the main environment's
def test_a_finished_grid_is_rescored_without_loading_or_computing(grid_run):
    folder, _ = grid_run
    before = (folder / "out" / "ablation.csv").read_text()
    assert _ablate(folder, folder / "out") == 0
    shared = json.loads((folder / "out" / "shared_work.json").read_text())
    assert shared == {"computed": {}, "reused": {}, "loads": {}}
    assert (folder / "out" / "ablation.csv").read_text() == before


@pytest.mark.heavy  # whole grids of tiny-model runs: the main environment's
def test_a_killed_grid_resumes_to_the_same_table(grid_run, tmp_path, monkeypatch):
    folder, _ = grid_run
    (tmp_path / "data").symlink_to(folder / "data")
    (tmp_path / "grid.json").write_text(json.dumps(GRID))
    calls = {"n": 0}
    from freesegdiff.stages.clustering import Clusterer

    original = Clusterer.__call__

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * IMAGES + 1:  # the third run's first image
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Clusterer, "__call__", interrupted)
    out = tmp_path / "out"
    assert _ablate(tmp_path, out) == 130
    assert not (out / "shared_work.json").exists()
    assert len(list((out / "runs").glob("*/results.json"))) == 2
    monkeypatch.setattr(Clusterer, "__call__", original)
    assert _ablate(tmp_path, out) == 0
    resumed = json.loads((out / "shared_work.json").read_text())
    # kept: the first timestep's features and the second's of the image the kill stopped at;
    # streamed (the CLI's default), the features group may have gone on to the next image
    # before the kill, and what it stored is reused too
    assert 0 <= resumed["computed"].get("features", 0) <= IMAGES - 1
    assert resumed["computed"].get("caption", 0) == 0
    expected = (folder / "out" / "ablation.md").read_text()
    assert _columns((out / "ablation.md").read_text()) == _columns(expected)


@pytest.mark.heavy  # whole grids of tiny-model runs: the main environment's
def test_a_one_axis_study_gets_a_plot(grid_run):
    pytest.importorskip("matplotlib")
    from PIL import Image

    folder, _ = grid_run
    with Image.open(folder / "out" / "ablation-k.png") as plot:
        assert plot.size[0] > 300 and plot.size[1] > 200
        assert len(np.unique(np.asarray(plot.convert("L")))) > 10  # drawn, not blank
    assert not (folder / "out" / "ablation-t-k.png").exists()  # two axes: no plot


def test_features_used_by_one_run_only_are_not_kept(tmp_path):
    """Only feature settings two runs share go to disk (a VOC image's are 26 MB)."""
    from freesegdiff.evaluation.stage_cache import FEATURES, StageStore

    store = StageStore(tmp_path, shared_features={"kept"})
    assert store.folder(FEATURES, {"x": 1}) is None
    assert store.folder("caption", {"x": 1}) is not None
