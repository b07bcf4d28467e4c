"""A 6000 x 4000 photo against VOC-sized ones, `paper` preset, real-architecture random weights.

The target of issue 10: within 1.5 GB above the models' own memory and within 3x the time of a
VOC-sized photo. One process, models loaded once (freesegdiff.bench.runner.build_pipeline),
tuned as `segment` tunes them: two VOC-sized photos (the first warms up), then the huge one at
each working size given. The photos are decoded arrays (no JPEG decoding: +0.3 s at 24 Mpx).

    .venv/bin/python benchmarks/bench_huge.py [--dtype bfloat16] [--working-sizes 2048 1024]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from PIL import Image


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident memory of this process, GB."""
    from pathlib import Path

    status = Path("/proc/self/status").read_text()
    current = int(status.split("VmRSS:")[1].split()[0]) * 1024 / 1e9
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--working-sizes", type=int, nargs="+", default=[2048])
    args = parser.parse_args()

    import dataclasses

    from skimage import data

    from freesegdiff.bench.runner import build_pipeline
    from freesegdiff.config import set_by_path
    from freesegdiff.infra.tuning import RuntimeOptions
    from freesegdiff.presets import load_preset

    config = set_by_path(load_preset("paper"), "dtype", args.dtype)
    runtime = RuntimeOptions.fast()
    pipe = build_pipeline(config, runtime)  # the Hub-layout folders, as `bench` loads them
    pipe.release_text_encoder()
    photo = Image.fromarray(data.astronaut())
    voc = np.asarray(photo.resize((500, 375), Image.Resampling.BICUBIC))
    huge = np.asarray(photo.resize((6000, 4000), Image.Resampling.BICUBIC))
    print(f"models built: rss {rss_gb()[0]:.2f} GB, peak {rss_gb()[1]:.2f} GB", flush=True)
    for index in range(2):
        start = time.perf_counter()
        pipe(voc[:, ::-1] if index else voc)
        voc_seconds = time.perf_counter() - start
        peak = rss_gb()[1]
        print(f"VOC 500x375 #{index + 1}: {voc_seconds:.2f} s, peak {peak:.2f} GB", flush=True)
    voc_peak = rss_gb()[1]
    for side in args.working_sizes:
        pipe.config = dataclasses.replace(
            pipe.config, limits=dataclasses.replace(pipe.config.limits, working_size=side)
        )
        start = time.perf_counter()
        result = pipe(huge)
        seconds = time.perf_counter() - start
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items() if v >= 0.05)
        peak = rss_gb()[1]
        print(
            f"6000x4000 at working size {side}: {seconds:.2f} s = {seconds / voc_seconds:.2f}x "
            f"VOC; peak {peak:.2f} GB = {peak - voc_peak:+.2f} GB over the VOC runs' peak "
            f"({stages})",
            flush=True,
        )


if __name__ == "__main__":
    main()
