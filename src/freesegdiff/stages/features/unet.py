"""The UNet as the diffusion features read it: its layers by name and size, and freeing what a
feature pass never runs (docs/method.md, step 7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from freesegdiff.config import FEATURE_KINDS, UNET_LAYER
from freesegdiff.errors import ConfigError

QUERY_SUFFIX = "transformer_blocks.0.attn2.to_q"
# features.kind -> the UNet layers it reads ("attentions" or "resnets")
KINDS = FEATURE_KINDS


class StopForward(Exception):
    """Raised by the last hook to end the UNet pass early."""


@dataclass(frozen=True)
class UNetLayer:
    """One UNet layer the features read (a cross-attention layer or a resnet block)."""

    name: str  # e.g. "up_blocks.1.attentions.0" or "up_blocks.1.resnets.2"
    order: int  # position in the UNet's execution order
    downsample: int  # feature map side = latent side / downsample
    channels: int  # width of what is taken there (see list_unet_layers)


def list_unet_layers(unet: torch.nn.Module, kind: str = "queries") -> list[UNetLayer]:
    """The layers of a diffusers ``UNet2DConditionModel`` that ``features.kind`` ``kind`` reads,
    in execution order: the cross-attention layers (``channels``: the query width; for
    ``"hidden"`` the width of the attention's input) or, for ``"resnet"``, the resnet blocks of
    every down, mid and up block (``channels``: their output channels)."""
    config: Any = unet.config
    levels = len(config.block_out_channels)
    family = KINDS.get(kind, "attentions")
    found = []
    for name, module in unet.named_modules():
        match = UNET_LAYER.match(name)
        if match is None or match.group(4) != family:
            continue
        down, up, index = match.group(2), match.group(3), int(match.group(5))
        if down is not None:
            section, block, downsample = 0, int(down), 2 ** int(down)
        elif up is not None:
            section, block, downsample = 2, int(up), 2 ** (levels - 1 - int(up))
        else:
            section, block, downsample = 1, 0, 2 ** (levels - 1)
        # a block runs resnets.i, then attentions.i (the mid block: resnets.0, attentions.0,
        # resnets.1)
        order = section * 10_000 + block * 100 + 2 * index + (family == "attentions")
        if family == "resnets":
            channels = int(module.out_channels)
        else:
            query = module.get_submodule(QUERY_SUFFIX)
            channels = int(query.in_features if kind == "hidden" else query.out_features)
        found.append(UNetLayer(name, order, downsample, channels))
    found.sort(key=lambda layer: layer.order)
    return found


def list_attention_layers(unet: torch.nn.Module) -> list[UNetLayer]:
    """Every cross-attention layer of a diffusers ``UNet2DConditionModel``, in execution
    order."""
    return list_unet_layers(unet, "queries")


def select_layers(
    unet: torch.nn.Module,
    layers: Sequence[str] = (),
    resolutions: Sequence[int] | None = None,
    image_size: int = 512,
    vae_scale: int = 8,
    kind: str = "queries",
) -> list[UNetLayer]:
    """The layers to hook, by name or by feature-map side at ``image_size`` input: attention
    layers, or resnet blocks when ``kind`` is ``"resnet"``.

    Raises :class:`ConfigError` naming the unknown layers or the sizes no layer has.
    """
    available = list_unet_layers(unet, kind)
    what = "resnet blocks" if KINDS.get(kind) == "resnets" else "attention layers"
    if resolutions:
        latent = image_size // vae_scale
        chosen = [layer for layer in available if latent // layer.downsample in set(resolutions)]
        if not chosen:
            sides = sorted({latent // layer.downsample for layer in available})
            raise ConfigError(
                f"no {what[:-1]} has a {list(resolutions)} feature map at image_size "
                f"{image_size}; this UNet's sizes are {sides}"
            )
        return chosen
    by_name = {layer.name: layer for layer in available}
    unknown = [name for name in layers if name not in by_name]
    if unknown or not layers:
        hint = (
            " (features.kind 'resnet' reads resnet blocks: name them in features.layers or "
            "choose them by size with features.resolutions)"
            if what == "resnet blocks"
            else ""
        )
        raise ConfigError(
            f"unknown {what} {unknown or '(none given)'}{hint}; this UNet has: "
            + ", ".join(by_name)
        )
    return sorted((by_name[name] for name in dict.fromkeys(layers)), key=lambda x: x.order)


def refuse_call(module: torch.nn.Module, *_: Any) -> None:
    raise RuntimeError(
        f"{type(module).__name__} was freed by DiffusionFeatures.release_unused() because the "
        "features never run it"
    )


def release_modules(model: torch.nn.Module, entered: set[str]) -> list[str]:
    """Move every module of ``model`` whose subtree was never entered to ``meta``.

    Returns the names of the outermost freed modules. Each freed module (and every module below
    it) raises if called, so a wrong trace fails loudly instead of computing with empty weights.
    """
    names = [name for name, _ in model.named_modules()]
    live = {""}
    for name in entered:
        parts = name.split(".") if name else []
        live.update(".".join(parts[:end]) for end in range(len(parts) + 1))
    freed: list[str] = []
    for name in names:
        if name in live or any(name.startswith(done + ".") for done in freed):
            continue
        module = model.get_submodule(name)
        if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
            continue  # nothing to free (a weightless module, e.g. an activation)
        module.to("meta")
        for inner in module.modules():
            inner.register_forward_pre_hook(refuse_call)
        freed.append(name)
    return freed
