"""``freesegdiff segment``: segment image files and folders, writing one set of files each."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from freesegdiff.commands.common import (
    add_pipeline_arguments,
    config_from_args,
    parse_classes,
    pipeline_from_args,
)
from freesegdiff.errors import ConfigError, FreeSegDiffError
from freesegdiff.image_io import iter_image_files
from freesegdiff.outputs import FORMATS


def add_parser(subparsers: Any) -> None:
    """Register ``segment``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment images and write label maps, overlays and JSON",
        description=(
            "Segment image files and folders (searched recursively). For each image, writes "
            "DIR/<stem>.png (palette PNG whose pixel values are label ids), "
            "DIR/<stem>_overlay.png (coloured, labelled masks and a legend) and DIR/<stem>.json "
            "(image path, size, caption, entities, labels with id, name, score and area, "
            "timings). An image that cannot be read or segmented is reported and skipped; the "
            "exit code is 1 if any image failed."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--classes",
        metavar="NAMES",
        help="fixed vocabulary, comma-separated (default: open vocabulary from the caption)",
    )
    parser.add_argument(
        "--format",
        default="png",
        help=f"comma-separated output formats: {', '.join(FORMATS)} (default: png; "
        "coco-rle needs the [eval] extra)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also write DIR/<stem>_explain.png per image (needs the [viz] extra)",
    )
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-runtime-tuning",
        action="store_true",
        help="run the models untuned (freesegdiff.runtime: allocator, in-place ResNets, "
        "channels-last, heap buffers): slower; in bfloat16 on the CPU the features round "
        "slightly differently without channels-last",
    )
    add_pipeline_arguments(parser)
    parser.set_defaults(run=run)


def _formats(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(f"unknown --format {unknown or text!r}; choose from {', '.join(FORMATS)}")
    return chosen


def _unique_stem(path: Path, used: set[str]) -> str:
    """The file stem, made unique within the run (``x``, ``x-2``, ...)."""
    stem, index = path.stem, 2
    while stem in used:
        stem, index = f"{path.stem}-{index}", index + 1
    used.add(stem)
    return stem


def _require_extras(args: argparse.Namespace, formats: list[str]) -> None:
    """Fail now, naming the extra, if the run needs one that is not installed."""
    from freesegdiff.extras import require, require_for_config

    require_for_config(config_from_args(args))
    if args.explain:
        require("explain")
    if "coco-rle" in formats:
        require("coco-rle")


def run(args: argparse.Namespace) -> int:
    """Segment every input; return 0 when all succeeded, 1 when any failed."""
    from tqdm import tqdm

    from freesegdiff.export import CocoResults
    from freesegdiff.outputs import write_outputs
    from freesegdiff.runtime import RuntimeOptions, after_loading

    formats = _formats(args.format)
    classes = parse_classes(args.classes)
    files = list(iter_image_files(args.inputs))
    if not files:
        raise FreeSegDiffError(f"no image files found in {', '.join(args.inputs)}")
    _require_extras(args, formats)
    output = Path(args.output)
    runtime = None if args.no_runtime_tuning else RuntimeOptions.fast()
    pipe = pipeline_from_args(args, runtime)  # tunes the process before loading, the models after
    if classes is None:
        pipe.release_text_encoder()  # open vocabulary embeds only the empty prompt: 0.25 GB back
    if runtime is not None:
        after_loading(runtime)  # copies left behind by layout conversions, freed modules
    used: set[str] = set()
    stems = {str(path): _unique_stem(path, used) for path in files}
    failures: dict[str, str] = {}
    coco = CocoResults(classes)
    start = time.perf_counter()
    progress = tqdm(total=len(files), unit="img", disable=args.no_progress, file=sys.stderr)
    for name, outcome, image in pipe.iter_segment_with_images(files, classes=classes):
        progress.update(1)
        if isinstance(outcome, FreeSegDiffError):
            failures[name] = str(outcome)
            progress.write(f"skipped {name}: {outcome}")
            continue
        try:
            write_outputs(  # the pixels the pipeline read: the image is decoded once per run
                outcome,
                image,
                output,
                stem=stems.get(name, Path(name).stem),
                formats=formats,
                overlay=not args.no_overlay,
                explain=args.explain,
                coco=coco,
            )
        except (OSError, ValueError) as error:
            failures[name] = f"writing the results failed: {error}"
            progress.write(f"skipped {name}: writing the results failed: {error}")
    progress.close()
    if "coco-rle" in formats:
        coco.write(output)
    if "png" in formats and not args.no_overlay:
        from freesegdiff.visualize.index_page import write_index_page

        write_index_page(output, failures=failures)
    elapsed = time.perf_counter() - start
    done = len(files) - len(failures)
    print(
        f"segmented {done} of {len(files)} images in {elapsed:.1f} s "
        f"({elapsed / max(done, 1):.2f} s/image) -> {output}"
        + (f"; {len(failures)} failed: {', '.join(failures)}" if failures else "")
    )
    return 1 if failures else 0
