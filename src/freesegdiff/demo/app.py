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

import collections
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from freesegdiff.errors import ConfigError, FreeSegDiffError, ImageReadError, ImageTooLargeError
from freesegdiff.infra.extras import require
from freesegdiff.io.images import IMAGE_SUFFIXES, load_image
from freesegdiff.io.outputs import write_outputs
from freesegdiff.io.visualize.cluster_map import render_cluster_map
from freesegdiff.io.visualize.colors import colors_for
from freesegdiff.result import SegmentationResult

TITLE = "FreeSeg-Diff: training-free open-vocabulary segmentation"
INTRO = (
    "A captioner describes the photo; the nouns of the caption become labels. Stable Diffusion "
    "features are clustered with k-means, CLIP names each cluster, and a dense CRF sharpens the "
    "edges. Leave the class box empty for open vocabulary, or type comma-separated class names."
)
DOWNLOAD_STEM = "segmentation"
MB = 1024 * 1024  # the "MB" of --max-upload-mb

Segmenter = Callable[..., SegmentationResult]  # pipe(image, classes=...) -> result

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoLimits:
    """What one demo server accepts and keeps (the module docstring says where each applies).

    Attributes:
        max_upload_bytes: largest photo file accepted; None: any size.
        max_pixels: most pixels (width x height, from the file's header) a photo may have;
            None: any.
        oversize: ``"refuse"`` a photo above ``max_pixels`` or ``"downscale"`` it to fit.
        queue_size: requests that may wait while one runs; more are refused as busy.
        keep_requests: request folders (the downloads) kept on disk; older ones are deleted.
        sessions: browser sessions whose Gradio state is kept; older ones are dropped.
        cache_check_seconds, cache_age_seconds: every ``cache_check_seconds``, files of
            Gradio's cache (uploads, served images and downloads) older than
            ``cache_age_seconds`` are deleted; all of them when the server stops. The age must
            be well above the longest wait in the queue (``queue_size`` requests' time), or an
            upload may be swept before its request runs (which then asks to upload again).
    """

    max_upload_bytes: int | None = 25 * MB
    max_pixels: int | None = 40_000_000
    oversize: str = "refuse"
    queue_size: int = 8
    keep_requests: int = 8
    sessions: int = 64
    cache_check_seconds: int = 60
    cache_age_seconds: int = 15 * 60

    def __post_init__(self) -> None:
        counts = {
            "queue_size": (self.queue_size, "--queue-size"),
            "keep_requests": (self.keep_requests, ""),
            "sessions": (self.sessions, ""),
            "cache_check_seconds": (self.cache_check_seconds, ""),
            "cache_age_seconds": (self.cache_age_seconds, "--cache-minutes"),
        }
        for name, (value, flag) in counts.items():
            if value < 1:
                how = f" (pass {flag} 1 or more)" if flag else ""
                raise ConfigError(f"the demo's {name} must be at least 1, got {value}{how}")
        if self.max_upload_bytes is not None and self.max_upload_bytes < 1:
            raise ConfigError(
                f"the demo's upload limit must be positive, got {self.max_upload_bytes} bytes "
                "(pass --max-upload-mb with a positive number)"
            )
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(
                f"the demo's pixel limit must be positive, got {self.max_pixels} "
                "(pass --max-pixels with a positive number)"
            )
        if self.oversize not in ("refuse", "downscale"):
            raise ConfigError(
                f'the demo\'s oversize must be "refuse" or "downscale", got {self.oversize!r}'
            )


class RequestFolders:
    """Fresh folders for requests' files, of which only the last ``keep`` stay on disk.

    Gradio copies the files a request returns into its own cache before the response leaves,
    so a request's folder is only needed until the next requests; the root folder goes when
    :meth:`close` is called, the object is collected, or the interpreter exits.
    """

    def __init__(self, keep: int = 8, root: str | Path | None = None) -> None:
        if keep < 1:
            raise ConfigError(f"RequestFolders must keep at least 1 folder, got {keep}")
        self.keep = keep
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="freesegdiff-demo-"))
        else:
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        self._folders: collections.deque[Path] = collections.deque()
        self._count = 0
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def new(self) -> Path:
        """A new empty folder under :attr:`root`; the oldest beyond ``keep`` are deleted."""
        with self._lock:
            self._count += 1
            folder = self.root / f"request-{self._count:08d}"
            folder.mkdir(parents=True)
            self._folders.append(folder)
            stale = [self._folders.popleft() for _ in range(len(self._folders) - self.keep)]
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def folders(self) -> list[Path]:
        """The folders kept now, oldest first."""
        with self._lock:
            return list(self._folders)

    def close(self) -> None:
        """Delete the root folder and everything in it."""
        self._finalizer()


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
    if text is None or not text.strip():
        return None
    names = [name.strip() for name in text.replace("\n", ",").split(",") if name.strip()]
    if not names:
        raise ConfigError(
            f"the class box {text!r} holds no class name: type names separated by commas, e.g. "
            "'cat, dog, sofa', or leave it empty for open vocabulary"
        )
    return names


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


def _megabytes(size: int) -> str:
    return f"{size / MB:.1f} MB"


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} Mpx"


def _header_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the file's header (nothing decoded); None if Pillow refuses it."""
    from PIL import UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.size
        except Image.DecompressionBombError:
            return None  # above Pillow's own limit: load_image refuses it below
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ImageReadError(f"cannot read it as an image: {error}") from error


