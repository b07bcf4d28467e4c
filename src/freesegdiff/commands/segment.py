"""``freesegdiff segment``: segment image files and folders, writing one set of files each."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from freesegdiff.commands.common import (
    add_pipeline_arguments,
    add_ray_arguments,
    check_ray_arguments,
    config_from_args,
    parse_classes,
    pipeline_from_args,
    ray_options,
)
from freesegdiff.errors import ConfigError, FreeSegDiffError
from freesegdiff.image_io import iter_image_files
from freesegdiff.outputs import FAILURES_NAME, FORMATS

if TYPE_CHECKING:
    from freesegdiff.export import CocoResults


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
            "Failures: an image or folder that cannot be read or segmented is reported, listed "
            "in DIR/failures.json and skipped. Ctrl-C finishes the file being written, writes "
            "index.html and failures.json for what was done, and says how to go on (the same "
            "command with --resume). "
            "Exit code: 0 all done, 1 some input failed, 2 a usage or set-up error (nothing "
            "ran), 130 interrupted."
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
        "settings (JSON present, parsing and listing the PNG, overlay and explain files, all "
        "present) and segment the rest; index.html and coco_results.json then cover all",
    )
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-runtime-tuning",
        action="store_true",
        help="run the models untuned (freesegdiff.runtime: allocator, in-place ResNets, "
        "channels-last, heap buffers, beam-search cache, CRF worker processes): slower; in "
        "bfloat16 on the CPU the features round slightly differently without channels-last",
    )
    add_pipeline_arguments(parser)
    add_ray_arguments(parser)
    parser.set_defaults(run=run)


def _formats(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(f"unknown --format {unknown or text!r}; choose from {', '.join(FORMATS)}")
    return chosen


@dataclass(frozen=True)
class _Job:
    """One image of the run and where its files go."""

    source: Path  # the input file, as found (its str() is the pipeline's name for it)
    folder: Path  # the output folder it is written to: DIR or a subfolder mirroring the input
    stem: str  # file name stem, unique in ``folder`` (outputs.assign_stems)
    image_id: str  # the stem relative to DIR ("more/x"): the COCO image_id


def _plan(inputs: list[str], output: Path, failures: dict[str, str]) -> list[_Job]:
    """Every image of the inputs, in order, each with its output folder and stem.

    Folders that cannot be read go to ``failures``; DIR (when inside an input) is not searched;
    a file found twice (named twice, or in a folder and by name) is taken once.
    """
    from freesegdiff.outputs import assign_stems

    found: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for entry in inputs:
        root = Path(entry)
        is_folder = root.is_dir()
        for path in iter_image_files([root], exclude=[output], errors=failures):
            key = os.path.normcase(os.path.abspath(path))
            if key in seen:
                continue
            seen.add(key)
            relative = path.parent.relative_to(root).as_posix() if is_folder else ""
            found.append((path, "" if relative == "." else relative))
    stems = assign_stems([(relative, path.name) for path, relative in found])
    return [
        _Job(
            source=path,
            folder=output / relative if relative else output,
            stem=stem,
            image_id=f"{relative}/{stem}" if relative else stem,
        )
        for (path, relative), stem in zip(found, stems, strict=True)
    ]


class _DeferredInterrupt:
    """Inside the block, Ctrl-C (SIGINT) waits until the block ends, then raises.

    So the image being written is completed rather than abandoned. Only in the main thread
    (elsewhere signals cannot be handled, and this does nothing).
    """

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.pending = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGINT, previous)
        if self.pending and kind is None:
            raise KeyboardInterrupt


def _require_extras(args: argparse.Namespace, formats: list[str]) -> None:
    """Fail now, naming the extra, if the run needs one that is not installed."""
    from freesegdiff.extras import require, require_for_config

    require_for_config(config_from_args(args))
    if args.explain:
        require("explain")
    if "coco-rle" in formats:
        require("coco-rle")


def run(args: argparse.Namespace) -> int:
    """Segment every input; return 0 when all succeeded, 1 when any failed, 130 on Ctrl-C.

    Usage and set-up errors (:class:`ConfigError`, exit code 2 in :func:`freesegdiff.cli.main`)
    are raised before any model loads: bad settings, an output folder that is a file or not
    writable, a missing extra.
    """
    from freesegdiff.atomic import remove_stale_temporaries
    from freesegdiff.export import CocoResults
    from freesegdiff.outputs import outputs_complete, prepare_output_folder

    formats = _formats(args.format)
    classes = parse_classes(args.classes)
    if args.explain_timings and not args.explain:
        raise ConfigError("--explain-timings prints timings in the explain figure: add --explain")
    _require_extras(args, formats)
    check_ray_arguments(args)
    if args.ray is not None and "coco-rle" in formats and "png" not in formats:
        raise ConfigError(
            "--ray with --format coco-rle needs png too: coco_results.json is then built from "
            "the files the actors write"
        )
    output = Path(args.output)
    failures: dict[str, str] = {}
    jobs = _plan(args.inputs, output, failures)  # skips DIR if it exists inside an input
    if not jobs and not failures:
        raise FreeSegDiffError(f"no image files found in {', '.join(args.inputs)}")
    prepare_output_folder(output)  # a ConfigError (exit 2) before any model loads
    remove_stale_temporaries(output)  # the .tmp files of a killed run
    skipped: list[_Job] = []
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
            )
        ]
    done_ids = {job.image_id for job in skipped}
    todo = [job for job in jobs if job.image_id not in done_ids]
    # With png the COCO file is built from the files written, resumed images included; without,
    # from the results in memory.
    coco = CocoResults(classes) if "coco-rle" in formats and "png" not in formats else None
    written, interrupted, elapsed = _segment(args, formats, classes, todo, failures, coco)
    _write_run_files(args, formats, classes, jobs, done_ids | written, failures, coco)
    count = len(written)
    message = (
        f"segmented {count} of {len(jobs)} images in {elapsed:.1f} s "
        f"({elapsed / max(count, 1):.2f} s/image) -> {output}"
    )
    if skipped:
        message += f"; {len(skipped)} skipped, already complete (--resume)"
    if failures:
        message += f"; {len(failures)} failed: {', '.join(failures)} (see {FAILURES_NAME})"
    print(message)
    if interrupted:
        complete = done_ids | written
        left = sum(job.image_id not in complete and str(job.source) not in failures for job in jobs)
        print(
            f"freesegdiff segment: interrupted; {left} images not done. Every file in "
            f"{output} is complete; to finish, run the same command again with --resume "
            "(complete images are skipped).",
            file=sys.stderr,
        )
        return 130
    return 1 if failures else 0


def _segment(
    args: argparse.Namespace,
    formats: list[str],
    classes: list[str] | None,
    todo: list[_Job],
    failures: dict[str, str],
    coco: CocoResults | None,
) -> tuple[set[str], bool, float]:
    """Load the models (only if there is work) and segment and write ``todo``.

    ``coco``: where write_outputs collects COCO entries (None: not in memory).

    Returns:
        The image ids written completely, whether Ctrl-C stopped the run, and the seconds spent
        after the models loaded. Images that failed are added to ``failures``.
    """
    if not todo:
        return set(), False, 0.0
    if getattr(args, "ray", None) is not None:
        return _segment_on_ray(args, formats, classes, todo, failures)
    from tqdm import tqdm

    pipe = _load_pipeline(args, classes)
    written: set[str] = set()
    start = time.perf_counter()
    progress = tqdm(total=len(todo), unit="img", disable=args.no_progress, file=sys.stderr)
    try:
        for job, error in _segment_and_write(pipe, args, formats, classes, todo, coco):
            progress.update(1)
            if error is not None:
                failures[str(job.source)] = error
                progress.write(f"skipped {job.source}: {error}")
            else:
                written.add(job.image_id)
    except KeyboardInterrupt:
        return written, True, time.perf_counter() - start
    finally:
        progress.close()
    return written, False, time.perf_counter() - start


def _load_pipeline(args: argparse.Namespace, classes: list[str] | None) -> Any:
    """The run's pipeline, tuned unless ``--no-runtime-tuning`` (in a Ray actor: once each)."""
    from freesegdiff.runtime import RuntimeOptions, after_loading

    runtime = None if args.no_runtime_tuning else RuntimeOptions.fast()
    pipe = pipeline_from_args(args, runtime)  # tunes the process before loading, the models after
    if classes is None:
        pipe.release_text_encoder()  # open vocabulary embeds only the empty prompt: 0.25 GB back
    if runtime is not None:
        after_loading(runtime)  # copies left behind by layout conversions, freed modules
    return pipe


