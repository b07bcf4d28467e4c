"""``pamr`` equals the authors' released PAMR module (Araslanov & Roth, CVPR 2020; the ``pamr.py``
that NACLIP ships), re-written here in its own formulation: fixed 3x3 convolution kernels at
each dilation over replicate-padded inputs, one output channel per window position.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freesegdiff.stages.refine.pamr import pamr

# The eight off-centre cells of a 3x3 window, in the release's kernel order (row-major).
OFF_CENTRE = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
ALL_CELLS = [(r, c) for r in range(3) for c in range(3)]


def shift_kernel(cells: list[tuple[int, int]], centre: float) -> torch.Tensor:
    """(len(cells), 1, 3, 3): output channel i reads cell ``cells[i]`` (weight 1), plus
    ``centre`` times the window's centre (-1 for differences: centre - neighbour after sign)."""
    kernel = torch.zeros(len(cells), 1, 3, 3)
    for i, (r, c) in enumerate(cells):
        kernel[i, 0, r, c] += 1.0
        kernel[i, 0, 1, 1] += centre
    return kernel


def dilated_conv(x: torch.Tensor, kernel: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """x (B, K, H, W) -> (B, K, P * len(dilations), H, W): every channel convolved alone with
    the P kernels at each dilation, edges replicated (the release's ``LocalAffinity``)."""
    b, k, h, w = x.shape
    flat = x.reshape(b * k, 1, h, w)
    out = [F.conv2d(F.pad(flat, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(out, dim=1).view(b, k, -1, h, w)


def released_pamr(
    image: torch.Tensor, mask: torch.Tensor, iterations: int, dilations: tuple[int, ...]
) -> torch.Tensor:
    """The release's ``PAMR(iterations, dilations)(image, mask)``: image (B, K, H, W), mask
    (B, C, H, W) at the image's size."""
    # |x_n - x_centre| (the release's kernel is centre - neighbour; abs either way)
    difference = dilated_conv(image, -shift_kernel(OFF_CENTRE, -1.0), dilations).abs()
    spread = dilated_conv(image, shift_kernel(ALL_CELLS, 0.0), dilations).std(2, keepdim=True)
    affinity = (-difference / (1e-8 + 0.1 * spread)).mean(1, keepdim=True).softmax(2)
    copy = shift_kernel(OFF_CENTRE, 0.0)
    for _ in range(iterations):
        mask = (dilated_conv(mask, copy, dilations) * affinity).sum(2)
    return mask


@pytest.fixture(scope="module")
def guide() -> torch.Tensor:
    """A 61x83 crop of a real photo, normalised as CLIP's input (3, 61, 83) float32."""
    from skimage import data

    crop = np.ascontiguousarray(data.astronaut()[150:211, 180:263])
    mean = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
    return (torch.from_numpy(crop).permute(2, 0, 1).float() - mean) / std


def test_kernels_are_the_releases() -> None:
    """The shift kernels read as the release's hand-written ones."""
    affinity = -shift_kernel(OFF_CENTRE, -1.0)  # centre +1, neighbour -1 in the release
    assert torch.equal(affinity[:, 0, 1, 1], torch.ones(8))
    assert affinity.sum() == 0 and (affinity == -1).sum() == 8
    assert torch.equal(affinity[3, 0], torch.tensor([[0, 0, 0], [-1, 1, 0], [0, 0, 0.0]]))
    copy = shift_kernel(ALL_CELLS, 0.0)
    assert torch.equal(copy.view(9, 9), torch.eye(9))


@pytest.mark.parametrize("dilations", [(8, 16), (1, 2, 4, 8, 12, 24)])
@pytest.mark.parametrize("iterations", [1, 10])
def test_pamr_equals_released(
    guide: torch.Tensor, dilations: tuple[int, ...], iterations: int
) -> None:
    generator = torch.Generator().manual_seed(sum(dilations) + iterations)
    logits = torch.randn(5, *guide.shape[1:], generator=generator)
    expected = released_pamr(guide[None], logits[None], iterations, dilations)[0]
    actual = pamr(guide, logits, iterations=iterations, dilations=dilations)
    assert actual.shape == logits.shape and actual.dtype == torch.float32
    difference = (actual - expected).abs().max()
    print(f"dilations {dilations}, {iterations} steps: max |diff| {difference:.2e}")
    assert (expected - logits).abs().max() > 0.1  # the refinement does change the logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
