"""The demo's request logic and command, with a stand-in pipeline (no browser, no models)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freesegdiff.demo.app import (
    annotations_for,
    bundled_examples,
    parse_class_box,
    run_segmentation,
    timing_rows,
)
from freesegdiff.errors import ConfigError
from freesegdiff.result import Segment, SegmentationResult


class StandInPipe:
    """Splits the image into a left "cat" half and a right "small bird" half; records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], list[str] | None]] = []

    def __call__(self, image: np.ndarray, classes: list[str] | None = None) -> SegmentationResult:
        self.calls.append((image.shape, classes))
        height, width = image.shape[:2]
        label_map = np.zeros((height, width), dtype=np.int32)
        label_map[:, : width // 2] = 1
        label_map[: height // 2, width // 2 :] = 2
        segments = [
            Segment(i, name, score, int((label_map == i).sum()), label_map == i, i)
            for i, name, score in ((1, "cat", 0.875), (2, "small bird", 0.5))
        ]
        masks = np.stack([label_map == i for i in range(3)])
        return SegmentationResult(
            label_map=label_map,
            labels={0: "background", 1: "cat", 2: "small bird"},
            segments=segments,
            caption="a cat and a small bird",
            entities=["cat", "small bird"],
            vocabulary=["cat", "small bird"],
            candidates=["cat", "small bird"],
            cluster_map=label_map.copy(),
            scores=np.array([[0.1, 0.875, 0.2], [0.1, 0.1, 0.5]], dtype=np.float32),
            cluster_labels=[-1, 0, 1],
            coarse_masks=masks,
            refined_masks=masks,
            timings={"caption": 0.25, "features": 1.5},
            image_size=(width, height),
        )


def test_run_segmentation_returns_everything_the_page_shows(tmp_path: Path) -> None:
    pipe = StandInPipe()
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    output = run_segmentation(pipe, image, " cat, small bird ,", workdir=tmp_path)
    assert pipe.calls == [((20, 30, 3), ["cat", "small bird"])]
    assert [text for _, text in output.annotations] == ["cat 0.88", "small bird 0.50"]
    assert output.color_map == {"cat 0.88": "#400000", "small bird 0.50": "#5014d0"}
    cat_mask = output.annotations[0][0]
    assert cat_mask.shape == (20, 30) and cat_mask.dtype == np.float32
    assert cat_mask[:, :15].all() and not cat_mask[:, 15:].any()
    assert output.caption == "a cat and a small bird"
    assert output.entities == "cat, small bird"
    assert output.cluster_map.size == (30, 20)
    assert output.timings == [["caption", 0.25], ["features", 1.5], ["total", 1.75]]
    names = [Path(path).name for path in output.files]
    assert names == ["segmentation.png", "segmentation_overlay.png", "segmentation.json"]
    summary = json.loads((tmp_path / "segmentation.json").read_text())
    assert [label["name"] for label in summary["labels"]] == ["background", "cat", "small bird"]


def test_an_empty_class_box_means_open_vocabulary(tmp_path: Path) -> None:
    pipe = StandInPipe()
    run_segmentation(pipe, np.zeros((8, 8, 3), dtype=np.uint8), "  ", workdir=tmp_path)
    assert pipe.calls[0][1] is None
    assert parse_class_box(None) is None
    assert parse_class_box("cat\ndog") == ["cat", "dog"]


def test_requests_a_user_can_get_wrong_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="upload one or pick an example"):
        run_segmentation(StandInPipe(), None, "")
    with pytest.raises(ConfigError, match="separated by commas"):
        run_segmentation(StandInPipe(), np.zeros((4, 4, 3), dtype=np.uint8), " , ,")


def test_annotations_skip_empty_segments_and_timings_add_a_total() -> None:
    result = StandInPipe()(np.zeros((4, 4, 3), dtype=np.uint8))
    result.label_map[result.label_map == 2] = 0
    annotations, color_map = annotations_for(result)
    assert [text for _, text in annotations] == ["cat 0.88"]
    assert list(color_map) == ["cat 0.88"]
    assert timing_rows({}) == [["total", 0]]


def test_example_photos_are_bundled() -> None:
    names = [path.name for path in bundled_examples()]
    assert {"cat.jpg", "coffee.jpg"} <= set(names) and names == sorted(names)
    assert all(path.is_file() for path in bundled_examples())


def test_build_demo_lays_out_the_components() -> None:
    pytest.importorskip("gradio", reason="the web demo needs gradio")
    import gradio as gr

    from freesegdiff.demo.app import build_demo

    demo = build_demo(StandInPipe(), examples=[])
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"photo", "classes", "segment", "annotated", "clusters", "timings"} <= ids


def test_demo_command_parses_and_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    from freesegdiff.cli import build_parser
    from freesegdiff.commands import demo as demo_command

    args = build_parser().parse_args(
        ["demo", "--preset", "tiny", "--host", "0.0.0.0", "--port", "7999"]
    )
    assert args.run is demo_command.run
    assert (args.preset, args.host, args.port) == ("tiny", "0.0.0.0", 7999)

    launched: dict[str, Any] = {}

    class FakeApp:
        def queue(self, **kwargs: Any) -> FakeApp:
            return self

        def launch(self, **kwargs: Any) -> None:
            launched.update(kwargs)

    monkeypatch.setattr(demo_command, "pipeline_from_args", lambda a: StandInPipe())
    monkeypatch.setattr("freesegdiff.demo.app.build_demo", lambda pipe, examples: FakeApp())
    monkeypatch.setattr("freesegdiff.demo.app.import_gradio", lambda: None)  # runs without it
    assert demo_command.run(argparse.Namespace(**vars(args))) == 0
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 7999
