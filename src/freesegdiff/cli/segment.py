"""``freesegdiff segment``: segment image files and folders, writing one set of files each."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freesegdiff.cli import common
from freesegdiff.cli.common import (
    add_pipeline_arguments,
    add_stream_argument,
    config_from_args,
    parse_classes,
)
from freesegdiff.cli.folder import (
    CocoEntries,
    Job,
    WriteSettings,
    plan_jobs,
    segment_and_write,
    write_run_files,
)
from freesegdiff.distributed import add_ray_arguments, check_ray_arguments
from freesegdiff.errors import ConfigError
from freesegdiff.infra.interrupts import Terminated, exit_code
from freesegdiff.io.filenames import display_name, quoted
from freesegdiff.io.images import IMAGE_SUFFIXES, SkippedEntries
from freesegdiff.io.outputs import FAILURES_NAME, FORMATS

if TYPE_CHECKING:
    pass


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
            "timings), then DIR/index.html. "
            "Names: the output mirrors the tree under each INPUT folder (a file INPUT goes to "
            "the top of DIR); where two images of one folder would share a file (x.jpg beside "
            "x.png, or x.png beside x_overlay.jpg) their stems keep the extension "
            "(x.jpg.png, x.jpg_overlay.png, x.jpg.json). "
            "Safety: every file is written to a hidden .tmp file and renamed into place, so a "
            "killed run leaves only complete files (its .tmp leftovers are removed by the next "
            "run); each image's JSON is written last, marking it complete. DIR is created and "
            "checked writable before any model loads; DIR itself is never read as input. "
            "The same inputs and seed give the same bytes in every file but the JSON's "
            "timings. "
            "Settings: DIR/freesegdiff-run.json records the settings, classes and models of "
            "its results; a run with other settings into DIR is refused (exit 2) unless "
            "--overwrite. "
            "Inputs: folders are searched for " + " ".join(IMAGE_SUFFIXES) + " files; other "
            "entries (other extensions, FIFOs, devices, broken links) are counted in the "
            "summary. "
            "Failures: an input, image or folder that cannot be read or segmented, or whose "
            "files cannot be written (a full disk), is reported, listed in DIR/failures.json "
            "and skipped; the others are done. Ctrl-C or SIGTERM finishes the image being "
            "written, writes index.html and failures.json for what was done, and says how to "
            "go on (the same command with --resume). "
            "Exit code: 0 all done, 1 some input failed, 2 a usage or set-up error (nothing "
            "ran), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."
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
    parser.add_argument(
        "--explain-timings",
        action="store_true",
        help="with --explain, print the seconds per stage in the figure (off by default so the "
        "figure's bytes are the same on every run)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip images whose files are complete in DIR from an earlier run with the same "
        "settings (JSON present, parsing, made with the settings recorded in "
        "DIR/freesegdiff-run.json and listing the PNG, overlay and explain files, all "
        "present) and segment the rest; index.html and coco_results.json then cover all. A "
        "folder of other settings is refused: see --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="DIR holds results of other settings: delete them (the files freesegdiff wrote "
        "for them) and write this run's, instead of refusing",
    )
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-runtime-tuning",
        action="store_true",
        help="run the models untuned (freesegdiff.infra.tuning: allocator, in-place ResNets, "
        "channels-last, heap buffers, beam-search cache, CRF worker processes): slower; in "
        "bfloat16 on the CPU the features round slightly differently without channels-last",
    )
    add_stream_argument(parser)
    add_pipeline_arguments(parser)
    add_ray_arguments(parser)
    parser.set_defaults(run=run)


def _formats(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(f"unknown --format {unknown or text!r}; choose from {', '.join(FORMATS)}")
    return chosen


def _require_extras(args: argparse.Namespace, config: Any, formats: list[str]) -> None:
    """Fail now, naming the extra, if the run needs one that is not installed."""
    from freesegdiff.infra.extras import require, require_for_config

    require_for_config(config)
    if args.explain:
        require("explain")
    if "coco-rle" in formats:
        require("coco-rle")


def run(args: argparse.Namespace) -> int:
    """Segment every input; return 0 when all succeeded, 1 when any failed, 130 on Ctrl-C, 143
    on SIGTERM.

    Usage and set-up errors (:class:`ConfigError`, exit code 2 in :func:`freesegdiff.cli.main`)
    are raised before any model loads: bad settings, no input that can be read, an output
    folder that is a file, not writable or holding results of other settings, a missing extra.
    """
    from freesegdiff.io.atomic import remove_stale_temporaries
    from freesegdiff.io.outputs import (
        RunManifest,
        check_manifest,
        outputs_complete,
        prepare_output_folder,
        remove_other_results,
        write_manifest,
    )
    from freesegdiff.pipeline import check_settings

    formats = _formats(args.format)
    classes = parse_classes(args.classes)
    if args.explain_timings and not args.explain:
        raise ConfigError("--explain-timings prints timings in the explain figure: add --explain")
    config = config_from_args(args)
    _require_extras(args, config, formats)
    check_settings(config)  # every setting's value and range, before anything is read
    check_ray_arguments(args)
    if args.ray is not None and "coco-rle" in formats and "png" not in formats:
        raise ConfigError(
            "--ray with --format coco-rle needs png too: coco_results.json is then built from "
            "the files the actors write"
        )
    output = Path(args.output)
    failures: dict[str, str] = {}
    entries = SkippedEntries()
    jobs = plan_jobs(args.inputs, output, failures, entries)  # skips DIR if inside an input
    if not jobs:  # nothing can run: a usage error
        raise ConfigError(_nothing_to_segment(args.inputs, failures, entries))
    manifest = RunManifest(config.to_dict(), classes, args.preset)
    replacing = check_manifest(output, manifest, overwrite=args.overwrite)  # before any write
    prepare_output_folder(output)  # a ConfigError (exit 2) before any model loads
    remove_stale_temporaries(output)  # the .tmp files of a killed run
    settings_id = manifest.settings_id()
    settings = WriteSettings(
        formats=tuple(formats),
        classes=classes,
        overlay=not args.no_overlay,
        explain=args.explain,
        explain_timings=args.explain_timings,
        settings_id=settings_id,
    )

    def claim_folder() -> None:
        """Once the models are loaded, before the first image's files: DIR's results are this
        run's settings from now on (a run that cannot load its models leaves DIR as it was)."""
        if replacing:
            removed = remove_other_results(output, settings_id)
            print(
                f"--overwrite: {len(removed)} files of other settings deleted from "
                f"{display_name(output)}",
                file=sys.stderr,
            )
        write_manifest(output, manifest)

    skipped: list[Job] = []
    if args.resume and "png" not in formats:
        print(
            "--resume: without the png format no image has files that mark it complete; all "
            "are segmented again",
            file=sys.stderr,
        )
    elif args.resume:
        skipped = [
            job
            for job in jobs
            if outputs_complete(
                job.folder,
                job.stem,
                overlay=not args.no_overlay,
                explain=args.explain,
                source=str(job.source),
                settings_id=settings_id,
            )
        ]
    done_ids = {job.image_id for job in skipped}
    todo = [job for job in jobs if job.image_id not in done_ids]
    # COCO entries of the images segmented here, by image id; coco_results.json lists them in
    # input order with those of resumed images (or, with Ray, written by the actors) read back
    coco: CocoEntries | None = {} if "coco-rle" in formats else None
    written, interrupt, elapsed = _segment(args, todo, failures, coco, settings, claim_folder)
    write_run_files(output, settings, jobs, done_ids | written, failures, coco or {})
    count = len(written)
    message = (
        f"segmented {count} of {len(jobs)} images in {elapsed:.1f} s "
        f"({elapsed / max(count, 1):.2f} s/image) -> {display_name(output)}"
    )
    if skipped:
        message += f"; {len(skipped)} skipped, already complete (--resume)"
    if failures:
        names = ", ".join(display_name(name) for name in failures)
        message += f"; {len(failures)} failed: {names} (see {FAILURES_NAME})"
    print(message)
    if entries:
        print(entries.describe())
    if interrupt is not None:
        complete = done_ids | written
        left = sum(job.image_id not in complete and str(job.source) not in failures for job in jobs)
        stopped = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(
            f"freesegdiff segment: {stopped}; {left} images not done. Every file in "
            f"{display_name(output)} is complete; to finish, run the same command again with "
            "--resume (complete images are skipped).",
            file=sys.stderr,
        )
        return exit_code(interrupt)
    return 1 if failures else 0