def _segment_and_write(
    pipe: Any,
    args: argparse.Namespace,
    formats: list[str],
    classes: list[str] | None,
    jobs: list[_Job],
    coco: CocoResults | None,
    images: list[Any] | None = None,
) -> Any:
    """Segment ``jobs`` and write each one's files; yield ``(job, None)`` when its files are
    complete, ``(job, reason)`` when it failed (unreadable, a pipeline error, a failed write).
    Ctrl-C during a write waits until that image's files are complete.

    ``images``: what the pipeline reads for each job (default its file; a Ray actor gives the
    file's bytes, read by a CPU task, as an :class:`~freesegdiff.image_io.EncodedImage`)."""
    from freesegdiff.outputs import write_outputs

    by_name = {str(job.source): job for job in jobs}
    image_formats = [kind for kind in formats if kind != "coco-rle" or coco is not None]
    for name, outcome, image in pipe.iter_segment_with_images(
        images if images is not None else [job.source for job in jobs], classes=classes
    ):
        job = by_name[name]
        if isinstance(outcome, FreeSegDiffError):
            yield job, str(outcome)
            continue
        error = None
        interrupted = False
        try:
            with _DeferredInterrupt():  # Ctrl-C now: this image is finished first
                try:
                    write_outputs(  # the pixels the pipeline read: decoded once per run
                        outcome,
                        image,
                        job.folder,
                        stem=job.stem,
                        formats=image_formats,
                        overlay=not args.no_overlay,
                        explain=args.explain,
                        coco=coco,
                        explain_timings=args.explain_timings,
                        coco_id=job.image_id,
                    )
                except (OSError, ValueError) as failure:
                    error = f"writing the results failed: {failure}"
        except KeyboardInterrupt:  # after the write: this image's files are complete
            interrupted = True
        yield job, error
        if interrupted:
            raise KeyboardInterrupt


