"""Time the mask refinement of one VOC-size image: torch CRF, pydensecrf, PAMR.

    python benchmarks/bench_refine.py [--device cuda] [--photo astronaut] [--runs 5] [--threads 2]

A real photo (scikit-image) resized to 500x375 (VOC's usual size) with 3 coarse masks made
the way the pipeline makes them (decided on a 32x32 grid, upsampled nearest). Each method
refines all 3 masks; the table gives the median and the fastest of ``--runs`` runs after one
warm-up, and how many pixels each method's masks share with pydensecrf's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from freesegdiff.config import RefineConfig
from freesegdiff.stages.refine import refine_masks

WIDTH, HEIGHT = 500, 375
GRID = 32


def photo_and_masks(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(375, 500, 3) uint8 photo and (3, 375, 500) bool blocky masks of three of its regions."""
    from skimage import data
    from skimage.transform import resize

    photo = resize(getattr(data, name)(), (HEIGHT, WIDTH), anti_aliasing=True)
    small = resize(photo, (GRID, GRID), anti_aliasing=True)
    brightness = small.mean(-1)
    cluster_maps = [
        brightness > np.median(brightness),  # bright half
        small[..., 0] - small[..., 2] > 0.1,  # reddish
        brightness < np.quantile(brightness, 0.2),  # darkest fifth
    ]
    rows = np.arange(HEIGHT) * GRID // HEIGHT
    columns = np.arange(WIDTH) * GRID // WIDTH
    masks = np.stack([cluster_map[rows][:, columns] for cluster_map in cluster_maps])
    return (photo * 255).round().astype(np.uint8), masks


def timed(run: Callable[[], np.ndarray], runs: int, device: torch.device) -> list[float]:
    """Seconds per call of ``run``, after one warm-up call."""
    run()
    seconds = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device for the torch methods")
    parser.add_argument("--photo", default="astronaut", help="a scikit-image photo name")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    image, masks = photo_and_masks(args.photo)
    configs = {
        "crf, torch": (RefineConfig(method="crf", backend="torch"), device),
        "crf, pydensecrf": (RefineConfig(method="crf", backend="pydensecrf"), torch.device("cpu")),
        "pamr, torch": (RefineConfig(method="pamr"), device),
    }
    reference = refine_masks(image, masks, configs["crf, pydensecrf"][0])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.photo} at {WIDTH}x{HEIGHT}, {len(masks)} masks, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, load average {load:.2f}"
    )
    print(f"{'method':<17}{'device':<8}{'median s':>10}{'best s':>9}{'same as pydensecrf':>20}")
    for label, (config, where) in configs.items():
        seconds = timed(
            lambda c=config, w=where: refine_masks(image, masks, c, w), args.runs, where
        )
        agreement = (refine_masks(image, masks, config, where) == reference).mean()
        print(
            f"{label:<17}{where.type:<8}{statistics.median(seconds):>10.3f}"
            f"{min(seconds):>9.3f}{agreement:>20.4%}"
        )


if __name__ == "__main__":
    main()
