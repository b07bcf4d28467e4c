"""Files written for one segmented image: label PNG, overlay, JSON summary, explain figure.

Everything is made from the result and the image already in memory; the image is read from
``result.source`` (once) only when the caller does not have it.

Robustness (what ``freesegdiff segment`` builds on):

- every file is written atomically (:mod:`freesegdiff.io.atomic`): a killed run leaves complete
  files under final names, never a part of one;
- ``<stem>.json`` is written last, after removing an older one first, so its presence beside the
  files it lists means the image is complete (:func:`outputs_complete`); a write that fails
  (or is interrupted) removes the image's files it already wrote;
- the same result and image give the same bytes in every file (PNGs carry no date); only the
  JSON's ``"timings"`` differ from run to run;
- :func:`assign_stems` gives every image of a run its own, deterministic file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from freesegdiff.config import NOT_IN_OUTPUTS, settings_differences
from freesegdiff.errors import ConfigError
from freesegdiff.io.atomic import save_image, temporary_name, write_text
from freesegdiff.io.export import COCO_RESULTS_NAME
from freesegdiff.io.filenames import fit_name_length, quoted
from freesegdiff.io.images import ImageInput, load_image
from freesegdiff.io.visualize.colors import palette_for
from freesegdiff.io.visualize.explain import EXPLAIN_SUFFIX, write_explain
from freesegdiff.io.visualize.overlay import render_overlay

if TYPE_CHECKING:
    from freesegdiff.io.export import CocoResults
    from freesegdiff.result import SegmentationResult

OVERLAY_SUFFIX = "_overlay.png"
FORMATS = ("png", "coco-rle")  # the choices of ``freesegdiff segment --format``
FAILURES_NAME = "failures.json"  # the run's failed inputs, in the output folder
MANIFEST_NAME = "freesegdiff-run.json"  # the settings the folder's results were made with
INDEX_NAME = "index.html"  # the page of a run's results (visualize/index_page.py)
THUMBNAIL_FOLDER = "thumbnails"  # the page's thumbnails, mirroring the images' folders
# Files of a whole run, at the top of the output folder: no image's files may take these names.
RUN_FILE_NAMES = (INDEX_NAME, COCO_RESULTS_NAME, FAILURES_NAME, MANIFEST_NAME)

__all__ = [
    "EXPLAIN_SUFFIX",
    "FAILURES_NAME",
    "FORMATS",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "OVERLAY_SUFFIX",
    "RUN_FILE_NAMES",
    "THUMBNAIL_FOLDER",
    "RunManifest",
    "assign_stems",
    "check_manifest",
    "expected_files",
    "label_png",
    "output_names",
    "outputs_complete",
    "prepare_output_folder",
    "remove_other_results",
    "write_failures",
    "write_manifest",
    "write_outputs",
]


def label_png(label_map: np.ndarray, labels: dict[int, str]) -> Image.Image:
    """The label map as a PNG image whose pixel values are the label ids.

    Returns a palette ("P") image coloured with the labels' colours when every id fits in a
    byte (always in open vocabulary); with ids above 255 (large fixed vocabularies) a 16-bit
    grayscale ("I;16") image, whose values are still exactly the ids.
    """
    if label_map.size and (label_map.min() < 0 or label_map.max() > 65535):
        raise ValueError("label ids must be in [0, 65535] to be written as a PNG")
    # No ``mode=`` for fromarray (Pillow 13 refuses "I;16" for uint16 data): the dtype decides.
    if label_map.size == 0 or label_map.max() <= 255:
        image = Image.fromarray(np.ascontiguousarray(label_map, dtype=np.uint8))  # "L"
        image.putpalette(palette_for(labels))  # "L" with a palette becomes "P"
        return image
    return Image.fromarray(np.ascontiguousarray(label_map, dtype=np.uint16))  # "I;16"


def write_outputs(
    result: SegmentationResult,
    image: ImageInput | None,
    folder: str | Path,
    *,
    stem: str | None = None,
    formats: Collection[str] = ("png",),
    overlay: bool = True,
    explain: bool = False,
    coco: CocoResults | None = None,
    explain_timings: bool = False,
    coco_id: str | None = None,
    settings_id: str | None = None,
) -> dict[str, Path]:
    """Write the files of one segmented image into ``folder`` (created if missing).

    Each file is written atomically; ``<stem>.json`` goes last (an older one is removed before
    anything else is written), so it exists only beside a complete set of the image's files. If
    writing fails or is interrupted, the files this call already wrote are removed again and the
    exception propagates.

    Args:
        result: the segmentation of one image.
        image: the segmented RGB image, ``(H, W, 3)`` uint8 as the pipeline saw it (or anything
            :func:`load_image` reads); None: read once from ``result.source`` if a picture is
            to be drawn.
        stem: file name stem; default: the source file's stem, else ``"image"``.
        formats: any of :data:`FORMATS`. ``"png"``: ``<stem>.png`` (label ids),
            ``<stem>.json`` (:meth:`SegmentationResult.to_json` and the files written) and,
            with ``overlay``, ``<stem>_overlay.png``. ``"coco-rle"``: the segments are added
            to ``coco``, which the caller writes once per run (:meth:`CocoResults.write`).
        overlay: with ``"png"``, draw the overlay; skipped when there is neither ``image``
            nor ``result.source``.
        explain: also write ``<stem>_explain.png`` (needs the ``[viz]`` extra).
        coco: the run's COCO results; required with ``"coco-rle"``.
        explain_timings: print the seconds per stage in the explain figure (then its bytes
            differ from run to run); off by default.
        coco_id: the COCO ``image_id``; default: ``stem``.
        settings_id: written into the JSON as ``"settings_id"``: the
            :meth:`RunManifest.settings_id` of the run (what ``--resume`` compares).

    Returns:
        ``{"png", "overlay", "json", "explain"}``: the paths of the files written.

    Raises:
        ValueError: an unknown format, ``"coco-rle"`` without ``coco``, ``explain`` with no
            image at all, or an image of another size than the label map.
        MissingExtraError: ``explain`` without matplotlib.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown output formats {unknown}; choose from {', '.join(FORMATS)}")
    if "coco-rle" in formats and coco is None:
        raise ValueError('the "coco-rle" format collects into a CocoResults: pass coco=')
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if stem is None:
        stem = Path(result.source).stem if result.source else "image"
    pixels = _pixels(result, image, needed=explain or ("png" in formats and overlay))
    if explain and pixels is None:
        raise ValueError("the explain figure needs the image: pass it (the result has no source)")
    names = output_names(stem)
    written: dict[str, Path] = {}
    try:
        if "png" in formats:
            (out / names["json"]).unlink(missing_ok=True)  # the image is incomplete from now on
            written["png"] = save_image(
                label_png(result.label_map, result.labels), out / names["png"]
            )
            if overlay and pixels is not None:
                written["overlay"] = save_image(
                    render_overlay(pixels, result), out / names["overlay"]
                )
        if explain:
            written["explain"] = write_explain(result, pixels, out, stem, timings=explain_timings)
        if "png" in formats:
            summary = result.to_json()
            summary["files"] = {kind: path.name for kind, path in written.items()}
            if settings_id is not None:
                summary["settings_id"] = settings_id
            written["json"] = write_text(out / names["json"], json.dumps(summary, indent=2) + "\n")
    except BaseException:
        for path in written.values():  # abandon the image cleanly: no part of a set is left
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    if "coco-rle" in formats and coco is not None:
        coco.add(coco_id if coco_id is not None else stem, result)
    return written


