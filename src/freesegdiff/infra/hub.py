"""Finding model weights: Hub ids, local folders, and the built-in ``tiny:`` models.

Every model is loaded with its library's own ``from_pretrained`` so the Hugging Face cache,
``HF_HUB_OFFLINE`` and ``HF_HOME`` behave as users expect. When weights cannot be had, the error
says which model was missing and the three ways out (download, local folder, ``--preset tiny``).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from freesegdiff.errors import ModelUnavailableError

T = TypeVar("T")

TINY_PREFIX = "tiny:"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class LoadOptions:
    """How every model of a pipeline is fetched: one object, passed to every loader."""

    offline: bool = False  # never contact the Hub (HF_HUB_OFFLINE=1 does the same)
    revision: str | None = None  # Hub revision (ignored for local folders)
    cache_dir: str | None = None  # HF cache folder; None: the HF default
    variant: str | None = None  # weight files of this variant ("fp16": *.fp16.safetensors)

    @classmethod
    def of(cls, models: Any) -> LoadOptions:
        """The options of a :class:`~freesegdiff.config.ModelConfig`."""
        return cls(
            offline=models.offline,
            revision=models.revision,
            cache_dir=models.cache_dir,
            variant=models.variant,
        )


def hub_offline(requested: bool = False) -> bool:
    """Whether the Hub must not be contacted: asked for, or ``HF_HUB_OFFLINE`` is set."""
    return requested or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub (``HF_ENDPOINT``) opens within ``timeout`` seconds.

    Checked once per process, so that a machine without network fails in seconds with our
    message instead of after the HTTP client's retries (about half a minute per file).
    """
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)  # name resolution has no timeout of its own
    return bool(outcome and outcome[0])


def resolve_source(name: str) -> str:
    """Map a model name to what ``from_pretrained`` takes.

    ``tiny:<kind>`` names are built on first use into the freesegdiff cache and returned as a
    local folder; an existing folder is returned as an absolute path; anything else is a Hub id.
    """
    if name.startswith(TINY_PREFIX):
        from freesegdiff.infra.tiny import tiny_model_path

        return str(tiny_model_path(name[len(TINY_PREFIX) :]))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelUnavailableError(
            f"model folder {name!r} does not exist. Pass an existing local folder in the Hub's "
            "layout, or a Hub id such as 'openai/clip-vit-base-patch32'."
        )
    return name


def unavailable_message(what: str, name: str, flag: str, cause: BaseException) -> str:
    """The message for weights of ``what`` (e.g. 'Stable Diffusion') that could not be loaded."""
    offline = hub_offline()
    reason = (
        "the Hub is switched off (HF_HUB_OFFLINE=1 or --offline) and it is not in the local cache"
        if offline
        else "it is not in the local cache and the Hub could not be reached"
    )
    return (
        f"could not load the {what} model {name!r}: {reason} ({type(cause).__name__}: "
        f"{str(cause).splitlines()[0] if str(cause) else 'no detail'}).\n"
        f"  - download it where the Hub is reachable: `hf download {name}` "
        "(it lands in the HF cache, which HF_HOME moves), then run again;\n"
        f"  - or point {flag} at a local folder in the Hub's layout;\n"
        "  - or try the pipeline with `--preset tiny` (random tiny models, no download)."
    )


def load_pretrained(
    loader: Callable[..., T],
    name: str,
    *,
    what: str,
    flag: str,
    load: LoadOptions | None = None,
    **kwargs: Any,
) -> T:
    """Call ``loader(source, **kwargs)`` (a ``from_pretrained``) with the offline and cache
    settings of ``load`` (None: the defaults).

    Args:
        what, flag: the model's name for people ("CLIP") and the option that points at it
            (``--clip-model``), for the error message.

    Raises :class:`ModelUnavailableError` with a how-to-fix message when the weights are missing.
    """
    load = load or LoadOptions()
    source = resolve_source(name)
    local = Path(source).is_dir()
    options: dict[str, Any] = dict(kwargs)
    if not local:
        if hub_offline(load.offline) or not hub_reachable():
            options["local_files_only"] = True  # the HF cache alone
        if load.revision is not None:
            options["revision"] = load.revision
        if load.cache_dir is not None:
            options["cache_dir"] = load.cache_dir
    try:
        return loader(source, **options)
    except (OSError, ValueError) as error:
        if isinstance(error, ModelUnavailableError):
            raise
        text = str(error)
        missing = not local or "does not appear to have" in text or "no file named" in text
        if not missing:
            raise
        raise ModelUnavailableError(unavailable_message(what, name, flag, error)) from error


