"""Pictures of results: label colours, the overlay, the explain figure and the HTML index page.

``colors``, ``overlay``, ``cluster_map`` and ``index_page`` need only Pillow; ``explain`` needs
matplotlib, the ``[viz]`` extra (imported when a figure is drawn).
"""

from freesegdiff.io.visualize.colors import color_for, palette_for
from freesegdiff.io.visualize.overlay import render_overlay

__all__ = ["color_for", "palette_for", "render_overlay"]
