"""Per-stage wall-clock timing that is honest on CUDA (it synchronises at stage boundaries)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The stages' timing names, in pipeline order: the keys of ``SegmentationResult.timings``, of
# the JSON files and of ``freesegdiff bench``'s table. The one place they are spelled.
IO = "io"  # reading the image (and, in folder runs, writing its files)
CAPTION = "caption"
ENTITIES = "entities"  # entities and label texts
VAE = "vae"  # resize and VAE encode
UNET = "unet"  # noise and the (truncated) UNet pass
FEATURES = "features"  # assembling the feature maps
CLUSTERING = "clustering"
CLIP = "clip"  # CLIP scores and the assignment
REFINEMENT = "refinement"
COMPOSITION = "composition"
STAGES: tuple[str, ...] = (
    IO,
    CAPTION,
    ENTITIES,
    VAE,
    UNET,
    FEATURES,
    CLUSTERING,
    CLIP,
    REFINEMENT,
    COMPOSITION,
)


class StageTimer:
    """Accumulates seconds per named stage: ``with timer("unet"): ...``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def split(self, count: int) -> dict[str, float]:
        """The accumulated seconds divided evenly over ``count`` images."""
        return {stage: seconds / max(count, 1) for stage, seconds in self.seconds.items()}
