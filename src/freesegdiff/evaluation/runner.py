"""The evaluation loop: predictions cached on disk, scores, ``results.json``, ``results.md``.

Output folder::

    OUTPUT/
      predictions/<image id>.png   palette PNG of dataset class ids at the ground truth's size
      predictions/settings.json    what the cached predictions were made with
      predictions/seconds.tsv      model seconds per predicted image (image id, seconds)
      results.json                 scores and settings (see :func:`evaluate`)
      results.md                   the same as a per-class table
      confusion.png                row-normalised confusion matrix

A prediction is written as soon as it is made, so an interrupted run resumes where it stopped
and a finished one is re-scored (another ``--protocol`` too) without loading any model. Cached
predictions made with other settings are refused rather than mixed in. An image whose
prediction fails (unreadable image, a decompression bomb, a pipeline error, a prediction of the
wrong size) is scored as if nothing was predicted (every pixel unlabelled), listed under
``failed`` in ``results.json``, and not cached, so the next run tries it again. An image whose
ground truth is unusable (unreadable, or not the size of its image: both files and sizes are
named) cannot be scored: it is listed under ``failed`` and ``unscored`` and left out of the
scores. A cached prediction that cannot be scored (unreadable, wrong size, wrong values) is
predicted again. Either way the run goes on.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from freesegdiff.config import settings_differences
from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.datasets import DatasetError, Sample, SegmentationDataset
from freesegdiff.evaluation.grounding import NO_CLASS
from freesegdiff.evaluation.metrics import Evaluator, Scores, ScoringProtocol
from freesegdiff.io import atomic
from freesegdiff.io.filenames import display_name
from freesegdiff.io.images import EncodedImage

logger = logging.getLogger(__name__)

# One prediction: the sample, its class-id map or the error that prevented it, model seconds.
Prediction = tuple[Sample, "np.ndarray | Exception", "float | None"]
# Samples in -> predictions out, in the same order (may prefetch ahead).
Predictor = Callable[[Iterable[Sample]], Iterator[Prediction]]

PREDICTIONS = "predictions"
SETTINGS_FILE = "settings.json"
SECONDS_FILE = "seconds.tsv"


def prediction_palette() -> list[int]:
    """The VOC palette (768 ints), so VOC predictions look like VOC ground truth."""
    from freesegdiff.io.visualize.colors import voc_color

    return [channel for index in range(256) for channel in voc_color(index)]


class PredictionCache:
    """``OUTPUT/predictions``: one palette PNG per image, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._palette = prediction_palette()

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.png"

    def load(
        self, image_id: str, shape: tuple[int, ...], num_classes: int | None = None
    ) -> np.ndarray | None:
        """The cached ``(H, W)`` uint8 map; None (logged: it is predicted again) if missing,
        unreadable, not of the ground truth's ``shape`` or, given ``num_classes``, holding a
        value that is neither a class id nor 255."""
        path = self.path(image_id)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as image:
                prediction = np.asarray(image)
        except Exception as error:  # a decompression bomb too: never the run's end
            logger.warning("unreadable cached prediction %s (%s): predicting it again", path, error)
            return None
        problem = prediction_problem(prediction, shape, num_classes)
        if problem is not None:
            logger.warning("cached prediction %s: %s; predicting it again", path, problem)
            return None
        return prediction

    def save(self, image_id: str, prediction: np.ndarray) -> None:
        path = self.path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.asarray(prediction, dtype=np.uint8))  # mode L
        image.putpalette(self._palette)  # L -> P, the pixel values kept
        atomic.save_image(image, path)  # a reader never sees half a file

    def record_seconds(self, image_id: str, seconds: float) -> None:
        # (surrogateescape: an image id of undecodable bytes is written as those bytes)
        with open(self.folder / SECONDS_FILE, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(f"{image_id}\t{seconds:.6f}\n")

    def seconds(self) -> dict[str, float]:
        """Model seconds of every image predicted so far (last record wins)."""
        path = self.folder / SECONDS_FILE
        found: dict[str, float] = {}
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            for line in text.splitlines():
                image_id, _, value = line.partition("\t")
                try:
                    found[image_id] = float(value)
                except ValueError:
                    continue  # a line cut by an interruption
        return found

    def check_settings(self, settings: dict[str, Any], overwrite: bool) -> None:
        """Refuse predictions made with other settings; with ``overwrite``, delete them."""
        path = self.folder / SETTINGS_FILE
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        if path.is_file():
            stored = json.loads(path.read_text())
            differences = settings_differences(stored, settings)
            if differences:
                raise ConfigError(
                    f"the predictions in {str(self.folder)!r} were made with other settings ("
                    + "; ".join(differences[:6])
                    + "). Pass --overwrite to discard them, or choose another --output."
                )
            return
        if any(self.folder.glob("*.png")):
            raise ConfigError(
                f"{str(self.folder)!r} holds predictions of unknown settings (no "
                f"{SETTINGS_FILE}); pass --overwrite to discard them, or choose another --output"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def prediction_problem(
    prediction: Any, shape: tuple[int, ...], num_classes: int | None = None
) -> str | None:
    """Why ``prediction`` cannot be scored against a ground truth of ``shape``, or None.

    Args:
        prediction: a class-id map.
        shape: ``(H, W)`` of the ground truth.
        num_classes: when given, every value must be below it or be 255 (no class).
    """
    prediction = np.asarray(prediction)
    if prediction.shape != tuple(shape):
        return f"the prediction is {_size(prediction.shape)}, the ground truth {_size(shape)}"
    if not np.issubdtype(prediction.dtype, np.integer):
        return f"the prediction holds {prediction.dtype} values, not class ids"
    if num_classes is not None:
        bad = np.unique(prediction[(prediction >= num_classes) & (prediction != NO_CLASS)])
        if bad.size or (prediction < 0).any():
            return f"the prediction holds values outside 0..{num_classes - 1} and {NO_CLASS}"
    return None


def _size(shape: tuple[int, ...]) -> str:
    """``(H, W[, C])`` -> ``"WxH"`` (``"WxHxC"``), as image sizes are written."""
    if len(shape) < 2:
        return str(tuple(shape))
    return "x".join(str(n) for n in (shape[1], shape[0], *shape[2:]))


@dataclass
class EvaluationReport:
    """What :func:`evaluate` found; ``to_json`` is ``results.json``."""

    dataset: str
    protocol: ScoringProtocol
    settings: dict[str, Any]
    class_names: list[str]
    scores: Scores
    confusion: np.ndarray
    images: int
    predicted: int  # made by this run
    cached: int  # read from the cache
    seconds_per_image: float | None
    failed: dict[str, str] = field(default_factory=dict)  # image id -> error
    # the failed images left out of the scores: their ground truth is unusable (the others
    # failed to predict and are scored as unpredicted)
    unscored: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        scores = self.scores
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "settings": self.settings,
            "images": self.images,
            "miou": _round(scores.miou),
            "per_class_iou": {
                name: _round(value)
                for name, value in zip(self.class_names, scores.per_class_iou, strict=True)
            },
            "pixel_accuracy": _round(scores.pixel_accuracy),
            "mean_accuracy": _round(scores.mean_accuracy),
            "per_class_accuracy": {
                name: _round(value)
                for name, value in zip(self.class_names, scores.per_class_accuracy, strict=True)
            },
            "seconds_per_image": _round(self.seconds_per_image),
            "predicted_now": self.predicted,
            "from_cache": self.cached,
            "failed": self.failed,
            "unscored": self.unscored,
            **self.extra,
        }


def _round(value: float | None) -> float | None:
    if value is None or np.isnan(value):
        return None
    return round(float(value), 6)


def evaluate(
    dataset: SegmentationDataset,
    output: str | Path,
    make_predictor: Callable[[], Predictor] | None,
    protocol: ScoringProtocol = "standard",
    limit: int | None = None,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    also: tuple[ScoringProtocol, ...] = (),
) -> EvaluationReport:
    """Score ``dataset`` (its first ``limit`` images), predicting what is not cached yet.

    Args:
        dataset: the benchmark split.
        output: the output folder (see the module docstring).
        make_predictor: builds the predictor that makes class-id maps for samples; called
            only if some image has no cached prediction, so re-scoring loads no model. None:
            score cached predictions only; a missing one is an error.
        protocol: ``"standard"`` or ``"paper"``.
        limit: evaluate the first ``limit`` images only.
        settings: everything the predictions depend on (stored with the cache, compared on
            resume, written to ``results.json``).
        overwrite: discard cached predictions first.
        progress: show a progress bar with the running mIoU.
        also: other protocols scored in the same pass, reported under ``other_protocols``
            in ``results.json`` (mIoU, pixel and mean accuracy of each).

    Returns:
        The report; ``results.json``, ``results.md`` and ``confusion.png`` are written.
    """
    output = Path(output)
    settings = json.loads(json.dumps(settings or {}))  # as stored: tuples become lists
    atomic.remove_stale_temporaries(output)  # the unfinished writes of a killed run
    cache = PredictionCache(output / PREDICTIONS)
    cache.check_settings({"dataset": dataset.name, **settings}, overwrite)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    evaluator = Evaluator(len(dataset.classes), protocol, dataset.background_id)
    others = {p: Evaluator(len(dataset.classes), p, dataset.background_id) for p in also}

    def score(gt: np.ndarray, prediction: np.ndarray) -> None:
        evaluator.update(gt, prediction)
        for other in others.values():
            other.update(gt, prediction)

    bar = _progress_bar(total, dataset.name, enabled=progress)
    num_classes = len(dataset.classes)
    missing: set[str] = set()
    evaluated: list[str] = []
    failed: dict[str, str] = {}
    unscored: list[str] = []
    cached = 0

    def unusable(sample: Sample) -> bool:
        """Report a sample whose ground truth is unusable; it is left out of the scores."""
        if sample.error is None:
            return False
        if sample.image_id not in failed:
            failed[sample.image_id] = str(sample.error)
            unscored.append(sample.image_id)
            logger.warning("image %s not scored: %s", sample.image_id, sample.error)
        return True

    for sample in islice(dataset, total):  # pass 1: what the cache already holds
        evaluated.append(sample.image_id)
        if unusable(sample):
            _advance(bar, evaluator)
            continue
        prediction = cache.load(sample.image_id, sample.label_map.shape, num_classes)
        if prediction is None:
            missing.add(sample.image_id)
            continue
        score(sample.label_map, prediction)
        cached += 1
        _advance(bar, evaluator)
    predicted = 0
    if missing:  # pass 2: predict the rest, caching each as it comes
        if make_predictor is None:
            raise DatasetError(
                f"{len(missing)} images have no cached prediction in {str(cache.folder)!r} and "
                "no predictor was given"
            )
        predict = make_predictor()
        # (a file changed since pass 1 may have become unusable: reported, not predicted)
        pending = (s for s in islice(dataset, total) if s.image_id in missing and not unusable(s))
        for sample, outcome, seconds in predict(pending):
            if not isinstance(outcome, Exception):
                problem = prediction_problem(outcome, sample.label_map.shape, num_classes)
                if problem is not None:
                    outcome = DatasetError(f"cannot score image {sample.image_id}: {problem}")
            if isinstance(outcome, Exception):
                failed[sample.image_id] = str(outcome)
                logger.warning("image %s failed: %s", sample.image_id, outcome)
                outcome = _nothing_predicted(sample, dataset.background_id)
            else:
                cache.save(sample.image_id, outcome)
                if seconds is not None:
                    cache.record_seconds(sample.image_id, seconds)
                predicted += 1
            score(sample.label_map, outcome)
            _advance(bar, evaluator)
    if bar is not None:
        bar.close()
    timings = cache.seconds()
    model_seconds = [timings[i] for i in evaluated if i in timings]
    report = EvaluationReport(
        dataset=dataset.name,
        protocol=protocol,
        settings=settings,
        class_names=dataset.class_names,
        scores=evaluator.scores(),
        confusion=evaluator.confusion,
        images=evaluator.images,
        predicted=predicted,
        cached=cached,
        seconds_per_image=float(np.mean(model_seconds)) if model_seconds else None,
        failed=failed,
        unscored=unscored,
        extra={"dataset_source": dataset.source},
    )
    if others:
        report.extra["other_protocols"] = {
            name: _summary(other.scores()) for name, other in others.items()
        }
    write_report(report, output)
    return report


def _summary(scores: Scores) -> dict[str, float | None]:
    return {
        "miou": _round(scores.miou),
        "pixel_accuracy": _round(scores.pixel_accuracy),
        "mean_accuracy": _round(scores.mean_accuracy),
    }


def _nothing_predicted(sample: Sample, background_id: int | None) -> np.ndarray:
    fill = NO_CLASS if background_id is None else background_id
    return np.full(sample.label_map.shape, fill, dtype=np.uint8)


def _progress_bar(total: int, name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"eval {name}", unit="img", dynamic_ncols=True)


def _advance(bar: Any, evaluator: Evaluator) -> None:
    if bar is None:
        return
    miou = evaluator.scores().miou
    bar.set_postfix_str(f"mIoU {miou:.2f}" if miou is not None else "mIoU -")
    bar.update(1)


# ------------------------------------------------------------------------------ reports


def write_report(report: EvaluationReport, output: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``confusion.png`` into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output / "results.json",
        "markdown": output / "results.md",
        "confusion": output / "confusion.png",
    }
    atomic.write_text(paths["json"], json.dumps(report.to_json(), indent=2) + "\n")
    atomic.write_text(paths["markdown"], render_markdown(report))
    atomic.save_image(render_confusion(report.confusion, report.class_names), paths["confusion"])
    return paths


def _percent(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.2f}"


PROTOCOL_NOTES = {
    "standard": "one confusion matrix over the whole split, void (255) ignored",
    "paper": (
        "the published script's per-image score: void becomes background, IoU averaged over "
        "the classes in each image's ground truth, then over images; not comparable with "
        "the standard protocol"
    ),
}


def render_markdown(report: EvaluationReport) -> str:
    """``results.md``: summary and one row per class."""
    scores = report.scores
    settings = report.settings
    lines = [
        f"# {report.dataset}: mIoU {_percent(scores.miou)}",
        "",
        f"Protocol `{report.protocol}`: {PROTOCOL_NOTES[report.protocol]}.",
        "",
        "| images | mIoU | pixel accuracy | mean accuracy | seconds / image | preset |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {report.images} | {_percent(scores.miou)} | {_percent(scores.pixel_accuracy)} | "
        f"{_percent(scores.mean_accuracy)} | "
        f"{'-' if report.seconds_per_image is None else f'{report.seconds_per_image:.3f}'} | "
        f"{settings.get('preset', '-')} |",
        "",
        "| id | class | IoU | accuracy | ground-truth pixels |",
        "|---:|---|---:|---:|---:|",
    ]
    for index, name in enumerate(report.class_names):
        lines.append(
            f"| {index} | {name} | {_percent(scores.per_class_iou[index])} | "
            f"{_percent(scores.per_class_accuracy[index])} | {int(scores.gt_pixels[index])} |"
        )
    unscored = set(report.unscored)
    unpredicted = {i: e for i, e in report.failed.items() if i not in unscored}
    if unpredicted:
        lines += ["", f"{len(unpredicted)} images failed and were scored as unpredicted:", ""]
        lines += [f"- `{image_id}`: {error}" for image_id, error in unpredicted.items()]
    if unscored:
        lines += ["", f"{len(unscored)} images have an unusable ground truth (not scored):", ""]
        lines += [f"- `{image_id}`: {report.failed[image_id]}" for image_id in report.unscored]
    lines = [display_name(line) for line in lines]  # image ids of undecodable bytes: \xNN
    lines += ["", "IoU and accuracy in percent; `-`: the class never occurs (no IoU).", ""]
    return "\n".join(lines)


def render_confusion(confusion: np.ndarray, class_names: list[str]) -> Image.Image:
    """The confusion matrix as a picture: rows ground truth, each row divided by its total.

    The last column is "no class" (pixels left unlabelled). White is none, light to dark blue
    a small to a whole share of the row (square-root scale); class names label the rows and
    columns when the cells are large enough to read them.
    """
    from PIL import ImageDraw, ImageFont

    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    num_rows, num_cols = share.shape
    cell = int(np.clip(720 // max(num_cols, 1), 3, 28))
    labelled = cell >= 10
    font = ImageFont.load_default()
    names = [*class_names, "no class"]
    margin = (max(len(n) for n in names) * 6 + 8) if labelled else 8
    width, height = margin + num_cols * cell + 8, margin + num_rows * cell + 24
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    # square root so that small shares stay visible: light blue (tiny) .. dark blue (all)
    shade = np.rint(230 - 200 * np.sqrt(share)).astype(int)
    draw.rectangle(
        [margin - 1, margin - 1, margin + num_cols * cell, margin + num_rows * cell],
        outline=(200, 200, 200),
    )
    for r in range(num_rows):
        for c in range(num_cols):
            if share[r, c] <= 0:
                continue  # white
            level = int(shade[r, c])
            x, y = margin + c * cell, margin + r * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(level, level, level + 25))
        if labelled:
            draw.text((4, margin + r * cell + (cell - 10) // 2), names[r], fill="black", font=font)
    if labelled:
        for c, name in enumerate(names[:num_cols]):
            text = Image.new("RGB", (margin - 4, cell), "white")
            ImageDraw.Draw(text).text((2, (cell - 10) // 2), name, fill="black", font=font)
            rotated = text.rotate(90, expand=True)
            picture.paste(rotated, (margin + c * cell, 2))
    draw.text(
        (margin, margin + num_rows * cell + 6),
        "rows: ground truth, columns: prediction",
        fill="black",
        font=font,
    )
    return picture


# ------------------------------------------------------------------------------ predictors


def evaluation_settings(
    preset: str,
    dataset: SegmentationDataset,
    vocabulary: Any,
    config: Any,
    vocabulary_mode: str = "closed",
    text_encoder: str | None = None,
    match_max_distance: float | None = None,
) -> dict[str, Any]:
    """Everything an evaluation's predictions depend on, as stored with its cache.

    Args:
        preset: the preset the settings started from (for the reader).
        dataset: the split; ``vocabulary``: its label texts
            (:func:`~freesegdiff.evaluation.classnames.label_texts`).
        config: the :class:`~freesegdiff.config.PipelineConfig`.
        vocabulary_mode: ``"closed"`` or ``"open"``; the last two only matter for ``"open"``.
    """
    open_vocabulary = vocabulary_mode == "open"
    return {
        "preset": preset,
        "vocabulary": vocabulary_mode,
        "text_encoder": text_encoder if open_vocabulary else None,
        "match_max_distance": match_max_distance if open_vocabulary else None,
        "unlabelled_pixels": "background" if dataset.background_id is not None else "no class",
        "class_names": {entry.name: ", ".join(entry.synonyms) for entry in dataset.classes},
        "label_texts": list(vocabulary.texts),
        "pipeline": config.to_dict(),
    }


def dataset_predictor(
    pipe: Any,
    dataset: SegmentationDataset,
    vocabulary: Any,
    *,
    matcher: Any = None,
    credit: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> Predictor:
    """The predictor of ``pipe`` on ``dataset``: the one assembly ``eval`` and ``ablate`` use.

    Args:
        pipe: the pipeline.
        dataset: the split (its background id, or none: unlabelled pixels are "no class").
        vocabulary: its label texts (:func:`~freesegdiff.evaluation.classnames.label_texts`).
        matcher: open vocabulary: the caption's entities are matched to classes by it
            (:class:`~freesegdiff.evaluation.grounding.EntityMatcher`); None: closed vocabulary,
            the label texts are passed to the pipeline.
        credit: see :func:`pipeline_predictor`.
    """
    from freesegdiff.evaluation.grounding import Grounder

    unlabelled = NO_CLASS if dataset.background_id is None else dataset.background_id
    grounder = Grounder(vocabulary, unlabelled, matcher)
    texts = None if matcher is not None else list(vocabulary.texts)
    return pipeline_predictor(pipe, grounder, texts, credit=credit)


def pipeline_predictor(
    pipe: Any,
    grounder: Any,
    classes: list[str] | None,
    credit: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> Predictor:
    """Predict with a :class:`~freesegdiff.pipeline.FreeSegDiff` and ground to class ids.

    Images go through ``pipe.iter_segment`` (batched, read ahead, a failing image loses only
    itself; a sample's ``encoded`` bytes, when read already, are decoded instead of its file);
    each result becomes a class-id map at the ground truth's size. Model seconds are
    the sum of the result's stage timings, plus ``credit(image)`` when given: the seconds of
    stage outputs that were reused rather than computed (an ablation grid's shared work,
    :meth:`freesegdiff.evaluation.stage_cache.StageStore.credit`). A result of another size than
    the ground truth (an image whose EXIF orientation turns it) is an error for that image,
    never resized.
    """
    from collections import deque

    def predict(samples: Iterable[Sample]) -> Iterator[Prediction]:
        queued: deque[Sample] = deque()

        def paths() -> Iterator[str | EncodedImage]:
            for sample in samples:
                queued.append(sample)
                yield sample.encoded or str(sample.image_path)

        started = time.perf_counter()
        if credit is None:
            outcomes = (
                (name, outcome, None) for name, outcome in pipe.iter_segment(paths(), classes)
            )
        else:
            outcomes = pipe.iter_segment_with_images(paths(), classes)
        for _, outcome, image in outcomes:
            sample = queued.popleft()
            now = time.perf_counter()
            if isinstance(outcome, Exception):
                yield sample, outcome, None
            elif np.shape(outcome.label_map) != sample.label_map.shape:
                # the image as read (EXIF orientation applied) is not its ground truth's size
                problem = prediction_problem(outcome.label_map, sample.label_map.shape)
                yield sample, DatasetError(f"image {sample.image_id}: {problem}"), None
            else:
                seconds = sum(outcome.timings.values()) if outcome.timings else now - started
                if credit is not None and image is not None:
                    seconds += sum(credit(image).values())
                yield sample, grounder(outcome, size=sample.label_map.shape), seconds
            started = now

    return predict
