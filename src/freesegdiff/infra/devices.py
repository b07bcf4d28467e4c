"""Device and dtype choices, frozen models, and per-image random generators."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from freesegdiff.errors import ConfigError

M = TypeVar("M")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"`` into a usable device.

    ``"auto"`` picks CUDA when available, else the CPU. Raises :class:`ConfigError` when the
    asked-for device is not available on this machine.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise ConfigError(f"unknown device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} was asked for but this torch build or machine has no CUDA; "
            "use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but is not available; use --device cpu")
    return device


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    cpu = getattr(torch.backends, "cpu", None)
    capability = cpu.get_cpu_capability() if cpu is not None else ""
    if "AMX" in capability.upper():
        return True
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None) if mkldnn is not None else None
    try:
        return bool(check()) if callable(check) else False
    except RuntimeError:
        return False


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Turn a dtype name into a torch dtype; ``"auto"``: float16 on CUDA, bfloat16 on CPUs with
    native support, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bfloat16() else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose float32, bfloat16, float16 or auto")
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 is slow and inexact on the CPU; use bfloat16 or float32 there")
    return dtype


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``tensor`` on ``device``: on CUDA through pinned (page-locked) memory and a
    non-blocking copy, so the transfer runs as a DMA queued on the current stream instead of a
    staged, synchronous one; elsewhere a plain ``.to(device)``. Values are unchanged."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the host, for the CPU stages after a model group: from CUDA through a
    pinned (page-locked) buffer filled by a non-blocking copy on the current stream, which is
    then waited for (that stream only, not the whole device); a host tensor as it is. Values are
    unchanged."""
    if tensor.device.type == "cpu":
        return tensor
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def image_generators(seed: int | None, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image, each seeded with ``seed`` (None: a random seed per image).

    Giving every image its own stream makes the noise of an image independent of the batch it
    is in, so batched runs reproduce one-by-one runs.
    """
    generators = []
    for _ in range(count):
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        generators.append(generator)
    return generators


def randn_per_image(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise ``(len(generators), *shape)``, row i drawn from ``generators[i]``."""
    rows = [torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(dtype)


def frozen(module: M, device: str | torch.device, dtype: torch.dtype | None = None) -> M:
    """``module`` (a torch module) on ``device`` in ``dtype`` (cast only if needed), in eval
    mode and without gradients: how every network of the pipeline is held. Nothing is trained.
    """
    model: Any = module
    if dtype is not None and getattr(model, "dtype", dtype) != dtype:
        model = model.to(dtype=dtype)
    model = model.to(device=device).eval()
    model.requires_grad_(False)
    return model
