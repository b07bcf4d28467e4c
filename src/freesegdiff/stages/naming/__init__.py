"""Steps 10-11: naming each mask (``masked_crops.py``: CLIP on the image blacked out outside
the mask, as released)."""
