"""A simulated many-core run of the streaming executor: does throughput track the slowest group?

    .venv/bin/python benchmarks/bench_stream_sim.py [--images 48] [--refine-seconds 0.4]

Until a GPU machine with 16 cores is lent, this is the evidence for the streamed design. The
pipeline is the real one (the ``tiny`` preset's models, its real stage groups, queues and
threads, writing nothing), with one change: each image's refinement is a synthetic cost of
``--refine-seconds`` that occupies one refinement worker and no core (a sleep), as a CRF worker
process on a core of its own would. With W workers the refinement group can finish W images
per that many seconds, so the stream's throughput should follow

    min(model groups' rate, W / refine seconds)

where the model groups' rate is measured in the same run (their busy seconds per image). The
serial path refines image after image, so its rate is 1 / (model seconds + refine seconds)
whatever W is. Prints one row per W.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class SleepRefiner:
    """Step 12 with a synthetic cost: the masks as they are, after ``seconds``."""

    pool = None

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--refine-seconds", type=float, default=0.4)
    parser.add_argument("--workers", default="1,2,4,8,16")
    args = parser.parse_args()

    from skimage import data

    from freesegdiff.infra.tuning import RuntimeOptions
    from freesegdiff.pipeline import FreeSegDiff
    from freesegdiff.presets import load_preset

    # overlap: the GPU machine's stream, whose model groups leave the cores to the refinement
    runtime = RuntimeOptions(stream=True, overlap=True, crf_processes=0, allocator=False)
    pipe = FreeSegDiff.from_config(load_preset("tiny"), runtime=runtime)
    pipe.refiner = SleepRefiner(args.refine_seconds)  # type: ignore[assignment]
    photos = [getattr(data, name)() for name in ("chelsea", "astronaut", "coffee", "rocket")]
    images = [np.ascontiguousarray(photos[i % 4][::4, ::4]) for i in range(args.images)]
    list(pipe.iter_segment(images[:4]))  # warm-up

    print(
        f"{args.images} images, refinement {args.refine_seconds:.2f} s each (synthetic), "
        "tiny models on this CPU"
    )
    print(
        f"{'workers':>7} {'model img/s':>12} {'refine img/s':>13} {'predicted':>10} "
        f"{'streamed':>9} {'serial':>8} {'slowest group':>14}"
    )
    for workers in (int(w) for w in args.workers.split(",")):
        pipe._refine_threads = ThreadPoolExecutor(workers, "sim-refine")
        done = []
        for _ in pipe.iter_segment(images):
            done.append(time.perf_counter())
        streamed = (len(done) - 1) / (done[-1] - done[0])
        stats = pipe.last_stream.stats
        model_seconds = sum(stats.busy[name] for name in ("caption", "features", "naming"))
        model_rate = args.images / model_seconds
        refine_rate = workers / args.refine_seconds
        predicted = min(model_rate, refine_rate)
        slowest = "models" if model_rate < refine_rate else "refinement"
        serial = 1.0 / (model_seconds / args.images + args.refine_seconds)
        print(
            f"{workers:>7} {model_rate:>12.2f} {refine_rate:>13.2f} {predicted:>10.2f} "
            f"{streamed:>9.2f} {serial:>8.2f} {slowest:>14}"
        )


if __name__ == "__main__":
    main()
