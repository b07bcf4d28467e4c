"""Steps 10-11: naming each class-agnostic mask with a label text.

``masked_crops.py``: CLIP scores the image blacked out outside each mask against the label
texts, and the released assignment rule gives each label to one cluster (the method). A namer
is a class built from the CLIP scorer and the tie rule, ``(classifier, ties)``, and called on a
batch's images, cluster maps and vocabularies; it is one file plus one entry in :data:`NAMERS`.
"""

from __future__ import annotations

from freesegdiff.stages.registry import Registry

__all__ = ["NAMER", "NAMERS"]

NAMERS = Registry("the namer", {"masked-crops": "freesegdiff.stages.naming.masked_crops:MaskNamer"})
# The namer the pipeline builds: the method's. (No setting chooses another yet: the next one,
# a dense CLIP namer, comes with its own settings section.)
NAMER = "masked-crops"
