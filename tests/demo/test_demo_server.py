"""The running demo's limits, with a stand-in pipeline (no models): Gradio's own upload limit,
the bounded queue's busy refusal, and refused photos answered without a traceback in the log."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_demo_app import StandInPipe

from freesegdiff.demo.limits import DemoLimits
from freesegdiff.demo.server import DemoServer, serve_demo
from freesegdiff.result import SegmentationResult

pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio)")
gradio_client = pytest.importorskip("gradio_client", reason="these tests use gradio_client")
httpx = pytest.importorskip("httpx")

TIMEOUT_S = 60.0


class GatedPipe(StandInPipe):
    """The stand-in, but each call waits until :attr:`gate` is set; :attr:`entered` tells."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, image: np.ndarray, classes: list[str] | None = None) -> SegmentationResult:
        self.entered.set()
        assert self.gate.wait(TIMEOUT_S), "the test never opened the gate"
        return super().__call__(image, classes)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"after {TIMEOUT_S:.0f} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def gated_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[DemoServer, GatedPipe]]:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-cache"))
    pipe = GatedPipe()
    limits = DemoLimits(max_upload_bytes=50_000, max_pixels=100_000, queue_size=1)
    server = serve_demo(pipe, port=_free_port(), examples=[], limits=limits, block=False)
    try:
        yield server, pipe
    finally:
        pipe.gate.set()
        server.close()


def _client(server: DemoServer) -> Any:
    return gradio_client.Client(
        server.url, verbose=False, analytics_enabled=False, download_files=False
    )


def test_gradio_refuses_an_upload_above_the_limit(
    gated_server: tuple[DemoServer, GatedPipe],
) -> None:
    server, _ = gated_server
    upload = server.url.rstrip("/") + "/gradio_api/upload"

    def post(size: int) -> Any:
        files = {"files": ("photo.jpg", b"\0" * size, "image/jpeg")}
        return httpx.post(upload, files=files, timeout=TIMEOUT_S)

    too_large = post(60_000)  # above max_upload_bytes=50_000
    assert too_large.status_code == 413 and "maximum allowed size" in too_large.text
    assert post(1_000).status_code == 200


def test_a_request_beyond_the_queue_is_refused_as_busy(
    gated_server: tuple[DemoServer, GatedPipe], tmp_path: Path
) -> None:
    server, pipe = gated_server
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photo)
    file = gradio_client.handle_file(str(photo))
    running = _client(server).submit(file, "", api_name="/segment")
    _wait_for(pipe.entered.is_set, "the first request never reached the pipeline")
    waiting = _client(server).submit(file, "", api_name="/segment")
    _wait_for(lambda: len(server.blocks._queue) == 1, "the second request was not queued")
    refused = _client(server).submit(file, "", api_name="/segment")
    with pytest.raises(gradio_client.utils.QueueError, match="Queue is full"):
        refused.result(timeout=TIMEOUT_S)
    pipe.gate.set()
    for job in (running, waiting):
        outputs = job.result(timeout=TIMEOUT_S)
        assert outputs[1] == "a cat and a small bird"
    assert len(pipe.calls) == 2


def test_refused_photos_get_a_message_and_no_traceback_in_the_log(
    gated_server: tuple[DemoServer, GatedPipe],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, pipe = gated_server
    pipe.gate.set()
    huge = tmp_path / "huge.png"
    Image.new("RGB", (400, 300)).save(huge)  # 120000 pixels, above the 100000 allowed
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    client = _client(server)
    cases = [
        (huge, "huge.png is 400x300 = 0.12 Mpx, above this demo's limit of 0.1 Mpx"),
        (text, "notes.png is not a picture this demo can read"),
    ]
    for path, message in cases:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(gradio_client.handle_file(str(path)), "", api_name="/segment")
    assert pipe.calls == []
    refusals = [r for r in caplog.records if r.getMessage().startswith("demo request refused")]
    assert len(refusals) == len(cases)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_gradio_s_cache_is_swept_of_old_files_while_the_server_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    limits = DemoLimits(cache_check_seconds=1, cache_age_seconds=1, keep_requests=1)
    server = serve_demo(StandInPipe(), port=_free_port(), examples=[], limits=limits, block=False)
    try:
        photo = tmp_path / "photo.png"
        Image.new("RGB", (40, 30), (10, 10, 200)).save(photo)
        client = _client(server)
        for _ in range(2):
            outputs = client.predict(gradio_client.handle_file(str(photo)), "", api_name="/segment")
            assert len(outputs[5]) == 3  # the downloads
        files = [path for path in cache.rglob("*") if path.is_file()]
        assert any(path.name == "segmentation.json" for path in files)  # served downloads
        assert any(path.name == "photo.png" for path in files)  # the upload
        _wait_for(lambda: not any(path.exists() for path in files), "Gradio's cache was not swept")
        assert len(server.folders.folders()) == 1  # keep_requests: only the last request's
    finally:
        server.close()
