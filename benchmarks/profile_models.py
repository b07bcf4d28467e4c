"""What share of this CPU's matrix peak each model of the pipeline reaches.

    .venv/bin/python benchmarks/profile_models.py [--dtype bfloat16] [--preset paper] [--runs 3]

The peak is measured, not taken from a data sheet: the best of a few large square matrix
products in ``--dtype`` (oneDNN / AMX for bfloat16 where the CPU has it). Each model's forward
is then counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
convolutions; 2 FLOPs per multiply-add) and timed on the bench's inputs (the pipeline loaded
from the Hub-layout folders as ``freesegdiff bench`` loads it, tuned as ``segment`` runs it),
median of ``--runs`` after a warm-up. Caption generation is counted over the whole ``generate``
call (vision encoder once, every decoder step of every beam).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_peak(dtype: torch.dtype, side: int = 4096, runs: int = 5) -> float:
    """Best TFLOP/s of ``side x side`` matrix products in ``dtype``."""
    a = torch.randn(side, side).to(dtype)
    b = torch.randn(side, side).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(runs):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2 * side**3 / best / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from freesegdiff.bench.runner import (
        BenchSettings,
        _forwards,
        bench_config,
        bench_images,
        build_pipeline,
    )
    from freesegdiff.infra.tuning import RuntimeOptions, after_loading

    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(dtype)
    settings = BenchSettings(preset=args.preset, dtype=args.dtype)
    runtime = RuntimeOptions.fast()
    pipe = build_pipeline(bench_config(settings), runtime)
    pipe.release_text_encoder()
    after_loading(runtime)
    image = bench_images(1, settings.size)
    forwards = _forwards(pipe, image)
    print(
        f"{torch.get_num_threads()} threads, {args.dtype} matrix-product peak {peak:.2f} TFLOP/s\n"
    )
    print(f"{'model':<10}{'GFLOP':>9}{'seconds':>9}{'TFLOP/s':>9}{'of peak':>9}")
    for name, forward in forwards.items():
        forward()  # warm-up
        with FlopCounterMode(display=False) as counter:
            forward()
        flops = counter.get_total_flops()
        times = []
        for _ in range(args.runs):
            began = time.perf_counter()
            forward()
            times.append(time.perf_counter() - began)
        seconds = statistics.median(times)
        rate = flops / seconds / 1e12
        print(f"{name:<10}{flops / 1e9:>9.1f}{seconds:>9.3f}{rate:>9.2f}{rate / peak:>9.1%}")


if __name__ == "__main__":
    main()
