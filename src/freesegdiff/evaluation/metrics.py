"""Segmentation scores in pure numpy: the standard dataset-level protocol and the paper's one.

Two protocols, whose numbers must never be compared with each other (docs/method.md, "Evaluation"):

``standard`` (MMSegmentation, SCLIP, NACLIP, ...): one confusion matrix summed over the whole
split, ground-truth pixels labelled ``ignore_index`` (255) skipped. IoU of class c is
``TP / (TP + FP + FN)``; a class absent from both ground truth and prediction has no IoU (NaN,
``null`` in JSON) and is left out of the mean, while a class predicted but absent from the
ground truth scores 0. Pixel accuracy is ``sum(TP) / valid pixels``; mean accuracy averages
``TP / ground-truth pixels`` over the classes that occur in the ground truth.

``paper`` (the published FreeSeg-Diff script): per image, void pixels (255) become background
(datasets without a background class keep skipping them), a confusion matrix is built, and IoU
is averaged over the classes present in that image's ground truth. Every number is then a mean
over images: mIoU, pixel accuracy, mean accuracy (over the classes present in the image), and
the IoU of class c is the mean over the images whose ground truth contains c. Images with no
valid ground-truth pixel are skipped.

Predictions hold class ids in ``[0, num_classes)``, or ``ignore_index`` for a pixel that was
given no class (possible on datasets without background, see ``grounding``). Such pixels are
kept in an extra last column of the confusion matrix: they are misses (FN) of their ground-truth
class and false positives of none. All scores are in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

IGNORE_INDEX = 255

ScoringProtocol = Literal["standard", "paper"]  # how a split is scored (the module docstring)
PROTOCOLS: tuple[ScoringProtocol, ...] = ("standard", "paper")


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Count ground-truth / prediction pairs over the pixels whose ground truth is valid.

    Args:
        gt: ``(H, W)`` integer class ids in ``[0, num_classes)`` or ``ignore_index``.
        pred: ``(H, W)`` integer class ids in ``[0, num_classes)`` or ``ignore_index``
            (no class given).
        num_classes: number of classes N.
        ignore_index: the void / unlabelled value in both maps.

    Returns:
        ``(N, N + 1)`` int64: entry ``[g, p]`` counts pixels of ground truth g predicted p; the
        last column counts pixels of ground truth g that the prediction left without a class.

    Raises:
        ValueError: the shapes differ or a map holds a value that is neither a class id nor
            ``ignore_index``.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    for name, values in (("ground truth", gt), ("prediction", pred)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"the {name} must hold integer class ids, got {values.dtype}")
        bad = np.unique(values[((values < 0) | (values >= num_classes)) & (values != ignore_index)])
        if bad.size:
            raise ValueError(
                f"the {name} holds values {bad[:10].tolist()} outside 0..{num_classes - 1} "
                f"and not {ignore_index}"
            )
    valid = gt != ignore_index
    rows = gt[valid].astype(np.int64)
    cols = pred[valid].astype(np.int64)
    cols[cols == ignore_index] = num_classes
    counts = np.bincount(rows * (num_classes + 1) + cols, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


@dataclass
class Scores:
    """What a protocol reports, in percent; NaN (per class) or None (summary) when undefined."""

    miou: float | None
    per_class_iou: np.ndarray  # (N,) float64, NaN where the class has no IoU
    pixel_accuracy: float | None
    mean_accuracy: float | None
    per_class_accuracy: np.ndarray  # (N,) float64, NaN where the class is not in the ground truth
    gt_pixels: np.ndarray  # (N,) int64 valid ground-truth pixels per class (after void handling)


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else None


def _split(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, ground-truth counts and prediction counts of an (N, N) or (N, N+1) matrix."""
    confusion = np.asarray(confusion, dtype=np.int64)
    num_classes = confusion.shape[0]
    if confusion.ndim != 2 or confusion.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"a confusion matrix is (N, N) or (N, N + 1), got {confusion.shape}")
    square = confusion[:, :num_classes]
    return np.diag(square), confusion.sum(axis=1), square.sum(axis=0)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """``TP / (TP + FP + FN)`` per class, in percent; NaN where the union is empty."""
    tp, gt_count, pred_count = _split(confusion)
    union = gt_count + pred_count - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, 100.0 * tp / np.maximum(union, 1), np.nan)


def standard_scores(confusion: np.ndarray) -> Scores:
    """The standard protocol's scores from a whole-split confusion matrix (rows ground truth)."""
    tp, gt_count, _ = _split(confusion)
    iou = iou_per_class(confusion)
    accuracy = np.where(gt_count > 0, 100.0 * tp / np.maximum(gt_count, 1), np.nan)
    total = int(gt_count.sum())
    return Scores(
        miou=_nanmean(iou),
        per_class_iou=iou,
        pixel_accuracy=100.0 * float(tp.sum()) / total if total else None,
        mean_accuracy=_nanmean(accuracy),
        per_class_accuracy=accuracy,
        gt_pixels=gt_count,
    )


