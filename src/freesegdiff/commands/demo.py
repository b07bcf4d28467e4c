"""``freesegdiff demo``: serve the Gradio web demo on this machine."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from freesegdiff.commands.common import (
    add_pipeline_arguments,
    config_from_args,
    pipeline_from_args,
)

logger = logging.getLogger(__name__)


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
            "--preset tiny runs offline with tiny random models (meaningless labels)."
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
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the pipeline, build the app and serve it until interrupted; returns 0."""
    from freesegdiff.demo import app
    from freesegdiff.extras import require_for_config

    # A missing extra is said before the models load, not after.
    app.import_gradio()
    require_for_config(config_from_args(args))
    pipe = pipeline_from_args(args)
    demo = app.build_demo(pipe, examples=args.examples)
    logger.info("serving the demo on http://%s:%d", args.host, args.port)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, show_error=True, share=False
    )
    return 0
