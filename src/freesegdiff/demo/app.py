"""The Gradio web demo: upload or pick a photo, optionally type class names, press Segment.

It shows the annotated image (every label in its colour, with its CLIP score), the caption, the
entities, the k-means cluster map and the seconds spent per stage, and offers the label-map PNG,
the overlay and the JSON summary for download.

The work is split so the logic is testable without a browser: :func:`run_segmentation` does one
request and returns plain values; :func:`build_demo` only lays out components and wires them to it.
Gradio, the ``[demo]`` extra (``pip install "freesegdiff[demo]"``), is imported inside
:func:`build_demo` (and :func:`import_gradio`).

Robustness (:class:`DemoLimits` holds the numbers; :func:`serve_demo` applies them all):

- Uploads above ``max_upload_bytes`` are refused by Gradio (``launch(max_file_size=...)``) and
  again by the handler; photos above ``max_pixels`` are refused from their header, before
  decoding.
- One request on the models at a time; at most ``queue_size`` wait, more are told the app is
  busy (Gradio's ``queue(max_size=...)``).
- Each request's files live in a folder of :class:`RequestFolders`, which keeps the last
  ``keep_requests`` of them; Gradio's own cache (uploads, the images and files it serves) is
  swept every ``cache_check_seconds`` of files older than ``cache_age_seconds``.
- Gradio keeps a little state per browser session (the last outputs' settings); at most
  ``sessions`` are kept, the oldest dropped, so memory stays flat however many visitors come.
- A request a user got wrong (no photo, not an image, too large, an empty class list) is
  answered with a message and logged as one WARNING line, without a traceback.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from freesegdiff.demo.limits import DemoLimits, RequestFolders, read_photo
from freesegdiff.errors import FreeSegDiffError
from freesegdiff.infra.extras import require
from freesegdiff.io.images import IMAGE_SUFFIXES
from freesegdiff.io.outputs import write_outputs
from freesegdiff.io.visualize.cluster_map import render_cluster_map
from freesegdiff.io.visualize.colors import colors_for
from freesegdiff.result import SegmentationResult
from freesegdiff.stages.vocabulary import parse_class_names

TITLE = "FreeSeg-Diff: training-free open-vocabulary segmentation"
INTRO = (
    "A captioner describes the photo; the nouns of the caption become labels. Stable Diffusion "
    "features are clustered with k-means, CLIP names each cluster, and a dense CRF sharpens the "
    "edges. Leave the class box empty for open vocabulary, or type comma-separated class names."
)
DOWNLOAD_STEM = "segmentation"

Segmenter = Callable[..., SegmentationResult]  # pipe(image, classes=...) -> result

logger = logging.getLogger(__name__)


@dataclass
class DemoOutput:
    """Everything one press of Segment shows.

    Attributes:
        image: ``(H, W, 3)`` uint8, the photo as segmented.
        annotations: ``[(mask (H, W) float32 in {0, 1}, legend text)]``, one per segment.
        color_map: ``{legend text: "#rrggbb"}``, each segment's label colour.
        caption, entities: the captioner's text ("" if none) and the entities, comma-separated.
        cluster_map: RGB picture of the k-means clusters at the image size.
        timings: ``[[stage, seconds]]`` in pipeline order, then ``["total", seconds]``.
        files: paths of the label-map PNG, the overlay PNG and the JSON summary.
        result: the pipeline's result, for callers that want more.
    """

    image: np.ndarray
    annotations: list[tuple[np.ndarray, str]]
    color_map: dict[str, str]
    caption: str
    entities: str
    cluster_map: Image.Image
    timings: list[list[Any]]
    files: list[str]
    result: SegmentationResult


def bundled_examples() -> list[Path]:
    """The example photos shipped in ``freesegdiff/data/examples`` (sorted by name)."""
    folder = resources.files("freesegdiff") / "data" / "examples"
    if not folder.is_dir():
        return []
    return sorted(
        Path(str(entry))
        for entry in folder.iterdir()
        if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
    )


def parse_class_box(text: str | None) -> list[str] | None:
    """The class box's text -> class names; empty or blank -> None (open vocabulary)."""
    return parse_class_names(text, what="the class box", blank_is_open=True)


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def annotations_for(
    result: SegmentationResult,
) -> tuple[list[tuple[np.ndarray, str]], dict[str, str]]:
    """``gr.AnnotatedImage`` annotations and colour map of a result.

    Returns:
        ``[(mask (H, W) float32 0/1, "label score")]`` per segment with a non-empty mask, in
        painting order, and ``{"label score": "#rrggbb"}`` with the label colours of
        :mod:`freesegdiff.io.visualize.colors` (the overlay's colours).
    """
    colors = colors_for(result.labels)
    label_map = np.asarray(result.label_map)
    annotations: list[tuple[np.ndarray, str]] = []
    color_map: dict[str, str] = {}
    for segment in result.segments:
        mask = label_map == segment.id
        if not mask.any():
            continue
        text = f"{segment.label} {segment.score:.2f}"
        annotations.append((mask.astype(np.float32), text))
        color_map[text] = _hex(colors[segment.id])
    return annotations, color_map


def timing_rows(timings: dict[str, float]) -> list[list[Any]]:
    """``[[stage, seconds rounded to ms]]`` plus a ``total`` row."""
    rows: list[list[Any]] = [[stage, round(seconds, 3)] for stage, seconds in timings.items()]
    rows.append(["total", round(sum(timings.values()), 3)])
    return rows


