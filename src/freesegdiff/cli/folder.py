"""A folder run of ``freesegdiff segment``: what each input's files are called, how an image's
files are written as its result comes, and the run's own files.

Shared by the local run (:mod:`freesegdiff.cli.segment`) and the Ray actors
(:class:`freesegdiff.distributed.SegmentWorker`), so that both write the same bytes under the
same names:

- :func:`plan_jobs`: every image of the inputs, in order, with its output folder and stem;
- :func:`segment_and_write`: results to files, one image at a time, each image's files
  complete before Ctrl-C or SIGTERM is let through;
- :func:`write_run_files`: ``coco_results.json``, ``index.html`` and ``failures.json``, none of
  which can turn a run that segmented its images into a crash.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from freesegdiff.errors import FreeSegDiffError
from freesegdiff.infra.interrupts import DeferredInterrupt
from freesegdiff.io.atomic import describe_write_error
from freesegdiff.io.filenames import display_name
from freesegdiff.io.images import SkippedEntries, iter_image_files
from freesegdiff.io.outputs import FAILURES_NAME

# COCO result entries of images segmented here, by image id (io/export.coco_entries)
CocoEntries = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class Job:
    """One image of the run and where its files go."""

    source: Path  # the input file, as found (its str() is the pipeline's name for it)
    folder: Path  # the output folder it is written to: DIR or a subfolder mirroring the input
    stem: str  # file name stem, unique in ``folder`` (outputs.assign_stems)
    image_id: str  # the stem relative to DIR ("more/x"): the COCO image_id


@dataclass(frozen=True)
class WriteSettings:
    """What is written for each image: ``formats`` (``png``, ``coco-rle``), the fixed
    vocabulary (None: open), the overlay, the explain figure (with its timings or not) and the
    run's ``settings_id`` (io/outputs.RunManifest), written into each JSON."""

    formats: tuple[str, ...]
    classes: list[str] | None
    overlay: bool = True
    explain: bool = False
    explain_timings: bool = False
    settings_id: str | None = None


def plan_jobs(
    inputs: list[str], output: Path, failures: dict[str, str], skipped: SkippedEntries
) -> list[Job]:
    """Every image of the inputs, in order, each with its output folder and stem.

    Inputs that are no file or folder (missing, a broken link, a FIFO or device) and folders
    that cannot be read go to ``failures``; folder entries that are no image file to
    ``skipped``; DIR (when inside an input) is not searched; a file found twice (named twice,
    or in a folder and by name) is taken once.
    """
    from freesegdiff.io.outputs import assign_stems

    found: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for entry in inputs:
        root = Path(entry)
        is_folder = root.is_dir()
        for path in iter_image_files([entry], exclude=[output], errors=failures, skipped=skipped):
            key = os.path.normcase(os.path.abspath(path))
            if key in seen:
                continue
            seen.add(key)
            relative = path.parent.relative_to(root).as_posix() if is_folder else ""
            found.append((path, "" if relative == "." else relative))
    stems = assign_stems([(relative, path.name) for path, relative in found])
    return [
        Job(
            source=path,
            folder=output / relative if relative else output,
            stem=stem,
            image_id=f"{relative}/{stem}" if relative else stem,
        )
        for (path, relative), stem in zip(found, stems, strict=True)
    ]


