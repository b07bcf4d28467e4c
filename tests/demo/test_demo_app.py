"""The demo's request logic and command, with a stand-in pipeline (no browser, no models)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from freesegdiff.demo import limits as limits_module
from freesegdiff.demo.app import (
    annotations_for,
    bundled_examples,
    parse_class_box,
    run_segmentation,
    timing_rows,
)
from freesegdiff.demo.limits import DemoLimits, RequestFolders, read_photo
from freesegdiff.demo.server import ensure_port_free
from freesegdiff.errors import ConfigError, ImageReadError, ImageTooLargeError
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


def test_demo_command_parses_and_launches_with_the_limits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("gradio", reason="the web demo needs gradio")
    from freesegdiff.cli import build_parser, common
    from freesegdiff.cli import demo as demo_command

    args = build_parser().parse_args(
        [
            *("demo", "--preset", "tiny", "--host", "127.0.0.1", "--port", str(_free_port())),
            *("--max-upload-mb", "2", "--queue-size", "5", "--cache-minutes", "10"),
        ]
    )
    assert args.run is demo_command.run
    assert (args.preset, args.host) == ("tiny", "127.0.0.1")

    calls: dict[str, Any] = {}

    class FakeApp:
        def queue(self, **kwargs: Any) -> FakeApp:
            calls["queue"] = kwargs
            return self

        def launch(self, **kwargs: Any) -> tuple[None, str, None]:
            calls["launch"] = kwargs
            return None, "http://127.0.0.1:1/", None

        def block_thread(self) -> None:
            calls["blocked"] = True

        def close(self, verbose: bool = True) -> None:
            calls["closed"] = True

    def fake_build_demo(pipe: Any, **kwargs: Any) -> FakeApp:
        calls["build"] = kwargs
        return FakeApp()

    monkeypatch.setattr(common, "pipeline_from_args", lambda a: StandInPipe())
    monkeypatch.setattr("freesegdiff.demo.server.build_demo", fake_build_demo)
    assert demo_command.run(argparse.Namespace(**vars(args))) == 0
    assert calls["queue"] == {"default_concurrency_limit": 1, "max_size": 5}
    launch = calls["launch"]
    assert launch["server_name"] == "127.0.0.1" and launch["server_port"] == args.port
    assert launch["max_file_size"] == 2 * 1024 * 1024
    assert launch["state_session_capacity"] == 64 and launch["share"] is False
    limits = calls["build"]["limits"]
    assert limits.max_pixels == 40_000_000  # the demo's own default, below the pipeline's
    assert (limits.cache_age_seconds, limits.cache_check_seconds) == (600, 60)
    assert calls["blocked"] and calls["closed"]
    assert not calls["build"]["folders"].root.exists()  # removed when the server stopped


def test_max_pixels_given_on_the_command_line_is_the_demos_limit() -> None:
    from freesegdiff.cli import build_parser
    from freesegdiff.cli.common import config_from_args
    from freesegdiff.cli.demo import demo_limits

    args = build_parser().parse_args(["demo", "--preset", "tiny", "--max-pixels", "90000000"])
    assert demo_limits(args, config_from_args(args)).max_pixels == 90_000_000
    args = build_parser().parse_args(
        ["demo", "--preset", "tiny", "--set", "limits.max_pixels=1000000"]
    )
    assert demo_limits(args, config_from_args(args)).max_pixels == 1_000_000  # the smaller
    args = build_parser().parse_args(["demo", "--preset", "tiny", "--oversize", "downscale"])
    assert demo_limits(args, config_from_args(args)).oversize == "downscale"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_photos_above_the_limits_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(big)
    limits = DemoLimits(max_upload_bytes=big.stat().st_size - 1, max_pixels=None)
    with pytest.raises(ImageTooLargeError, match=r"big.png is 0.0 MB, above this demo's upload"):
        read_photo({"path": str(big), "orig_name": "big.png"}, limits)

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the photo was decoded")

    monkeypatch.setattr(limits_module, "load_image", no_decoding)
    with pytest.raises(
        ImageTooLargeError, match=r"300x200 = 0.06 Mpx, above this demo's limit of 0.02 Mpx: "
    ):
        read_photo(big, DemoLimits(max_pixels=20_000))
    monkeypatch.undo()
    # A header of 30000x30000 (900 Mpx, beyond Pillow's own limit) costs nothing to refuse,
    # and the message says its size and a size that fits (the one header reader, io.images).
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30_000, 30_000))
    monkeypatch.setattr(limits_module, "load_image", no_decoding)
    with pytest.raises(
        ImageTooLargeError, match=r"bomb.png is 30000x30000 = 900 Mpx, .* \(e.g. to 6324x6324\)"
    ):
        read_photo({"path": str(bomb), "orig_name": "bomb.png"}, DemoLimits())
    monkeypatch.undo()
    # Within the limits, or downscaled to fit them
    assert read_photo(str(big), DemoLimits()).shape == (200, 300, 3)
    small = read_photo(big, DemoLimits(max_pixels=20_000, oversize="downscale"))
    assert small.shape[0] * small.shape[1] <= 20_000


def _png_header(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb's header)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = 8 + 4 + 4  # signature, IHDR length, "IHDR"
    data[start : start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : start + 13]))  # over "IHDR" and its 13 bytes
    data[start + 13 : start + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_a_file_that_is_no_photo_is_named_in_the_message(tmp_path: Path) -> None:
    text = tmp_path / "abc123.png"
    text.write_text("not a picture")
    with pytest.raises(ImageReadError, match=r"^notes.png is not a picture this demo can read"):
        read_photo({"path": str(text), "orig_name": "notes.png"})
    with pytest.raises(ImageReadError, match="did not arrive"):
        read_photo({"path": str(tmp_path / "gone.png"), "orig_name": "gone.png"})
    with pytest.raises(ConfigError, match="upload one or pick an example"):
        read_photo({"path": None})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"queue_size": 0}, "queue_size must be at least 1, got 0 (pass --queue-size 1"),
        ({"max_upload_bytes": 0}, "upload limit must be positive"),
        ({"max_pixels": -1}, "pixel limit must be positive"),
        ({"oversize": "crop"}, 'oversize must be "refuse" or "downscale"'),
        ({"cache_age_seconds": 0}, "cache_age_seconds must be at least 1"),
    ],
)
def test_limits_that_cannot_work_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        DemoLimits(**changes)


def test_request_folders_keep_only_the_last_ones(tmp_path: Path) -> None:
    folders = RequestFolders(keep=2, root=tmp_path / "requests")
    made = []
    for _ in range(5):
        made.append(folders.new())
        (made[-1] / "segmentation.png").write_bytes(b"x")  # a request's files
    assert folders.folders() == made[-2:]
    assert sorted(p.name for p in folders.root.iterdir()) == [p.name for p in made[-2:]]
    folders.close()
    assert not folders.root.exists()
    with pytest.raises(ConfigError, match="at least 1"):
        RequestFolders(keep=0)


def test_a_busy_port_is_found_before_anything_loads() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(
            ConfigError,
            match=rf"^port {port} on 127.0.0.1 is in use: pass --port another or stop the other",
        ):
            ensure_port_free("127.0.0.1", port)
    ensure_port_free("127.0.0.1", _free_port())  # free: no error
    with pytest.raises(ConfigError, match="between 1 and 65535"):
        ensure_port_free("127.0.0.1", 70000)


def test_the_handler_answers_user_errors_with_a_message_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gr = pytest.importorskip("gradio", reason="the web demo needs gradio")
    from freesegdiff.demo.app import build_demo

    limits = DemoLimits(max_pixels=1_000, keep_requests=2)
    folders = RequestFolders(keep=2, root=tmp_path / "requests")
    demo = build_demo(StandInPipe(), examples=[], limits=limits, folders=folders)
    (event,) = [fn for fn in demo.fns.values() if fn.api_name == "segment"]
    assert event.preprocess is False  # the handler checks the upload before it is decoded
    assert demo.delete_cache == (limits.cache_check_seconds, limits.cache_age_seconds)
    photo, small = tmp_path / "photo.png", tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(photo)  # 1200 pixels, above the limit
    Image.new("RGB", (20, 30)).save(small)
    cases = [
        ((None, ""), "no photo yet"),
        (({"path": str(photo), "orig_name": "photo.png"}, ""), "above this demo's limit"),
        (({"path": str(photo), "orig_name": "photo.png"}, " , "), "holds no class name"),
    ]
    for inputs, message in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(gr.Error, match=message) as caught:
            event.fn(*inputs)
        assert caught.value.print_exception is False  # Gradio prints no traceback
        assert [record.getMessage() for record in caplog.records] == [
            f"demo request refused: {caught.value.message}"
        ]
        assert all(record.exc_info is None for record in caplog.records)

    outputs = event.fn({"path": str(small), "orig_name": "small.png"}, "cat")
    assert outputs[0]["__type__"] == "update"  # not a new component: see build_demo
    assert set(outputs[0]["color_map"]) == {"cat 0.88", "small bird 0.50"}
    assert [Path(path).name for path in outputs[5]] == [
        "segmentation.png",
        "segmentation_overlay.png",
        "segmentation.json",
    ]
    assert all(Path(path).parent.parent == folders.root for path in outputs[5])


def test_an_unexpected_failure_is_logged_with_its_traceback_and_told_briefly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gr = pytest.importorskip("gradio", reason="the web demo needs gradio")
    from freesegdiff.demo.app import build_demo

    def broken(image: Any, classes: Any = None) -> SegmentationResult:
        raise RuntimeError("boom")

    demo = build_demo(broken, examples=[], folders=RequestFolders(root=tmp_path / "r"))
    (event,) = [fn for fn in demo.fns.values() if fn.api_name == "segment"]
    with caplog.at_level(logging.WARNING), pytest.raises(gr.Error, match="RuntimeError"):
        event.fn(np.zeros((8, 8, 3), dtype=np.uint8), "")
    assert [record.exc_info is not None for record in caplog.records] == [True]


def test_the_naclip_preset_serves_the_demo_with_a_class_box(tmp_path: Path) -> None:
    """NACLIP's preset (a tiny CLIP, a small short side): a class box names every pixel; an
    empty one says what to do, as it needs a captioner the preset does not load."""
    pytest.importorskip("cv2")
    from freesegdiff import FreeSegDiff

    pipe = FreeSegDiff.from_preset(
        "naclip", overrides={"models.clip": "tiny:clip", "dense.short_side": 48}
    )
    photo = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    output = run_segmentation(pipe, photo, "cat, sofa, wall", workdir=tmp_path)
    assert output.result.vocabulary == ["cat", "sofa", "wall"]
    assert set(np.unique(output.result.label_map)) <= {1, 2, 3}  # prob_thd 0: no background
    assert output.result.cluster_map.shape == (40, 56) and output.caption == ""
    with pytest.raises(ConfigError, match="open vocabulary needs a captioner"):
        run_segmentation(pipe, photo, "", workdir=tmp_path)
