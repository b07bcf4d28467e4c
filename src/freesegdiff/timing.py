"""Per-stage wall-clock timing that is honest on CUDA (it synchronises at stage boundaries)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