def _pixels(
    result: SegmentationResult, image: ImageInput | None, *, needed: bool
) -> np.ndarray | None:
    """The image as ``(H, W, 3)`` uint8: ``image`` as it is when it already is that (the pixels
    the pipeline decoded), else converted, else read from the source."""
    if not needed:
        return None
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[2:] == (3,):
        return image
    if image is not None:
        return load_image(image)
    if result.source is not None:
        return load_image(result.source)
    return None


def output_names(stem: str) -> dict[str, str]:
    """Every file name :func:`write_outputs` may give the image ``stem``, by kind.

    Returns:
        ``{"png": "<stem>.png", "overlay": "<stem>_overlay.png", "json": "<stem>.json",
        "explain": "<stem>_explain.png"}``.
    """
    return {
        "png": f"{stem}.png",
        "overlay": f"{stem}{OVERLAY_SUFFIX}",
        "json": f"{stem}.json",
        "explain": f"{stem}{EXPLAIN_SUFFIX}",
    }


def expected_files(stem: str, *, overlay: bool = True, explain: bool = False) -> dict[str, str]:
    """The ``"files"`` field a complete ``<stem>.json`` holds (format ``"png"``, with an image).

    Returns:
        ``{"png": name}`` and, as asked, ``"overlay"`` and ``"explain"``: the files listed in the
        JSON (the JSON itself is not listed).
    """
    names = output_names(stem)
    files = {"png": names["png"]}
    if overlay:
        files["overlay"] = names["overlay"]
    if explain:
        files["explain"] = names["explain"]
    return files


