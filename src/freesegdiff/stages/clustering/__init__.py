"""Step 8: class-agnostic masks, one cluster map per image (``kmeans.py``)."""
