"""``freesegdiff bench``: what this machine does per image, offline, stage by stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from freesegdiff.errors import ConfigError


def _size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)``."""
    width, sep, height = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError(text)
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size takes WIDTHxHEIGHT, e.g. 500x375, got {text!r}"
        ) from None


def add_parser(subparsers: Any) -> None:
    """Register ``bench``."""
    from freesegdiff.presets import available_presets

    parser = subparsers.add_parser(
        "bench",
        help="measure seconds per image, stage by stage, with real-size random models",
        description=(
            "Build the preset's networks with their real architectures and random weights "
            "(SD 1.4 UNet, VAE and text encoder, BLIP base or BLIP-2, CLIP ViT-B/32; the tiny "
            "preset uses its tiny models), so it runs offline with the true shapes, FLOPs and "
            "memory. Runs N photos of a VOC-like size through the whole pipeline after one "
            "warm-up batch and prints per-stage median seconds, seconds per image, images per "
            "second, the model floor (the model forward passes alone), the overhead (the share "
            "of the time outside every stage) and the peak resident memory."
        ),
    )
    parser.add_argument(
        "--preset",
        default="paper",
        choices=sorted(available_presets()),
        help="whose models and settings to measure (paper)",
    )
    parser.add_argument("--images", type=int, default=5, metavar="N", help="measured images (5)")
    parser.add_argument(
        "--size", type=_size, default=(500, 375), metavar="WxH", help="image size (500x375)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16 (CPU), float16 (CUDA) or auto: bfloat16 on CPUs with native "
        "support, float16 on CUDA, else float32 (auto)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, metavar="B", help="images per model forward (1)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-runtime-tuning",
        action="store_true",
        help="measure the models untuned (freesegdiff.infra.tuning: allocator, in-place ResNets, "
        "channels-last, heap buffers are all on by default)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="also run the images streamed (freesegdiff.infra.stream, as segment runs a folder) "
        "and print its steady-state images per second, each stage group's busy fraction and "
        "queue depths beside the serial figures; needs --images of at least 12",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write the figures as JSON: stages, seconds_per_image, images_per_second, "
        "model_floor_seconds (and model_floor by model), overhead, peak_rss_gb, settings, "
        "per_image",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any pipeline setting by dotted name, value as JSON (e.g. --set refine.method=none)",
    )
    parser.set_defaults(run=run)


def _overrides(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write the JSON if asked."""
    import torch

    from freesegdiff.bench.runner import BenchSettings, run_bench
    from freesegdiff.cli.common import runtime_from_args

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = BenchSettings(
        preset=args.preset,
        images=args.images,
        size=args.size,
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
        overrides=_overrides(args.settings),
        runtime=runtime_from_args(args),
        stream=args.stream,
    )
    report = run_bench(settings)
    print(report.table())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0
