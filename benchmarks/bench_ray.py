"""`segment` on a folder of real photos: one local process, then `--ray` with 1 and 2 CPU actors.

The figures of the README's "Past one machine" section (issue 13). Each run is a fresh
`freesegdiff segment` process (so Ray starts, and every actor loads the models, inside the
measured time), `--preset tiny` by default: the tiny random models keep the run about the
pipeline's own work (caption, features, k-means, CLIP, CRF) at a small scale rather than the
machine's memory. Prints the wall seconds of each run, its images per second, and the Ray
summary line (images/s in all from the first row asked for, and per actor over its busy time).

    .venv/bin/python benchmarks/bench_ray.py [--images 16] [--preset tiny] [--actors 1 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "motorcycle_left",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "logo",
    "camera",
    "coins",
    "horse",
    "page",
    "moon",
    "brick",
)


def write_photos(folder: Path, count: int) -> list[str]:
    """``count`` of scikit-image's photos as PNG files in ``folder`` (cycling if more)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    names = []
    available = [name for name in PHOTOS if hasattr(data, name)]
    for index in range(count):
        name = available[index % len(available)]
        try:
            pixels = getattr(data, name)()
        except Exception:  # a photo scikit-image would download: not here
            continue
        if isinstance(pixels, tuple):  # stereo pairs
            pixels = pixels[0]
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels.astype(float) / max(float(pixels.max()), 1.0))).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}_{name}.png")
        names.append(name)
    return names


def run(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = [line for line in done.stderr.splitlines() if line.startswith("Ray:")]
    return seconds, summary[-1] if summary else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    cli = [sys.executable, "-m", "freesegdiff.cli", "segment", "--preset", args.preset]
    cli += ["--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        names = write_photos(folder, args.images)
        print(f"{len(names)} photos: {', '.join(sorted(set(names)))}")
        runs = [("local, one process", [])]
        runs += [
            (f"--ray, {n} CPU actor{'s' if n > 1 else ''}", ["--ray", "--ray-actors", str(n)])
            for n in args.actors
        ]
        for index, (label, extra) in enumerate(runs):
            output = Path(tmp) / f"out{index}"
            seconds, summary = run([*cli, str(folder), "-o", str(output), *extra])
            rate = len(names) / seconds
            print(f"{label}: {seconds:.1f} s wall, {rate:.3f} images/s", flush=True)
            if summary:
                print(f"  {summary}", flush=True)


if __name__ == "__main__":
    main()
