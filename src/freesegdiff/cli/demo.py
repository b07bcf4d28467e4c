"""``freesegdiff demo``: serve the Gradio web demo on this machine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freesegdiff.cli import common
from freesegdiff.cli.common import add_pipeline_arguments, config_from_args
from freesegdiff.errors import ConfigError
from freesegdiff.infra.extras import MissingExtraError

if TYPE_CHECKING:
    from freesegdiff.config import PipelineConfig
    from freesegdiff.demo.limits import DemoLimits

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 25.0
DEFAULT_QUEUE_SIZE = 8
DEFAULT_CACHE_MINUTES = 15.0
DEFAULT_DEMO_MAX_PIXELS = 40_000_000  # unless --max-pixels says otherwise


class MissingDemoExtraError(MissingExtraError, ConfigError):
    """An extra the demo needs is not installed: a set-up error, reported before any model
    loads (a :class:`ConfigError`, so the command exits with 2)."""

    def __init__(self, missing: MissingExtraError) -> None:
        ConfigError.__init__(self, str(missing))
        self.feature = missing.feature
        self.extra = missing.extra


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` (options: the pipeline's, plus --host, --port, --examples)."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a web demo (Gradio): upload a photo, press Segment",
        description=(
            "Serve a Gradio web app: upload or pick a photo, optionally type class names, press "
            "Segment; see the labelled segments, caption, entities, cluster map and timings, and "
            "download the PNG and JSON. Needs gradio, the [demo] extra "
            '(pip install "freesegdiff[demo]"). '
            "--preset tiny runs offline with tiny random models (meaningless labels). "
            "Limits: uploads up to --max-upload-mb (25), photos up to --max-pixels (here 40 "
            "Mpx unless given; never above the pipeline's limits.max_pixels), refused from the "
            "header before decoding; one request on the models at a time and --queue-size (8) "
            "waiting, more are told the app is busy; only the last 8 requests' files are kept, "
            "and Gradio's cache drops files older than --cache-minutes (15). "
            "A missing extra or a port in use is reported before any model loads (exit 2)."
        ),
    )
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (7860)")
    parser.add_argument(
        "--examples",
        nargs="*",
        metavar="IMAGE",
        help="example photos to offer (default: the bundled ones)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        metavar="MB",
        help="largest photo file accepted, in MB of 2^20 bytes (25)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        metavar="N",
        help="requests that may wait while one runs; more are told the app is busy (8)",
    )
    parser.add_argument(
        "--cache-minutes",
        type=float,
        default=DEFAULT_CACHE_MINUTES,
        metavar="MIN",
        help="Gradio's cached uploads, images and downloads are deleted after this long (15)",
    )
    parser.set_defaults(run=run)
    return parser


def demo_limits(args: argparse.Namespace, config: PipelineConfig) -> DemoLimits:
    """The :class:`~freesegdiff.demo.limits.DemoLimits` the options describe.

    The pixel limit is ``--max-pixels`` when given, else the smaller of 40 Mpx and the
    pipeline's ``limits.max_pixels``; ``limits.oversize`` says whether larger photos are
    refused or downscaled.

    Raises:
        ConfigError: a limit is not positive.
    """
    from freesegdiff.demo.limits import DemoLimits

    pipeline_limit = config.limits.max_pixels
    if getattr(args, "max_pixels", None) is not None:
        max_pixels = pipeline_limit
    elif pipeline_limit is None:
        max_pixels = DEFAULT_DEMO_MAX_PIXELS
    else:
        max_pixels = min(DEFAULT_DEMO_MAX_PIXELS, pipeline_limit)
    if not args.max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if not args.cache_minutes > 0:
        raise ConfigError(f"--cache-minutes must be positive, got {args.cache_minutes}")
    return DemoLimits(
        max_upload_bytes=max(1, round(args.max_upload_mb * 1024 * 1024)),
        max_pixels=max_pixels,
        oversize=config.limits.oversize,
        queue_size=args.queue_size,
        cache_check_seconds=max(1, min(60, round(args.cache_minutes * 60 / 4))),
        cache_age_seconds=max(1, round(args.cache_minutes * 60)),
    )


def run(args: argparse.Namespace) -> int:
    """Check the set-up, load the pipeline and serve the app until interrupted; returns 0.

    Raises:
        ConfigError: before any model loads: gradio (or an extra the settings need) is
            missing (:class:`MissingDemoExtraError`), the port is in use, a limit or an
            example photo is wrong.
    """
    from freesegdiff.demo import app, server
    from freesegdiff.infra.extras import require_for_config

    # Everything that can be wrong with the set-up is said before the models load.
    try:
        app.import_gradio()
        config = config_from_args(args)
        require_for_config(config)
    except MissingExtraError as error:
        raise MissingDemoExtraError(error) from error
    limits = demo_limits(args, config)
    for example in args.examples or ():
        if not Path(example).is_file():
            raise ConfigError(f"example photo {example!r} does not exist: fix --examples")
    server.ensure_port_free(args.host, args.port)
    # Untuned: the tuning is process-wide (the allocator's thresholds, CRF worker processes) and
    # made for batch commands; a server shares its process with Gradio's threads for hours.
    pipe = common.pipeline_from_args(args)
    logger.info("serving the demo on http://%s:%d", args.host, args.port)
    server.serve_demo(
        pipe, host=args.host, port=args.port, examples=args.examples, limits=limits, block=True
    )
    return 0
