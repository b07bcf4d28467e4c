"""The web demo (``freesegdiff demo``): a Gradio app around a loaded pipeline.

Gradio is an optional dependency, the ``[demo]`` extra (``pip install "freesegdiff[demo]"``),
imported by :func:`build_demo` only.
"""

from freesegdiff.demo.app import DemoOutput, build_demo, bundled_examples, run_segmentation

__all__ = ["DemoOutput", "build_demo", "bundled_examples", "run_segmentation"]
