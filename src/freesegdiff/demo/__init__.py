"""The web demo (``freesegdiff demo``): a Gradio app around a loaded pipeline.

Gradio is an optional dependency, the ``[demo]`` extra (``pip install "freesegdiff[demo]"``),
imported by :func:`build_demo` only; :func:`serve_demo` serves it with the limits of
:class:`DemoLimits` (upload size, pixels, queue, kept files and sessions).
"""

from freesegdiff.demo.app import (
    DemoLimits,
    DemoOutput,
    DemoServer,
    RequestFolders,
    build_demo,
    bundled_examples,
    run_segmentation,
    serve_demo,
)

__all__ = [
    "DemoLimits",
    "DemoOutput",
    "DemoServer",
    "RequestFolders",
    "build_demo",
    "bundled_examples",
    "run_segmentation",
    "serve_demo",
]
