"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth, CVPR 2020), batched over masks.

Each pixel's mask value is repeatedly replaced by an affinity-weighted average of its neighbours
at several dilations of a 3x3 window (the centre excluded). The affinity of pixel i to neighbour
j is a softmax over all neighbours of ``-|I_i - I_j| / (0.1 * std_i)``, averaged over the colour
channels, where ``std_i`` is the standard deviation of the colours in i's window (all
dilations, centre included): neighbours that look like the pixel carry its label, neighbours
across an edge do not. This follows the authors' ``PAMR`` module (``LocalAffinityAbs``,
``LocalStDev``, replicate padding, the same constants).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["pamr", "pamr_affinities"]

PAMR_CHUNK = 8  # masks propagated together

# The eight neighbours of a 3x3 window, in units of the dilation.
_NEIGHBOURS: tuple[tuple[int, int], ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)


def _validate_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    values = tuple(int(d) for d in dilations)
    if not values or any(d < 1 for d in values):
        raise ValueError(f"PAMR dilations must be positive integers, got {tuple(dilations)}")
    return values


def pamr_affinities(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Neighbour weights of every pixel.

    Args:
        image: (C, H, W) float image (any scale: the affinities are normalised by the local
            standard deviation).
        dilations: dilations of the 3x3 window; the neighbours are the 8 off-centre pixels at
            each.

    Returns:
        (8 * len(dilations), H, W) float32, non-negative, summing to 1 over the first axis;
        neighbour ``8 * k + n`` is ``_NEIGHBOURS[n]`` scaled by ``dilations[k]``.
    """
    dilations = _validate_dilations(dilations)
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    image = image.to(torch.float32)
    neighbours = list(_neighbours(image, dilations))  # K views, no copies
    # Spread of each window (all dilations, centres included), unbiased as the reference.
    samples = len(neighbours) + len(dilations)
    mean = (sum(neighbours, torch.zeros_like(image)) + len(dilations) * image) / samples
    squares = len(dilations) * (image - mean) ** 2
    for neighbour in neighbours:
        squares += (neighbour - mean) ** 2
    scale = 1.0 / (1e-8 + 0.1 * torch.sqrt(squares / (samples - 1)))  # (C, H, W)
    # (K, H, W): colour channels averaged, then a softmax over the neighbours
    logits = torch.stack([-((image - n).abs() * scale).mean(dim=0) for n in neighbours])
    return torch.softmax(logits, dim=0)


def _neighbours(values: torch.Tensor, dilations: Sequence[int]) -> Iterator[torch.Tensor]:
    """The 8 neighbours at each dilation of every pixel of ``values`` (..., H, W), edges
    replicated: yields len(dilations) * 8 tensors shaped like ``values``."""
    height, width = values.shape[-2:]
    flat = values.reshape(-1, 1, height, width)
    for dilation in dilations:
        padded = F.pad(flat, [dilation] * 4, mode="replicate").view(
            *values.shape[:-2], height + 2 * dilation, width + 2 * dilation
        )
        for dy, dx in _NEIGHBOURS:
            top, left = dilation + dy * dilation, dilation + dx * dilation
            yield padded[..., top : top + height, left : left + width]


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> torch.Tensor:
    """Propagate soft masks along the image's local affinities.

    Args:
        image: (C, H, W) float image, on the device to compute on.
        masks: (N, H, W) float mask probabilities (binary masks as 0. / 1.), same device.
        iterations: propagation steps.
        dilations: dilations of the 3x3 neighbourhood.

    Returns:
        (N, H, W) float32 refined probabilities; threshold at 0.5 for binary masks.
    """
    if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(
            f"masks must be (N, H, W) with (H, W) = {tuple(image.shape[1:])}, "
            f"got shape {tuple(masks.shape)}"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    dilations = _validate_dilations(dilations)
    affinities = pamr_affinities(image, dilations)  # (K, H, W)
    masks = masks.to(torch.float32)
    if masks.shape[0] == 0:
        return masks.clone()
    # A few masks at a time, every iteration, so that the masks being propagated stay in the
    # CPU's cache (9x faster for 56 masks of 375 x 500; the masks are independent)
    refined_chunks = []
    for start in range(0, masks.shape[0], PAMR_CHUNK):
        chunk = masks[start : start + PAMR_CHUNK]
        for _ in range(iterations):
            refined = torch.zeros_like(chunk)
            for weight, neighbour in zip(affinities, _neighbours(chunk, dilations), strict=True):
                refined.addcmul_(weight, neighbour)
            chunk = refined
        refined_chunks.append(chunk)
    return torch.cat(refined_chunks)
