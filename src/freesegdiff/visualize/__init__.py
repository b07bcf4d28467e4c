"""Pictures of results: label colours, the overlay, the explain figure and the HTML index page.

``colors`` and ``overlay`` need only Pillow; ``explain`` needs matplotlib (imported when used).
"""

from freesegdiff.visualize.colors import color_for, palette_for
from freesegdiff.visualize.overlay import render_overlay

__all__ = ["color_for", "palette_for", "render_overlay"]