# (what, setting, option, the file a model's folder or Hub repository always holds)
MODEL_ROLES: tuple[tuple[str, str, str, str], ...] = (
    ("Stable Diffusion", "diffusion", "--diffusion-model", "model_index.json"),
    ("CLIP", "clip", "--clip-model", "config.json"),
    ("captioner", "captioner", "--captioner-model", "config.json"),
    ("feature backbone", "backbone", "--backbone-model", "config.json"),
)


def missing_models(models: Any, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """The models of a :class:`~freesegdiff.config.ModelConfig` that cannot be loaded, found
    without loading any: ``(what, name, option, reason)`` each.

    A ``tiny:`` name is always available; a folder must exist and hold its layout's index file
    (``model_index.json`` for diffusers, ``config.json`` for transformers); a Hub id counts as
    missing only when the Hub is not to be used (offline, or unreachable) and the HF cache lacks
    it. A reachable Hub is not asked here: loading downloads what is missing. ``skip``: the
    settings (``"diffusion"``, ...) of models that will not be loaded.
    """
    load = LoadOptions.of(models)
    found: list[tuple[str, str, str, str]] = []
    for what, setting, flag, marker in MODEL_ROLES:
        if setting in skip:  # a model the settings never load
            continue
        name = getattr(models, setting, None)
        if not name or name.startswith(TINY_PREFIX):
            continue
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / marker).is_file():
                found.append((what, name, flag, f"the folder has no {marker}"))
            continue
        try:
            resolve_source(name)
        except ModelUnavailableError:
            found.append((what, name, flag, "the folder does not exist"))
            continue
        if not (hub_offline(load.offline) or not hub_reachable()):
            continue
        if not _in_cache(name, marker, load):
            where = "switched off" if hub_offline(load.offline) else "not reachable"
            found.append((what, name, flag, f"not in the HF cache and the Hub is {where}"))
    return found


def _in_cache(name: str, marker: str, load: LoadOptions) -> bool:
    """Whether the HF cache holds ``marker`` of the Hub repository ``name``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(
            name, marker, cache_dir=load.cache_dir, revision=load.revision
        )
    except ValueError:  # not a valid repository id: loading will say so
        return True
    return isinstance(cached, str)


def check_models_available(models: Any, skip: tuple[str, ...] = ()) -> None:
    """Raise one :class:`ModelUnavailableError` naming every model that cannot be loaded
    (:func:`missing_models`; ``skip``: settings of models not to be loaded), with the ways out,
    before any model loads."""
    found = missing_models(models, skip)
    if not found:
        return
    lines = [f"  - the {what} model {name!r} ({flag}): {why}" for what, name, flag, why in found]
    downloads = " && ".join(f"hf download {name}" for _, name, _, why in found if "HF cache" in why)
    raise ModelUnavailableError(
        f"{len(found)} model{'s' if len(found) > 1 else ''} cannot be loaded:\n"
        + "\n".join(lines)
        + "\nWays out:"
        + (
            f"\n  - download where the Hub is reachable: `{downloads}` (into the HF cache, "
            "which HF_HOME moves), then run again;"
            if downloads
            else ""
        )
        + "\n  - or point the options above at local folders in the Hub's layouts;"
        + "\n  - or try the pipeline with `--preset tiny` (random tiny models, no download)."
    )
