"""Images in, files out: reading images (``images.py``), the files of a run (``outputs.py``),
formats other tools read (``export.py``), the pictures (``visualize/``), atomic writes
(``atomic.py``) and file names of any bytes (``filenames.py``).

io imports only the settings, results, errors and the machinery, never a stage or an
application (tests/test_imports.py checks it).
"""
