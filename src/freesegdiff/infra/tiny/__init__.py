"""Tiny random models in the real layouts, built on first use (the ``tiny:`` model names).

They load through exactly the code path of real weights. Their outputs are meaningless: they
exist for smoke runs, tests and the ``tiny`` preset, offline and in seconds.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from freesegdiff.errors import ModelUnavailableError

# Bump when a builder changes, so stale caches are rebuilt.
TINY_VERSION = 2


# tiny model name -> (module, builder function); imported only when that model is built.
_BUILDERS = {
    "stable-diffusion": ("freesegdiff.infra.tiny.diffusion", "build_stable_diffusion"),
    "clip": ("freesegdiff.infra.tiny.clip", "build_clip"),
    "blip": ("freesegdiff.infra.tiny.captioner", "build_blip"),
    "blip2": ("freesegdiff.infra.tiny.captioner", "build_blip2"),
}
TINY_MODELS = tuple(_BUILDERS)


def tiny_cache_root() -> Path:
    """Where tiny models are kept: ``$FREESEGDIFF_CACHE`` or ``~/.cache/freesegdiff``."""
    root = os.environ.get("FREESEGDIFF_CACHE") or Path.home() / ".cache" / "freesegdiff"
    return Path(root) / "tiny"


def build_tiny_model(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny model ``kind`` (one of :data:`TINY_MODELS`) into ``folder``; return it."""
    if kind not in _BUILDERS:
        known = ", ".join("tiny:" + name for name in _BUILDERS)
        raise ModelUnavailableError(f"unknown tiny model 'tiny:{kind}'; known: {known}")
    module, function = _BUILDERS[kind]
    builder: Callable[[Path, int], None] = getattr(importlib.import_module(module), function)
    folder = Path(folder)
    builder(folder, seed)
    return folder


def tiny_model_path(kind: str) -> Path:
    """The folder of tiny model ``kind``, built (atomically) the first time it is asked for."""
    target = tiny_cache_root() / f"{kind}-v{TINY_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    try:
        build_tiny_model(kind, staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is as good
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
