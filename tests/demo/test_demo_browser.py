"""End to end: the demo with the tiny preset, driven in headless Chromium like a person would.

Starts the Gradio app on localhost, uploads a bundled photo, presses Segment, waits for the
annotated image, checks every label the pipeline found is in the legend with its colour, and saves
a screenshot (to ``$FREESEGDIFF_ARTIFACTS`` as well when that is set, for CI to keep).

Needs gradio, Playwright for Python and a Chromium binary (Debian: ``apt-get install chromium``;
another one via ``$FREESEGDIFF_CHROMIUM``); skipped with the reason when one is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freesegdiff.demo.app import annotations_for, bundled_examples
from freesegdiff.result import SegmentationResult

pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright (pip install playwright)"
)

CHROMIUM = (
    os.environ.get("FREESEGDIFF_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
if not CHROMIUM:
    pytest.skip(
        "no Chromium found (apt-get install chromium, or set FREESEGDIFF_CHROMIUM)",
        allow_module_level=True,
    )

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


class RecordingPipe:
    """Passes calls to the pipeline and keeps the results, to compare with the page."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.results: list[SegmentationResult] = []

    def __call__(self, image: Any, classes: Any = None) -> SegmentationResult:
        result: SegmentationResult = self.pipe(image, classes=classes)
        self.results.append(result)
        return result


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served_demo() -> Iterator[tuple[str, RecordingPipe]]:
    from freesegdiff.demo.server import serve_demo
    from freesegdiff.pipeline import FreeSegDiff

    pipe = RecordingPipe(FreeSegDiff.from_preset("tiny", device="cpu"))
    # As `freesegdiff demo` serves it: every limit of DemoLimits applied.
    server = serve_demo(pipe, host="127.0.0.1", port=_free_port(), block=False)
    try:
        yield server.url, pipe
    finally:
        server.close()


def _only_localhost(route: Any) -> None:
    """Keep the page offline: web fonts and the like from elsewhere are refused at once."""
    url = route.request.url
    if url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")):
        route.continue_()
    else:
        route.abort()


def test_upload_segment_and_see_the_labels(
    served_demo: tuple[str, RecordingPipe], tmp_path: Path
) -> None:
    url, pipe = served_demo
    photo = next(path for path in bundled_examples() if path.name == "cat.jpg")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.route("**/*", _only_localhost)
            page.goto(url)
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            page.locator("#photo img").first.wait_for(state="visible")
            page.get_by_role("button", name="Segment").click()

            base = page.locator("#annotated img.base-image")
            base.wait_for(state="visible")
            page.wait_for_function(
                "() => { const i = document.querySelector('#annotated img.base-image');"
                " return i && i.complete && i.naturalWidth > 0; }"
            )
            assert len(pipe.results) == 1
            result = pipe.results[0]
            annotations, color_map = annotations_for(result)
            legend = page.locator("#annotated .legend-item")
            if annotations:
                legend.first.wait_for(state="visible")
            assert legend.all_inner_texts() == [text for _, text in annotations]
            assert page.locator("#annotated img.mask").count() == len(annotations)
            for item, text in zip(legend.all(), color_map, strict=True):
                red, green, blue = (int(color_map[text][i : i + 2], 16) for i in (1, 3, 5))
                style = item.get_attribute("style") or ""
                assert f"rgba({red}, {green}, {blue}" in style, (text, style)

            assert page.locator("#caption textarea").input_value() == (result.caption or "")
            assert page.locator("#entities textarea").input_value() == ", ".join(result.entities)
            page.locator("#clusters img").first.wait_for(state="visible")
            assert "total" in page.locator("#timings").inner_text()
            downloads = page.locator("#downloads").inner_text().replace("\n", "")
            for name in ("segmentation.png", "segmentation_overlay.png", "segmentation.json"):
                assert name in downloads

            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    artifacts = os.environ.get("FREESEGDIFF_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artifacts) / "demo_tiny_cat.png")
    assert result.label_map.shape == tuple(reversed(result.image_size))