def segment_and_write(
    pipe: Any,
    settings: WriteSettings,
    jobs: list[Job],
    coco: CocoEntries | None = None,
    images: list[Any] | None = None,
) -> Iterator[tuple[Job, str | None]]:
    """Segment ``jobs`` and write each one's files; yield ``(job, None)`` when its files are
    complete, ``(job, reason)`` when it failed (unreadable, a pipeline error, a failed write,
    a full disk). Ctrl-C or SIGTERM during a write waits until that image's files are complete.

    Args:
        pipe: the pipeline (:meth:`FreeSegDiff.iter_segment_with_images`).
        coco: where each image's COCO entries are kept (None: not kept here).
        images: what the pipeline reads for each job (default its file; a Ray actor gives
            the file's bytes, read by a CPU task, as an
            :class:`~freesegdiff.io.images.EncodedImage`).
    """
    from freesegdiff.io.export import coco_entries
    from freesegdiff.io.outputs import write_outputs

    by_name = {str(job.source): job for job in jobs}
    image_formats = [kind for kind in settings.formats if kind != "coco-rle"]  # (in ``coco``)
    for name, outcome, image in pipe.iter_segment_with_images(
        images if images is not None else [job.source for job in jobs], classes=settings.classes
    ):
        job = by_name[name]
        if isinstance(outcome, FreeSegDiffError):
            yield job, str(outcome)
            continue
        error = None
        interrupted: KeyboardInterrupt | None = None
        try:
            with DeferredInterrupt():  # Ctrl-C now: this image is finished first
                try:
                    write_outputs(  # the pixels the pipeline read: decoded once per run
                        outcome,
                        image,
                        job.folder,
                        stem=job.stem,
                        formats=image_formats,
                        overlay=settings.overlay,
                        explain=settings.explain,
                        explain_timings=settings.explain_timings,
                        settings_id=settings.settings_id,
                    )
                    if coco is not None:
                        coco[job.image_id] = coco_entries(job.image_id, outcome)
                except (OSError, ValueError) as failure:
                    error = f"writing its files failed: {describe_write_error(failure)}"
        except KeyboardInterrupt as stop:  # after the write: this image's files are complete
            interrupted = stop
        yield job, error
        if interrupted is not None:
            raise interrupted


def write_run_files(
    output: Path,
    settings: WriteSettings,
    jobs: list[Job],
    complete: set[str],
    failures: dict[str, str],
    coco: CocoEntries,
) -> None:
    """Write DIR's files of the whole run: coco_results.json, index.html, failures.json.

    None of them can end a run that segmented its images: a file that cannot be written (a
    full disk) is a failure of its own, under its name in ``failures`` and failures.json, and
    a failures.json that cannot be written is said in one line.

    Args:
        complete: the image ids whose files are complete (written now or resumed).
        coco: the COCO entries of the images segmented by this process, by image id; those of
            the other complete images (resumed, or written by Ray actors) are read back from
            their files. The file lists them in input order.
    """
    from freesegdiff.io.export import COCO_RESULTS_NAME, CocoResults
    from freesegdiff.io.outputs import write_failures
    from freesegdiff.io.saved import read_saved_result
    from freesegdiff.io.visualize.index_page import INDEX_NAME, write_index_page

    def attempt(name: str, write: Callable[[], object]) -> None:
        try:
            write()
        except (OSError, ValueError) as error:
            reason = f"writing it failed: {describe_write_error(error)}"
            failures[str(output / name)] = reason
            print(f"freesegdiff segment: {display_name(output / name)}: {reason}", file=sys.stderr)

    if "coco-rle" in settings.formats:
        results = CocoResults(settings.classes)
        for job in jobs:
            if job.image_id in coco:
                results.extend(coco[job.image_id])
            elif job.image_id in complete:
                try:
                    results.add(job.image_id, read_saved_result(job.folder, job.stem))
                except (OSError, ValueError, KeyError, TypeError) as error:
                    failures[str(job.source)] = (
                        f"its files could not be read back for {COCO_RESULTS_NAME} ({error}); "
                        "segment it again without --resume"
                    )
        attempt(COCO_RESULTS_NAME, partial(results.write, output))
    if "png" in settings.formats and settings.overlay:
        # (a failure of its own is listed in the page too: failures.json comes after it)
        attempt(INDEX_NAME, partial(write_index_page, output, failures=dict(failures)))
    try:
        write_failures(output, failures)
    except (OSError, ValueError) as error:
        print(
            f"freesegdiff segment: {FAILURES_NAME} could not be written "
            f"({describe_write_error(error)}); the failures are listed above",
            file=sys.stderr,
        )