def _segment_on_ray(
    args: argparse.Namespace,
    formats: list[str],
    classes: list[str] | None,
    todo: list[_Job],
    failures: dict[str, str],
) -> tuple[set[str], bool, float]:
    """``_segment`` on a Ray actor pool (:mod:`freesegdiff.distributed`): each actor loads the
    models once and writes its images' files as a local run does."""
    from freesegdiff.distributed import map_on_actors, print_summary

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
            SegmentWorker(args, formats, classes),
            ray_options(args),
            read="source",
            on_done=print_summary,
        ):
            if row["error"]:
                failures[row["source"]] = row["error"]
                print(f"skipped {row['source']}: {row['error']}", file=sys.stderr)
            else:
                written.add(row["image_id"])
    except KeyboardInterrupt:
        return written, True, time.perf_counter() - start
    return written, False, time.perf_counter() - start


@dataclass(frozen=True)
class SegmentWorker:
    """Builds one Ray actor's worker: the run's pipeline, loaded once, writing the files of the
    images it is given (``--ray``)."""

    args: argparse.Namespace
    formats: list[str]
    classes: list[str] | None

    def __call__(self) -> Any:
        from freesegdiff.distributed import encoded_image

        pipe = _load_pipeline(self.args, self.classes)

        def work(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            errors: dict[str, str] = {}
            jobs, images = [], []
            for item in items:
                image = encoded_image(item, "source")  # the bytes a CPU task read
                if isinstance(image, Exception):  # the local run's message for this file
                    errors[item["image_id"]] = str(image)
                    continue
                jobs.append(
                    _Job(Path(item["source"]), Path(item["folder"]), item["stem"], item["image_id"])
                )
                images.append(image)
            for job, error in _segment_and_write(
                pipe, self.args, self.formats, self.classes, jobs, None, images
            ):
                errors[job.image_id] = error or ""
            return [{"error": errors.get(i["image_id"], "not segmented")} for i in items]

        return work


def _write_run_files(
    args: argparse.Namespace,
    formats: list[str],
    classes: list[str] | None,
    jobs: list[_Job],
    complete: set[str],
    failures: dict[str, str],
    coco: CocoResults | None,
) -> None:
    """Write DIR's files of the whole run: coco_results.json, index.html, failures.json.

    Args:
        complete: the image ids whose files are complete (written now or resumed).
        coco: the entries collected in memory (formats without png), else None: then the COCO
            file is built from the complete images' files, in input order.
    """
    from freesegdiff.export import COCO_RESULTS_NAME, CocoResults
    from freesegdiff.outputs import read_saved_result, write_failures

    output = Path(args.output)
    if "coco-rle" in formats:
        if coco is None:
            coco = CocoResults(classes)
            for job in jobs:
                if job.image_id not in complete:
                    continue
                try:
                    coco.add(job.image_id, read_saved_result(job.folder, job.stem))
                except (OSError, ValueError, KeyError, TypeError) as error:
                    failures[str(job.source)] = (
                        f"its files could not be read back for {COCO_RESULTS_NAME} ({error}); "
                        "segment it again without --resume"
                    )
        coco.write(output)
    if "png" in formats and not args.no_overlay:
        from freesegdiff.visualize.index_page import write_index_page

        write_index_page(output, failures=failures)
    write_failures(output, failures)