def paper_void_to_background(
    gt: np.ndarray, background_id: int | None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """The published script's void handling: ``ignore_index`` becomes ``background_id``.

    Datasets without a background class (``background_id`` None) keep their void pixels.
    """
    if background_id is None:
        return gt
    return np.where(gt == ignore_index, background_id, gt)


@dataclass
class ImageScores:
    """One image under the paper protocol, in percent (None: no valid ground-truth pixel)."""

    miou: float | None  # mean IoU over the classes present in the ground truth
    iou: np.ndarray  # (N,) IoU of the classes present in the ground truth, NaN elsewhere
    pixel_accuracy: float | None
    mean_accuracy: float | None  # mean over the classes present in the ground truth


def paper_image_scores(confusion: np.ndarray) -> ImageScores:
    """Score one image's confusion matrix (built after :func:`paper_void_to_background`)."""
    tp, gt_count, _ = _split(confusion)
    present = gt_count > 0
    iou = np.where(present, iou_per_class(confusion), np.nan)
    accuracy = np.where(present, 100.0 * tp / np.maximum(gt_count, 1), np.nan)
    total = int(gt_count.sum())
    return ImageScores(
        miou=_nanmean(iou),
        iou=iou,
        pixel_accuracy=100.0 * float(tp.sum()) / total if total else None,
        mean_accuracy=_nanmean(accuracy),
    )


class Evaluator:
    """Accumulates images and reports a protocol's :class:`Scores` at any point.

    Args:
        num_classes: N, the dataset's classes.
        protocol: ``"standard"`` or ``"paper"`` (see the module docstring).
        background_id: the dataset's background class, used by ``paper`` to absorb void pixels.
        ignore_index: the void value.

    ``confusion`` is the sum of the images' confusion matrices (for ``paper``, after its void
    handling), ``(N, N + 1)``; ``images`` counts the updates.
    """

    def __init__(
        self,
        num_classes: int,
        protocol: ScoringProtocol = "standard",
        background_id: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        self.num_classes = num_classes
        self.protocol = protocol
        self.background_id = background_id
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.images = 0
        # paper protocol: sums over scored images
        self._scored = 0
        self._miou_sum = 0.0
        self._pixel_accuracy_sum = 0.0
        self._mean_accuracy_sum = 0.0
        self._class_iou_sum = np.zeros(num_classes)
        self._class_accuracy_sum = np.zeros(num_classes)
        self._class_images = np.zeros(num_classes, dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: ``gt`` and ``pred`` are ``(H, W)`` class-id maps of the same shape."""
        if self.protocol == "paper":
            gt = paper_void_to_background(gt, self.background_id, self.ignore_index)
        confusion = confusion_matrix(gt, pred, self.num_classes, self.ignore_index)
        self.confusion += confusion
        self.images += 1
        if self.protocol != "paper":
            return
        image = paper_image_scores(confusion)
        if image.miou is None:
            return
        self._scored += 1
        self._miou_sum += image.miou
        self._pixel_accuracy_sum += image.pixel_accuracy or 0.0
        self._mean_accuracy_sum += image.mean_accuracy or 0.0
        present = ~np.isnan(image.iou)
        self._class_iou_sum[present] += image.iou[present]
        tp, gt_count, _ = _split(confusion)
        self._class_accuracy_sum[present] += 100.0 * tp[present] / gt_count[present]
        self._class_images[present] += 1

    def scores(self) -> Scores:
        """The protocol's scores over the images added so far."""
        if self.protocol == "standard":
            return standard_scores(self.confusion)
        seen = self._class_images > 0
        count = np.maximum(self._class_images, 1)
        scored = self._scored
        return Scores(
            miou=self._miou_sum / scored if scored else None,
            per_class_iou=np.where(seen, self._class_iou_sum / count, np.nan),
            pixel_accuracy=self._pixel_accuracy_sum / scored if scored else None,
            mean_accuracy=self._mean_accuracy_sum / scored if scored else None,
            per_class_accuracy=np.where(seen, self._class_accuracy_sum / count, np.nan),
            gt_pixels=self.confusion.sum(axis=1),
        )


def __getattr__(name: str) -> Any:
    if name == "Protocol":  # 0.1's name, which shadowed typing.Protocol
        import warnings

        warnings.warn(
            "freesegdiff.evaluation.metrics.Protocol is ScoringProtocol now; the old name is "
            "removed in freesegdiff 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return ScoringProtocol
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
