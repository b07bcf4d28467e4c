"""The web demo (``freesegdiff demo``): a Gradio app around a loaded pipeline.

Gradio is an optional dependency, the ``[demo]`` extra (``pip install "freesegdiff[demo]"``),
imported by :func:`build_demo` only; :func:`serve_demo` serves it with the limits of
:class:`DemoLimits` (upload size, pixels, queue, kept files and sessions).

``app.py``: the page and one request (:func:`run_segmentation`); ``limits.py``: what a server
accepts and reading a photo within it; ``server.py``: serving, request folders, the port.
"""

from freesegdiff.demo.app import DemoOutput, build_demo, bundled_examples, run_segmentation
from freesegdiff.demo.limits import DemoLimits
from freesegdiff.demo.server import DemoServer, RequestFolders, serve_demo

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
