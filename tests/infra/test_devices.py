"""Device helpers: host tensors reach the device unchanged (pinned, non-blocking on CUDA)."""

from __future__ import annotations

import pytest
import torch

from freesegdiff.infra.devices import to_device


def test_to_device_on_the_cpu_is_the_tensor_itself():
    values = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    moved = to_device(values, torch.device("cpu"))
    assert moved.data_ptr() == values.data_ptr()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_on_cuda_copies_through_pinned_memory_unchanged():
    values = torch.randint(0, 255, (3, 375, 500), dtype=torch.uint8)
    moved = to_device(values, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), values)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kmeans_of_the_paper_preset_runs_on_cuda_with_the_cpu_labels():
    """torch-sklearn-1.2 on the GPU: the same draws; labels as on the CPU except near-ties."""
    from freesegdiff.stages.clustering.kmeans import sklearn_kmeans

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(1024, 640, generator=generator)
    points[:300] += 2.0
    on_cpu = sklearn_kmeans(points, 4, seed=0).labels
    on_cuda = sklearn_kmeans(points.cuda(), 4, seed=0).labels
    assert on_cuda.device.type == "cuda"
    assert (on_cuda.cpu() == on_cpu).float().mean() > 0.999
