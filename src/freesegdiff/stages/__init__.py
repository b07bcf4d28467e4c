"""The method's stages, one module or package per step of docs/method.md.

==========================  =============================================================
step                        owner
==========================  =============================================================
1 caption                   ``captioner.py``
2 entities                  ``entities.py``
9 label texts, candidates   ``vocabulary.py``
3-7 features                ``features/`` (``diffusion.py``, ``attention_maps.py``,
                            ``vit.py``)
8 class-agnostic masks      ``clustering/``
10-11 naming the masks      ``naming/``
12 refinement               ``refine/`` (``crf.py``, ``densecrf_reference.py``, ``pamr.py``)
13-14 composition           ``compose.py``
==========================  =============================================================

A stage imports only the machinery (:mod:`freesegdiff.infra`), the settings
(:mod:`freesegdiff.config`), the results and the errors, and other stages
(tests/test_imports.py checks it). :mod:`freesegdiff.pipeline` wires them.
"""
