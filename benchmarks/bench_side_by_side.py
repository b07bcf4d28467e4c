"""freesegdiff against the released script's structure: same models, same decoding, one run.

    .venv/bin/python benchmarks/bench_side_by_side.py [--images 5] [--dtype bfloat16]
        [--preset paper] [--json benchmarks/results/side-by-side.json]

Both sides load the same real-architecture random weights from the Hub-layout folders that
``freesegdiff bench`` writes (freesegdiff.bench.hub_layouts), each in a fresh interpreter, and
segment the same photos (the bench's 500x375 ones) one at a time after one warm-up photo:

- ``freesegdiff``: the preset's pipeline built as ``freesegdiff segment`` builds it (runtime
  tuning on, the text encoder freed for open vocabulary), the models loaded in ``--dtype``;
- ``released``: the released script's order of operations (tests/reference/released.py: BLIP
  with LAVIS's decoding, the full UNet pass, scikit-learn k-means, CLIP once per mask,
  pydensecrf once per kept mask), its models loaded as it loads them (``from_pretrained``, then
  converted to ``--dtype``).

Both decode the captions the same way (3 beams, 10 to 30 tokens, prompt "a picture of ") from
the same weights, so they caption alike and do the same work downstream; the script prints
each side's seconds per image, peak resident memory and load time, the ratio, and how many
pixels of the label maps agree (they need not all agree in bfloat16: each side rounds its own
way; in float32 the tests prove them equal).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _photos(count: int) -> list[np.ndarray]:
    from freesegdiff.bench.runner import bench_images

    return bench_images(count + 1, (500, 375))  # the first one warms up


def _folders(preset: str) -> dict[str, str]:
    from freesegdiff.bench.runner import with_layout_folders
    from freesegdiff.presets import load_preset

    models = with_layout_folders(load_preset(preset)).models
    return {"diffusion": models.diffusion, "clip": models.clip, "captioner": models.captioner}


def _save_maps(args: argparse.Namespace, maps: list[np.ndarray]) -> str:
    """The label maps into ``args.maps`` (.npy), so the parent compares them; returns the path."""
    np.save(args.maps, np.stack(maps))
    return str(args.maps)


def run_freesegdiff(args: argparse.Namespace) -> dict:
    """The package's side, in this (fresh) process."""
    from freesegdiff.config import set_by_path
    from freesegdiff.infra.tuning import RuntimeOptions, after_loading
    from freesegdiff.pipeline import FreeSegDiff
    from freesegdiff.presets import load_preset

    config = set_by_path(load_preset(args.preset), "dtype", args.dtype)
    for key, folder in _folders(args.preset).items():
        config = set_by_path(config, f"models.{key}", folder)
    runtime = RuntimeOptions.fast()  # as `freesegdiff segment` runs
    began = time.perf_counter()
    pipe = FreeSegDiff.from_config(config, runtime=runtime)
    pipe.release_text_encoder()
    after_loading(runtime)
    return _measure(args, pipe, time.perf_counter() - began, _peak_gb())


def run_released(args: argparse.Namespace) -> dict:
    """The released structure's side, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.reference import released

    released.DTYPE = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    folders = _folders(args.preset)
    began = time.perf_counter()
    released._diffusion(folders["diffusion"])  # what the released script loads before a photo
    released._blip(folders["captioner"])
    released._clip(folders["clip"])
    released._spacy()
    load_seconds, load_peak = time.perf_counter() - began, _peak_gb()

    @torch.inference_mode()
    def segment(photo: np.ndarray) -> Any:
        return released.released_segment(
            photo,
            sd_folder=folders["diffusion"],
            clip_folder=folders["clip"],
            blip_folder=folders["captioner"],
        )

    return _measure(args, segment, load_seconds, load_peak)


def _measure(
    args: argparse.Namespace,
    segment: Callable[[np.ndarray], Any],
    load_seconds: float,
    load_peak: float,
) -> dict:
    """Segment the photos one by one (the first a warm-up, not counted); the figures of a side.

    ``segment(photo)`` returns something with ``label_map`` and ``caption``.
    """
    seconds, maps, captions = [], [], []
    for index, photo in enumerate(_photos(args.images)):
        began = time.perf_counter()
        output = segment(photo)
        if index:
            seconds.append(time.perf_counter() - began)
            maps.append(output.label_map)
            captions.append(output.caption)
    return {
        "seconds": seconds,
        "load_seconds": load_seconds,
        "load_peak_gb": load_peak,
        "peak_gb": _peak_gb(),
        "captions": captions,
        "maps": _save_maps(args, maps),
    }


def _side(name: str, args: argparse.Namespace, folder: Path) -> dict:
    command = [sys.executable, __file__, "--side", name, "--images", str(args.images)]
    command += ["--maps", str(folder / f"{name}.npy")]
    command += ["--dtype", args.dtype, "--preset", args.preset]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the {name} side failed (exit {done.returncode})")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--side", choices=["freesegdiff", "released"], help=argparse.SUPPRESS)
    parser.add_argument("--maps", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:  # one side, in a fresh interpreter
        run = run_freesegdiff if args.side == "freesegdiff" else run_released
        print(json.dumps(run(args)))
        return
    _folders(args.preset)  # written once (in a child process), outside both measurements
    sides = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("released", "freesegdiff"):
            print(f"running the {name} side ...", flush=True)
            sides[name] = _side(name, args, Path(folder))
        ours, theirs = (np.load(sides[name]["maps"]) for name in ("freesegdiff", "released"))
    agree = [float(np.mean(a == b)) for a, b in zip(ours, theirs, strict=True)]
    same_captions = sum(
        a == b
        for a, b in zip(
            sides["freesegdiff"]["captions"], sides["released"]["captions"], strict=True
        )
    )
    figures = {
        name: {
            "seconds_per_image": statistics.median(side["seconds"]),
            "peak_rss_gb": round(side["peak_gb"], 3),
            "load_seconds": round(side["load_seconds"], 2),
            "load_peak_rss_gb": round(side["load_peak_gb"], 3),
            "per_image": [round(value, 3) for value in side["seconds"]],
        }
        for name, side in sides.items()
    }
    ratio = figures["released"]["seconds_per_image"] / figures["freesegdiff"]["seconds_per_image"]
    print(f"\n{args.preset} preset, {args.dtype}, {args.images} photos of 500x375, one at a time\n")
    print(f"{'':<13}{'s/image':>9}{'peak GB':>9}{'load s':>8}{'load peak GB':>14}")
    for name, row in figures.items():
        print(
            f"{name:<13}{row['seconds_per_image']:>9.2f}{row['peak_rss_gb']:>9.2f}"
            f"{row['load_seconds']:>8.1f}{row['load_peak_rss_gb']:>14.2f}"
        )
    print(f"\nfreesegdiff is {ratio:.2f}x faster than the released structure")
    print(
        f"same captions: {same_captions} of {args.images}; label-map pixels that agree: "
        + ", ".join(f"{value:.1%}" for value in agree)
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "dtype": args.dtype,
                    "images": args.images,
                    "speedup": round(ratio, 3),
                    "sides": figures,
                    "same_captions": same_captions,
                    "pixels_agree": agree,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