def read_photo(image: Any, limits: DemoLimits | None = None) -> np.ndarray:
    """The request's photo as ``(H, W, 3)`` uint8, within ``limits``.

    Args:
        image: Gradio's file payload (a mapping with ``path`` and ``orig_name``), a path, a
            PIL image or an array; None raises ConfigError.
        limits: the upload and pixel limits (default: :class:`DemoLimits`'s). A file's size and
            header are checked before a byte of pixels is decoded.

    Raises:
        ConfigError: no photo was given.
        ImageTooLargeError: the file or the picture is above a limit.
        ImageReadError: the file is not a picture Pillow can decode.
    """
    limits = limits if limits is not None else DemoLimits()
    if isinstance(image, Mapping):  # Gradio's FileData payload
        name = image.get("orig_name") or "the photo"
        image = image.get("path")
    else:
        name = "the photo"
    if image is None:
        raise ConfigError("no photo yet: upload one or pick an example, then press Segment")
    if not isinstance(image, (str, Path)):
        return load_image(image, max_pixels=limits.max_pixels, oversize=limits.oversize)
    path = Path(image)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageReadError(
            f"{name} did not arrive ({error.strerror or error}): upload it again"
        ) from error
    if limits.max_upload_bytes is not None and size > limits.max_upload_bytes:
        raise ImageTooLargeError(
            f"{name} is {_megabytes(size)}, above this demo's upload limit of "
            f"{_megabytes(limits.max_upload_bytes)}: upload a smaller file (a JPEG, or the "
            "photo downscaled)"
        )
    unreadable = (
        f"{name} is not a picture this demo can read (JPEG, PNG, WebP, BMP, TIFF or GIF): "
        "upload another file"
    )
    try:
        header = _header_size(path)
    except ImageReadError as error:
        raise ImageReadError(unreadable) from error
    if header is not None and limits.oversize == "refuse" and limits.max_pixels is not None:
        width, height = header
        if width * height > limits.max_pixels:
            raise ImageTooLargeError(
                f"{name} is {width}x{height} = {_mpx(width * height)}, above this "
                f"demo's limit of {_mpx(limits.max_pixels)}: downscale it (e.g. to "
                f"{_fitting_example(width, height, limits.max_pixels)}) and upload it again"
            )
    try:
        return load_image(path, max_pixels=limits.max_pixels, oversize=limits.oversize)
    except ImageTooLargeError as error:  # beyond Pillow's header limit, or too large to shrink
        limit = _mpx(limits.max_pixels) if limits.max_pixels else "its limit"
        raise ImageTooLargeError(
            f"{name} has too many pixels for this demo (its limit is {limit}): downscale it and "
            "upload it again"
        ) from error
    except ImageReadError as error:
        raise ImageReadError(unreadable) from error


def _fitting_example(width: int, height: int, max_pixels: int) -> str:
    """A size of the same aspect ratio within ``max_pixels``, as ``WxH``."""
    scale = (max_pixels / (width * height)) ** 0.5
    return f"{max(1, int(width * scale))}x{max(1, int(height * scale))}"


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


@dataclass
class DemoServer:
    """A running demo: its Gradio app, address and request folders."""

    blocks: Any
    url: str
    folders: RequestFolders
    limits: DemoLimits

    def close(self) -> None:
        """Stop the server (Gradio empties its cache) and delete the request folders."""
        try:
            self.blocks.close(verbose=False)
        finally:
            self.folders.close()


def ensure_port_free(host: str, port: int) -> None:
    """Raise :class:`ConfigError` unless a server could listen on ``host``:``port`` now.

    Called before any model loads, so a port in use costs a second, not the loading time.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ConfigError(
            f"cannot listen on {host!r}: {error.strerror or error}; pass --host with an address "
            "of this machine (127.0.0.1, or 0.0.0.0 for every interface)"
        ) from error
    with socket.socket(family, kind, proto) as probe:
        if sys.platform != "win32":  # as uvicorn: a port in TIME_WAIT is free to listen on
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except PermissionError as error:
            raise ConfigError(
                f"not allowed to listen on port {port} on {host}: pass --port 1024 or above"
            ) from error
        except OSError as error:
            raise ConfigError(
                f"port {port} on {host} is in use: pass --port another or stop the other server"
                f" ({error.strerror or error})"
            ) from error


def serve_demo(
    pipe: Segmenter,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: Sequence[str | Path] | None = None,
    limits: DemoLimits | None = None,
    block: bool = True,
) -> DemoServer:
    """Build the app around ``pipe`` and serve it with every limit of ``limits`` applied.

    Args:
        pipe: see :func:`build_demo`.
        host, port: where to listen.
        examples: see :func:`build_demo`.
        limits: default: :class:`DemoLimits`'s.
        block: serve until interrupted (Ctrl-C) and then stop and clean up; False: return the
            running server at once (call :meth:`DemoServer.close` when done).

    Returns:
        the server (when ``block``, already closed).
    """
    limits = limits if limits is not None else DemoLimits()
    folders = RequestFolders(limits.keep_requests)
    try:
        demo = build_demo(pipe, examples=examples, limits=limits, folders=folders)
        demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
        launched = demo.launch(
            server_name=host,
            server_port=port,
            show_error=True,
            share=False,
            quiet=not block,
            prevent_thread_lock=True,
            max_file_size=limits.max_upload_bytes,
            state_session_capacity=limits.sessions,
        )
    except BaseException:
        folders.close()
        raise
    url = launched[1] if isinstance(launched, tuple) else f"http://{host}:{port}/"
    server = DemoServer(blocks=demo, url=url, folders=folders, limits=limits)
    if block:
        try:
            demo.block_thread()  # returns on Ctrl-C, having closed the server
        finally:
            server.close()
    return server
