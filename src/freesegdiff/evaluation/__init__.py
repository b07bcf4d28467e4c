"""Benchmark evaluation: dataset readers, class names, metrics, grounding and the eval loop.

- ``datasets``: the validation splits in their on-disk layouts, as :class:`Sample` s.
- ``classnames``: the shipped class-name files (synonyms per class).
- ``metrics``: confusion matrices and the ``standard`` and ``paper`` protocols.
- ``grounding``: a pipeline result -> a map of the dataset's class ids.
- ``runner``: the loop with its prediction cache, ``results.json``, ``results.md`` and picture.
- ``synthetic``: tiny datasets in every layout, for tests and smoke runs.
"""
