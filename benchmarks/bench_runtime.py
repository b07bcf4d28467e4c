"""Each trick of freesegdiff.infra.tuning on and off: the SD 1.4 VAE encoder at 512x512.

    python benchmarks/bench_runtime.py [--dtype bfloat16] [--runs 5] [--rounds 2] [--base ...]

The real VAE architecture with random weights (freesegdiff.bench.models), on the CPU. Every
configuration runs in a fresh interpreter (the allocator starts as the system leaves it): the
process tuning before the model is built and after it (``allocator``), the model tuned as a
tuned DiffusionFeatures is (``inplace_resnets``, ``channels_last``), then one warm-up encode
(the first at the shape, never from the heap) and ``--runs`` timed encodes, each from the heap
with ``heap_buffers``. Configurations: none, the base (``RuntimeOptions.fast()`` for the dtype),
the base without each of its tricks and with each other one. Prints the median and fastest
encode and the peak resident memory; the configurations are interleaved over ``--rounds``
rounds, since other work on the same cores slows some runs down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

TRICKS = ("allocator", "inplace_resnets", "channels_last", "heap_buffers")


def configs(base: tuple[str, ...]) -> dict[str, dict[str, bool]]:
    """No trick, the ``base`` tricks, the base without each of its tricks and with each other."""
    on = dict.fromkeys(base, True)
    found: dict[str, dict[str, bool]] = {"none": {}, "base": on}
    for trick in TRICKS:
        if trick in base:
            found[f"base without {trick}"] = {key: True for key in base if key != trick}
        else:
            found[f"base with {trick}"] = {**on, trick: True}
    return found


CHILD = """
import json, resource, sys, time
import torch
from freesegdiff.infra import memory
from freesegdiff.bench.models import _empty, load_architecture, materialise
from freesegdiff.infra.tuning import (
    RuntimeOptions,
    after_loading,
    tune_process,
    use_inplace_resnets,
)
from diffusers import AutoencoderKL

chosen, dtype_name, runs = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
TRICKS = ("allocator", "inplace_resnets", "channels_last", "heap_buffers")
options = RuntimeOptions(**{key: chosen.get(key, False) for key in TRICKS})
dtype = getattr(torch, dtype_name)
tune_process(options)
architecture = load_architecture("CompVis/stable-diffusion-v1-4", "vae")
vae = materialise(_empty(AutoencoderKL.from_config, architecture), dtype, torch.device("cpu"), 1,
                  bool(options.channels_last))
if options.inplace_resnets:
    use_inplace_resnets(vae)
after_loading(options)
pixels = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
pixels = pixels.to(dtype)
if options.channels_last:
    pixels = pixels.contiguous(memory_format=torch.channels_last)
times = []
with torch.inference_mode():
    vae.encode(pixels)  # warm-up: the first encode at this shape, never from the heap
    for _ in range(runs):
        began = time.perf_counter()
        if options.heap_buffers:
            with memory.large_buffers_from_heap():
                vae.encode(pixels)
        else:
            vae.encode(pixels)
        times.append(time.perf_counter() - began)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print(json.dumps({"times": times, "peak_gb": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--base",
        nargs="*",
        default=None,
        help="the tricks of the base configuration (default: RuntimeOptions.fast() for --dtype:"
        " all four in bfloat16, all but channels_last in float32)",
    )
    args = parser.parse_args()
    if args.base is None:
        args.base = [t for t in TRICKS if args.dtype == "bfloat16" or t != "channels_last"]
    chosen = configs(tuple(args.base))
    names = list(chosen)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name in names:
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    json.dumps(chosen[name]),
                    args.dtype,
                    str(args.runs),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times[name] += result["times"]
            peaks[name].append(result["peak_gb"])
    print(f"VAE encoder, 1x3x512x512, {args.dtype}, load average before: {load_before}")
    print(f"base: {', '.join(args.base)}")
    print(f"{'configuration':<30}{'median s':>10}{'fastest s':>11}{'peak GB':>9}")
    for name in names:
        print(
            f"{name:<30}{statistics.median(times[name]):>10.3f}{min(times[name]):>11.3f}"
            f"{max(peaks[name]):>9.2f}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