def outputs_complete(
    folder: str | Path,
    stem: str,
    *,
    overlay: bool = True,
    explain: bool = False,
    source: str | None = None,
    settings_id: str | None = None,
) -> bool:
    """Whether the image ``stem`` in ``folder`` was completely written with these settings.

    True when ``<stem>.json`` parses, lists exactly :func:`expected_files` (so a run with other
    ``overlay``/``explain`` settings does not count), names ``source`` as its image and carries
    ``settings_id`` (each when given), and every file it lists exists. :func:`write_outputs`
    writes the JSON last, each file atomically, so this cannot be true of a half-written image.
    """
    out = Path(folder)
    try:
        summary = json.loads((out / output_names(stem)["json"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = expected_files(stem, overlay=overlay, explain=explain)
    if not isinstance(summary, dict) or summary.get("files") != expected:
        return False
    if source is not None and summary.get("image") != source:
        return False
    if settings_id is not None and summary.get("settings_id") != settings_id:
        return False
    return all((out / name).is_file() for name in expected.values())


_DERIVED_SUFFIXES = (OVERLAY_SUFFIX[: -len(".png")], EXPLAIN_SUFFIX[: -len(".png")])


def assign_stems(files: Sequence[tuple[str, str]]) -> list[str]:
    """File name stems for a run's images that never share an output file, deterministically.

    Args:
        files: ``(output subfolder, input file name)`` per image, in the run's (sorted) order;
            the subfolder is relative to the output folder, ``""`` for its top.

    Returns:
        One stem per entry. An image's stem is its file's stem (``x.jpg`` -> ``x``), unless
        another image of the same subfolder would then share a file with it: two stems equal
        (``x.jpg`` beside ``x.png``), or one is the other plus ``_overlay`` / ``_explain``
        (``x.png`` beside ``x_overlay.jpg``: ``x_overlay.png`` would be both ``x``'s overlay and
        the other's label map), or a stem whose files take a run file's name at the top
        (:data:`RUN_FILE_NAMES`: ``failures.png``, ``coco_results.jpg``). Then every image of
        that clash keeps its extension in its stem (``x.jpg`` -> ``x.jpg``: ``x.jpg.png``,
        ``x.jpg_overlay.png``, ``x.jpg.json``). Names are compared case-insensitively (as macOS
        and Windows file systems do). A clash left after that (the same file name from two
        input folders) is resolved in order by ``-2``, ``-3``, ... after the later stem. A stem
        whose longest file name would pass the file system's 255 bytes is cut and tagged with
        a hash (:func:`~freesegdiff.io.filenames.fit_name_length`).
    """
    by_folder: dict[str, list[int]] = {}
    for index, (folder, _) in enumerate(files):
        by_folder.setdefault(folder, []).append(index)
    stems = [""] * len(files)
    for folder, indices in by_folder.items():
        reserved = {name.casefold() for name in RUN_FILE_NAMES} if folder in ("", ".") else set()
        natural = [PurePath(files[index][1]).stem for index in indices]
        counts = Counter(stem.casefold() for stem in natural)
        used = set(reserved)
        for index, stem in zip(indices, natural, strict=True):
            base = files[index][1] if _clashes(stem, counts, reserved) else stem
            candidate, number = _fit(base), 2
            while _file_keys(candidate) & used:
                candidate, number = _fit(f"{base}-{number}"), number + 1
            used |= _file_keys(candidate)
            stems[index] = candidate
    return stems


def _clashes(stem: str, counts: Counter[str], reserved: set[str]) -> bool:
    """Whether ``stem`` shares a file name with another stem of ``counts`` or a reserved name."""
    key = stem.casefold()
    if counts[key] > 1 or _file_keys(stem) & reserved:
        return True
    for suffix in _DERIVED_SUFFIXES:
        if key + suffix in counts or (key.endswith(suffix) and key[: -len(suffix)] in counts):
            return True
    return False


_LONGEST_SUFFIX = max(len(name.encode()) for name in output_names("").values())


def _fit(stem: str) -> str:
    """``stem``, shortened if its longest output name would not fit in a folder."""
    return fit_name_length(stem, _LONGEST_SUFFIX)


def _file_keys(stem: str) -> set[str]:
    return {name.casefold() for name in output_names(stem).values()}


def prepare_output_folder(folder: str | Path) -> Path:
    """Create the output folder if missing and check that files can be written in it.

    A probe file (a hidden ``.tmp`` name, see :mod:`freesegdiff.io.atomic`) is written and removed.

    Raises:
        ConfigError: the path is a file, cannot be created, or is not writable; the message
            says which and what to do.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"the output folder {str(path)!r} is a file; give --output a folder (it is created "
            "if missing), or move the file away"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the output folder {str(path)!r}: {error.strerror or error}; give "
            "--output a folder you can write to"
        ) from error
    probe = path / temporary_name("write-test")
    try:
        with open(probe, "xb") as handle:
            handle.write(b"freesegdiff write test\n")
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise ConfigError(
            f"cannot write in the output folder {str(path)!r}: {error.strerror or error}; give "
            "--output a folder you can write to, or fix its permissions"
        ) from error
    return path


def write_failures(folder: str | Path, failures: Mapping[str, str]) -> Path | None:
    """Write ``<folder>/failures.json`` for the inputs that failed, or remove a stale one.

    Args:
        folder: the output folder.
        failures: ``{input path: reason}``.

    Returns:
        The path written: ``{"failed": {input: reason, ...}, "count": N}`` (sorted by input,
        written atomically); None when nothing failed (an older file is removed then).
    """
    path = Path(folder) / FAILURES_NAME
    if not failures:
        path.unlink(missing_ok=True)
        return None
    failed = {str(name): str(reason) for name, reason in sorted(failures.items())}
    return write_text(path, json.dumps({"failed": failed, "count": len(failed)}, indent=2) + "\n")


@dataclass(frozen=True)
class RunManifest:
    """What produced the results of an output folder: ``<DIR>/freesegdiff-run.json``.

    ``settings``: every pipeline setting (:meth:`PipelineConfig.to_dict`); ``classes``: the
    fixed vocabulary, or None (open vocabulary); ``preset``: the preset the settings started
    from (for the reader: the settings themselves are compared). Two runs whose settings differ
    only in :data:`~freesegdiff.config.NOT_IN_OUTPUTS` (device, batch sizes, cache folder,
    offline) have the same :meth:`settings_id`.
    """

    settings: dict[str, Any]
    classes: list[str] | None
    preset: str | None = None

    def compared(self) -> dict[str, Any]:
        """What must be equal for two runs' results to be interchangeable."""
        return {"settings": self.settings, "classes": self.classes}

    def settings_id(self) -> str:
        """16 hex digits of the SHA-256 of :meth:`compared` (speed-only settings left out)."""
        kept = _without(self.compared(), NOT_IN_OUTPUTS)
        text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """The manifest file's content."""
        from freesegdiff import __version__

        return {
            "settings_id": self.settings_id(),
            "preset": self.preset,
            "classes": self.classes,
            "models": self.settings.get("models"),
            "settings": self.settings,
            "freesegdiff": __version__,
        }


def _without(value: Any, keys: tuple[str, ...]) -> Any:
    """``value`` (JSON) with the dictionary keys ``keys`` removed at every depth."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def check_manifest(folder: str | Path, manifest: RunManifest, *, overwrite: bool) -> bool:
    """Whether ``folder`` holds results of other settings than ``manifest``'s.

    Returns False when the folder has no manifest or the same settings, True when the settings
    differ and ``overwrite`` allows replacing them.

    Raises:
        ConfigError: the settings differ (or the manifest cannot be read) and not
            ``overwrite``; the message lists the differences and the ways out.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        old = RunManifest(stored["settings"], stored["classes"], stored.get("preset"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        differences = [f"{MANIFEST_NAME} cannot be read ({error})"]
    else:
        if old.settings_id() == manifest.settings_id():
            return False
        differences = settings_differences(old.compared(), manifest.compared())
    if overwrite:
        return True
    shown = "; ".join(differences[:6]) + (
        f"; and {len(differences) - 6} more" if len(differences) > 6 else ""
    )
    raise ConfigError(
        f"the results in {quoted(folder)} were made with other settings ({shown}). To replace "
        "them, run again with --overwrite (their files are deleted); to keep them, choose "
        "another --output"
    )


def write_manifest(folder: str | Path, manifest: RunManifest) -> Path:
    """Write ``<folder>/freesegdiff-run.json`` (atomically)."""
    text = json.dumps(manifest.to_json(), indent=2) + "\n"
    return write_text(Path(folder) / MANIFEST_NAME, text)


def remove_other_results(folder: str | Path, settings_id: str) -> list[Path]:
    """Delete the image results under ``folder`` whose JSON does not carry ``settings_id``.

    Only files freesegdiff writes are touched: an image's ``<stem>.json`` (one that lists its
    ``files`` and ``labels``), the files it lists under their own names
    (:func:`output_names`) and its thumbnail. Returns the paths deleted.
    """
    root = Path(folder)
    removed: list[Path] = []
    for summary_path in sorted(root.rglob("*.json")):
        if THUMBNAIL_FOLDER in summary_path.relative_to(root).parts[:1]:
            continue
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        files = summary.get("files") if isinstance(summary, dict) else None
        if not isinstance(files, dict) or "labels" not in summary:
            continue  # not an image's summary
        if summary.get("settings_id") == settings_id:
            continue
        stem = summary_path.name[: -len(".json")]
        names = set(output_names(stem).values())
        relative = summary_path.parent.relative_to(root) / stem
        thumbnail = root / THUMBNAIL_FOLDER / f"{relative.as_posix()}.jpg"
        targets = [summary_path.parent / name for name in files.values() if name in names]
        for path in [summary_path, *targets, thumbnail]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
