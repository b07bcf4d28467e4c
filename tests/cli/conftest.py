"""The command-line tests share their tiny pipelines: one per settings and tuning, built once.

A command builds its pipeline through :meth:`FreeSegDiff.from_config`; here that returns the
pipeline already built for the same settings and runtime options (tiny models only), so about
forty in-process runs build a handful of pipelines. Sharing is what a Ray actor or the demo does
with one pipeline over many images: every image draws from its own generators, so its outputs
do not depend on what the pipeline did before (the golden and fresh-process tests check a newly
built pipeline gives the same bytes).
"""

from __future__ import annotations

from typing import Any

import pytest

_BUILT: dict[Any, Any] = {}


def _tiny(config: Any) -> bool:
    models = config.models
    names = [models.diffusion, models.clip, models.captioner, models.backbone]
    return all(name is None or name.startswith("tiny:") for name in names)


@pytest.fixture(autouse=True)
def shared_tiny_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    from freesegdiff.pipeline import FreeSegDiff

    build = FreeSegDiff.from_config.__func__  # type: ignore[attr-defined]

    def from_config(cls: Any, config: Any, *, runtime: Any = None, source: Any = None) -> Any:
        if source is not None or not _tiny(config):
            return build(cls, config, runtime=runtime, source=source)
        key = (config, runtime)
        if key not in _BUILT:
            pipe = build(cls, config, runtime=runtime)
            # an open-vocabulary run frees the text encoder; a shared pipeline keeps it for
            # the closed-vocabulary runs after it
            pipe.release_text_encoder = lambda: None
            _BUILT[key] = pipe
        return _BUILT[key]

    monkeypatch.setattr(FreeSegDiff, "from_config", classmethod(from_config))