def run_segmentation(
    pipe: Segmenter,
    image: Any,
    class_text: str | None,
    workdir: str | Path | None = None,
    lock: threading.Lock | None = None,
    limits: DemoLimits | None = None,
) -> DemoOutput:
    """Serve one request: segment ``image`` and write the downloadable files.

    Args:
        pipe: the pipeline (anything called as ``pipe(image, classes=...)``).
        image: the uploaded photo (Gradio's file payload, a path, an array or a PIL image);
            None raises ConfigError.
        class_text: the class box ("" or None: open vocabulary).
        workdir: where the files go (created if missing); default: a fresh temporary folder,
            which the caller deletes.
        lock: held around the pipeline call (one request on the models at a time).
        limits: the upload and pixel limits (see :func:`read_photo`).

    Raises:
        ConfigError: no image was given or the class box cannot be read.
        ImageReadError: the photo is not an image, or (:class:`ImageTooLargeError`) too large.
        FreeSegDiffError: the pipeline failed for a reason the user can act on.
    """
    classes = parse_class_box(class_text)
    pixels = read_photo(image, limits)
    if lock is None:
        result = pipe(pixels, classes=classes)
    else:
        with lock:
            result = pipe(pixels, classes=classes)
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fsd-demo-"))
    written = write_outputs(result, pixels, folder, stem=DOWNLOAD_STEM)
    files = [str(written[kind]) for kind in ("png", "overlay", "json") if kind in written]
    annotations, color_map = annotations_for(result)
    return DemoOutput(
        image=pixels,
        annotations=annotations,
        color_map=color_map,
        caption=result.caption or "",
        entities=", ".join(result.entities),
        cluster_map=render_cluster_map(result.cluster_map),
        timings=timing_rows(result.timings),
        files=files,
        result=result,
    )


def import_gradio() -> Any:
    """gradio, set up to work offline, or a :class:`MissingExtraError` naming ``[demo]``."""
    # No usage reporting or version check calls: the demo must work offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return require("demo")


def build_demo(
    pipe: Segmenter,
    *,
    examples: Sequence[str | Path] | None = None,
    title: str = TITLE,
    limits: DemoLimits | None = None,
    folders: RequestFolders | None = None,
) -> Any:
    """The Gradio app around ``pipe``.

    Args:
        pipe: a loaded :class:`~freesegdiff.pipeline.FreeSegDiff` (or anything called as
            ``pipe(image, classes=...)`` returning a :class:`SegmentationResult`).
        examples: photos offered as examples; default: :func:`bundled_examples`.
        title: page title.
        limits: what a request may be and what is kept (default: :class:`DemoLimits`'s);
            the Blocks sweeps Gradio's cache by it (``delete_cache``). The queue and launch
            settings are :func:`serve_demo`'s.
        folders: where each request's files go; default: a new :class:`RequestFolders`
            keeping ``limits.keep_requests`` of them.

    Returns:
        a ``gradio.Blocks``; :func:`serve_demo` launches it with every limit applied.
    """
    gr = import_gradio()

    limits = limits if limits is not None else DemoLimits()
    folders = folders if folders is not None else RequestFolders(limits.keep_requests)
    lock = threading.Lock()
    example_paths = [str(p) for p in (bundled_examples() if examples is None else examples)]

    def segment(image: Any, class_text: str | None) -> tuple[Any, ...]:
        try:
            output = run_segmentation(
                pipe, image, class_text, workdir=folders.new(), lock=lock, limits=limits
            )
        except FreeSegDiffError as error:  # the user's to fix: a message, no traceback
            logger.warning("demo request refused: %s", error)
            raise gr.Error(str(error), print_exception=False) from error
        except Exception as error:  # a bug: the traceback goes to the log, not to the page
            logger.exception("demo request failed")
            raise gr.Error(
                f"segmenting failed unexpectedly ({type(error).__name__}); the server log has "
                "the details. Try another photo, or report the problem with that log.",
                print_exception=False,
            ) from error
        annotated: Any = (output.image, output.annotations)
        # An update, not a new component: a component built here would run its postprocess
        # (every PNG of the base image and masks encoded) once more, in its constructor.
        return (
            gr.update(value=annotated, color_map=output.color_map),
            output.caption,
            output.entities,
            output.cluster_map,
            output.timings,
            output.files,
        )

    with gr.Blocks(
        title=title,
        analytics_enabled=False,
        delete_cache=(limits.cache_check_seconds, limits.cache_age_seconds),
    ) as demo:
        gr.Markdown(f"# {title}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                # The handler gets the uploaded file itself (preprocess=False below): its size
                # and header are checked before anything decodes it.
                photo = gr.Image(
                    label="Photo",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    elem_id="photo",
                )
                classes = gr.Textbox(
                    label="Class names (optional)",
                    placeholder="cat, dog, sofa  (empty: open vocabulary from the caption)",
                    elem_id="classes",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if example_paths:
                    gr.Examples(
                        examples=[[path] for path in example_paths],
                        inputs=[photo],
                        label="Example photos",
                    )
            with gr.Column(scale=2):
                annotated = gr.AnnotatedImage(label="Segments", elem_id="annotated")
                with gr.Row():
                    caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                    entities = gr.Textbox(label="Entities", interactive=False, elem_id="entities")
                with gr.Row():
                    clusters = gr.Image(
                        label="k-means clusters (before naming)",
                        type="pil",
                        interactive=False,
                        elem_id="clusters",
                    )
                    timings = gr.Dataframe(
                        headers=["stage", "seconds"],
                        label="Seconds per stage",
                        interactive=False,
                        elem_id="timings",
                    )
                downloads = gr.File(
                    label="Downloads: label map PNG, overlay, JSON",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
        button.click(
            segment,
            inputs=[photo, classes],
            outputs=[annotated, caption, entities, clusters, timings, downloads],
            api_name="segment",
            preprocess=False,
        )
    return demo


def __getattr__(name: str) -> Any:
    from freesegdiff import _moved

    return _moved.moved_name(__name__, name)  # serving moved to demo/server.py
