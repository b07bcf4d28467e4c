"""Loading a network's weights into the target dtype and device without a second copy.

``from_pretrained(..., dtype=torch.bfloat16)`` on a float32 safetensors checkpoint (how SD 1.4,
BLIP and CLIP are published) maps the whole file, reads every page of it and converts it: while
a model loads, the process holds the float32 file's pages *and* the converted weights, so its
peak is three times the bfloat16 model (5.5 GB for the SD 1.4 UNet alone, whose weights are
1.7 GB in bfloat16). Here the library loads the checkpoint in the dtype it is stored in, which
it maps without reading (no copy: the weights are views of the file), and :func:`cast_in_place`
then converts one tensor at a time, handing each converted tensor's file pages back to the
operating system at once. The peak is the converted weights plus one tensor; the values are the
library's own conversion (``Tensor.to``), bit for bit (tests/test_weights.py), and the modules
transformers keeps in float32 stay float32 by the same rule.

The page release is Linux-only (``madvise`` on the file mapping, never on other memory); elsewhere
the conversion is the same and the pages go when the file is unmapped after loading.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import re
import sys
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, TypeVar

import torch

from freesegdiff.errors import ModelUnavailableError
from freesegdiff.infra.hub import LoadOptions, load_pretrained

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT")

_MADV_DONTNEED = 4
# The dtype a checkpoint variant is stored in (Hub convention: "fp16" files hold float16).
VARIANT_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin")


def stored_dtype(variant: str | None) -> torch.dtype:
    """The dtype the weight files of ``variant`` hold: float16 for ``"fp16"``, else float32."""
    return VARIANT_DTYPES.get(variant or "", torch.float32)


def load_model(
    loader: Callable[..., ModelT],
    name: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    dtype_keyword: str = "dtype",
    what: str,
    flag: str,
    load: LoadOptions | None = None,
    **kwargs: Any,
) -> ModelT:
    """A model from ``loader`` (a ``from_pretrained``), its weights in ``dtype`` on ``device``.

    The checkpoint is loaded in the dtype its files hold (:func:`stored_dtype` of
    ``load.variant``; mapped, not read), then cast tensor by tensor (:func:`cast_in_place`).
    A model without files of ``load.variant`` (the Hub's CLIP and BLIP have no fp16 files) is
    loaded from its default files.

    Args:
        dtype_keyword: the loader's name for its dtype argument (diffusers: ``torch_dtype``,
            transformers 5: ``dtype``).
        what, flag, load, kwargs: as :func:`freesegdiff.infra.hub.load_pretrained`.
    """
    load = load or LoadOptions()
    options = dict(kwargs)
    options[dtype_keyword] = stored_dtype(None)
    model = None
    if load.variant is not None:
        try:
            model = load_pretrained(
                loader,
                name,
                what=what,
                flag=flag,
                load=load,
                **{**options, "variant": load.variant, dtype_keyword: stored_dtype(load.variant)},
            )
        except ModelUnavailableError:  # no files of that variant (CLIP, BLIP): the full ones
            logger.info(
                "%s %s has no %s weight files; loading its default files", what, name, load.variant
            )
    if model is None:
        model = load_pretrained(loader, name, what=what, flag=flag, load=load, **options)
    module: Any = model
    cast_in_place(module, dtype, torch.device(device), float32_modules(module, dtype))
    return model


def float32_modules(model: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Names of the modules and parameters kept in float32 when ``model`` runs in ``dtype``.

    transformers' rule: ``_keep_in_fp32_modules`` in float16 only, ``_keep_in_fp32_modules_strict``
    in float16 and bfloat16 (e.g. BLIP-2's Q-Former and query tokens in float16).
    """
    kept: list[str] = []
    if dtype == torch.float16:
        kept += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        kept += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(dict.fromkeys(kept))


def _is_kept(name: str, kept: Iterable[str]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(key)}(\.|$)", name) for key in kept)


def cast_in_place(
    model: torch.nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    keep_float32: Iterable[str] = (),
) -> torch.nn.Module:
    """Convert ``model``'s floating-point parameters and buffers to ``dtype`` on ``device``, one
    tensor at a time, releasing each one's checkpoint pages once it is converted.

    Tied tensors stay tied; parameters named by ``keep_float32`` (module or parameter names, as
    :func:`float32_modules` gives them) become float32; integer buffers only move. A tensor
    already in its dtype and on ``device`` is kept as it is (a float32 model stays a view of its
    file). Returns ``model``, without gradients.
    """
    kept = tuple(keep_float32)
    mappings = checkpoint_mappings()
    done: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                if id(tensor) in done:
                    table[name] = done[id(tensor)]
                    continue
                full = f"{module_name}.{name}" if module_name else name
                target = torch.float32 if _is_kept(full, kept) else dtype
                new_dtype = target if tensor.is_floating_point() else tensor.dtype
                if tensor.dtype == new_dtype and tensor.device == device:
                    done[id(tensor)] = tensor
                    continue
                with torch.no_grad():
                    value = tensor.detach().to(device=device, dtype=new_dtype, copy=True)
                replacement: torch.Tensor = (
                    torch.nn.Parameter(value, requires_grad=False)
                    if isinstance(tensor, torch.nn.Parameter)
                    else value
                )
                table[name] = replacement
                done[id(tensor)] = replacement
                if tensor.device.type == "cpu":
                    release_pages(tensor, mappings)
    _record_dtype(model, dtype)
    return model.requires_grad_(False)


def _record_dtype(model: Any, dtype: torch.dtype) -> None:
    """Write ``dtype`` into a transformers model's config, as loading in it would have."""
    config = getattr(model, "config", None)
    if config is not None and not isinstance(config, dict) and hasattr(config, "dtype"):
        with contextlib.suppress(AttributeError, TypeError):
            config.dtype = dtype


# ------------------------------------------------------------------------------ pages
@cache
def _madvise() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "madvise", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` of this process's mappings of checkpoint files
    (``*.safetensors``, ``*.bin``), from ``/proc/self/maps``; empty off Linux."""
    ranges: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as handle:
            for line in handle:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().endswith(_CHECKPOINT_SUFFIXES):
                    start, end = (int(value, 16) for value in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def release_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> bool:
    """Drop the resident pages of ``tensor``'s bytes from this process if they lie in a
    checkpoint file's mapping (``mappings``, :func:`checkpoint_mappings`). True if released.

    Only whole pages inside the tensor are dropped, and only inside a file mapping: the data stays
    in the file, and anything that reads those bytes later reads them from it again. Memory that
    is not a file mapping is never touched.
    """
    advise = _madvise()
    if advise is None or not mappings or tensor.numel() == 0 or not tensor.is_contiguous():
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not any(low <= first and last <= high for low, high in mappings):
        return False
    return bool(advise(first, last - first, _MADV_DONTNEED) == 0)