def _nothing_to_segment(
    inputs: list[str], failures: dict[str, str], entries: SkippedEntries
) -> str:
    """The message of a run with no image to segment."""
    if failures:
        reasons = "; ".join(f"{quoted(name)}: {reason}" for name, reason in failures.items())
        return f"nothing to segment: {reasons}"
    searched = ", ".join(quoted(entry) for entry in inputs)
    if entries:
        return f"no image files found in {searched}: {entries.describe()}"
    return f"no image files found in {searched} (images are read from {' '.join(IMAGE_SUFFIXES)})"


def _segment(
    args: argparse.Namespace,
    todo: list[Job],
    failures: dict[str, str],
    coco: CocoEntries | None,
    settings: WriteSettings,
    claim_folder: Callable[[], None],
) -> tuple[set[str], KeyboardInterrupt | None, float]:
    """Load the models (only if there is work) and segment and write ``todo``.

    ``coco``: where each image's COCO entries are kept, by image id (None: no COCO format);
    ``settings``: what is
    written for each image; ``claim_folder``: called once the models are loaded (Ray: before
    the actors start), before any image's files are written.

    Returns:
        The image ids written completely, the Ctrl-C or SIGTERM (:class:`Terminated`) that
        stopped the run (None: it ran to the end), and the seconds spent after the models
        loaded. Images that failed are added to ``failures``.
    """
    if not todo:
        claim_folder()
        return set(), None, 0.0
    if getattr(args, "ray", None) is not None:
        claim_folder()
        return _segment_on_ray(args, settings, todo, failures)
    from tqdm import tqdm

    written: set[str] = set()
    start = time.perf_counter()
    progress = tqdm(total=len(todo), unit="img", disable=args.no_progress, file=sys.stderr)
    try:
        pipe = common.load_pipeline(args, settings.classes)
        claim_folder()
        start = time.perf_counter()
        for job, error in segment_and_write(pipe, settings, todo, coco):
            progress.update(1)
            if error is not None:
                failures[str(job.source)] = error
                progress.write(f"skipped {display_name(job.source)}: {error}")
            else:
                written.add(job.image_id)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM
        return written, interrupt, time.perf_counter() - start
    finally:
        progress.close()
    return written, None, time.perf_counter() - start


def _segment_on_ray(
    args: argparse.Namespace,
    settings: WriteSettings,
    todo: list[Job],
    failures: dict[str, str],
) -> tuple[set[str], KeyboardInterrupt | None, float]:
    """``_segment`` on a Ray actor pool (:mod:`freesegdiff.distributed`): each actor loads the
    models once and writes its images' files as a local run does."""
    from freesegdiff.distributed import SegmentWorker, map_on_actors, print_summary, ray_options

    items = [  # the files' bytes are read by Ray Data CPU tasks, the images made by the actors
        {
            "source": str(job.source),
            "folder": str(job.folder),
            "stem": job.stem,
            "image_id": job.image_id,
        }
        for job in todo
    ]
    written: set[str] = set()
    start = time.perf_counter()
    try:
        for row in map_on_actors(
            items,
            SegmentWorker(args, settings),
            ray_options(args),
            read="source",
            on_done=print_summary,
        ):
            if row["error"]:
                failures[row["source"]] = row["error"]
                print(f"skipped {display_name(row['source'])}: {row['error']}", file=sys.stderr)
            else:
                written.add(row["image_id"])
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM
        return written, interrupt, time.perf_counter() - start
    return written, None, time.perf_counter() - start
