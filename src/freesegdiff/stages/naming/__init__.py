"""Steps 10-11: naming each class-agnostic mask with a label text (``classify.namer``).

``masked_crops.py`` (``"masked-crops"``, the method): CLIP scores the image blacked out outside
each mask against the label texts, and the released assignment rule gives each label to one
cluster. ``dense.py`` (``"dense"``): per-pixel probabilities from CLIP's patch tokens through
NACLIP's last block name the clusters, or every pixel (``dense.regions = "pixels"``: no
clusters). A namer is a class with ``from_classifier(classifier, config)`` (the pipeline's CLIP
scorer and settings), a ``names_pixels`` flag (True: it needs no clusters) and a call on a
batch's images, cluster maps and vocabularies returning one ``Naming`` each; it is one file plus
one entry in :data:`NAMERS`.
"""

from __future__ import annotations

from freesegdiff.stages.registry import Registry

__all__ = ["NAMER", "NAMERS"]

NAMERS = Registry(
    "classify.namer",
    {
        "masked-crops": "freesegdiff.stages.naming.masked_crops:MaskNamer",
        "dense": "freesegdiff.stages.naming.dense:DenseNamer",
    },
)
# The method's namer (``classify.namer``'s default).
NAMER = "masked-crops"
