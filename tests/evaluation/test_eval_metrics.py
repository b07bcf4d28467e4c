"""Metrics against confusion matrices computed by hand, and against torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freesegdiff.evaluation.metrics import (
    Evaluator,
    confusion_matrix,
    paper_image_scores,
    paper_void_to_background,
    standard_scores,
)

V = 255  # void


def test_confusion_matrix_counts_pairs_skips_void_and_keeps_unlabelled_column():
    gt = np.array([[0, 0, 1, 1], [2, 2, V, V]])
    pred = np.array([[0, 1, 1, 1], [2, V, 0, 2]])
    # valid pixels (gt != 255): (0,0) (0,1) (1,1) (1,1) (2,2) (2,none)
    expected = np.array(
        [
            # pred: 0  1  2  none
            [1, 1, 0, 0],  # gt 0
            [0, 2, 0, 0],  # gt 1
            [0, 0, 1, 1],  # gt 2
        ]
    )
    np.testing.assert_array_equal(confusion_matrix(gt, pred, 3), expected)


def test_confusion_matrix_rejects_bad_values_and_shapes():
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        confusion_matrix(np.array([[0, 3]]), np.array([[0, 0]]), 3)
    with pytest.raises(ValueError, match=r"prediction holds values \[7\]"):
        confusion_matrix(np.array([[0, 1]]), np.array([[0, 7]]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)


def test_perfect_prediction_scores_100():
    gt = np.array([[0, 1, 2], [2, 1, V]])
    scores = standard_scores(confusion_matrix(gt, np.where(gt == V, 0, gt), 3))
    assert scores.miou == 100.0
    assert scores.pixel_accuracy == 100.0
    assert scores.mean_accuracy == 100.0
    np.testing.assert_array_equal(scores.per_class_iou, [100.0, 100.0, 100.0])


def test_standard_scores_of_a_hand_computed_matrix():
    # rows gt, columns pred, last column "no class predicted"
    confusion = np.array(
        [
            [6, 2, 0, 0],  # class 0: 8 gt pixels, 6 right
            [1, 3, 0, 1],  # class 1: 5 gt pixels, 3 right, 1 left unlabelled
            [0, 0, 0, 0],  # class 2: never in gt, never predicted
            [0, 1, 0, 0],  # class 3: 1 gt pixel, predicted 1, never predicted as 3
        ]
    )
    scores = standard_scores(confusion)
    # IoU0 = 6 / (8 + 7 - 6) = 6/9; IoU1 = 3 / (5 + 6 - 3) = 3/8; IoU2 undefined; IoU3 = 0/1
    np.testing.assert_allclose(scores.per_class_iou[[0, 1, 3]], [100 * 6 / 9, 37.5, 0.0])
    assert math.isnan(scores.per_class_iou[2])
    assert scores.miou == pytest.approx((100 * 6 / 9 + 37.5 + 0.0) / 3)  # 34.7222...
    # pixel accuracy = (6 + 3) / 14 valid pixels; mean accuracy = (6/8 + 3/5 + 0/1) / 3
    assert scores.pixel_accuracy == pytest.approx(100 * 9 / 14)
    assert scores.mean_accuracy == pytest.approx(100 * (0.75 + 0.6 + 0.0) / 3)  # 45.0
    np.testing.assert_array_equal(scores.gt_pixels, [8, 5, 0, 1])


def test_a_known_confusion_on_maps():
    # 2x4 image: gt = left half class 0, right half class 1; prediction shifts one column
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 1, 1, 1]])
    scores = standard_scores(confusion_matrix(gt, pred, 2))
    # class 0: TP 2, FN 2, FP 0 -> 2/4 = 50; class 1: TP 4, FP 2 -> 4/6 = 66.67; mean 58.33
    np.testing.assert_allclose(scores.per_class_iou, [50.0, 200 / 3])
    assert scores.miou == pytest.approx(175 / 3)
    assert scores.pixel_accuracy == pytest.approx(75.0)


def test_paper_protocol_turns_void_into_background_and_averages_per_image():
    gt = np.array([[0, 1, 1, V]])
    np.testing.assert_array_equal(paper_void_to_background(gt, 0), [[0, 1, 1, 0]])
    np.testing.assert_array_equal(paper_void_to_background(gt, None), gt)

    evaluator = Evaluator(3, protocol="paper", background_id=0)
    # image A: gt [0 1 1 void->0], pred [0 1 0 0]
    #   class 0: TP 2 (pixels 0, 3), FP 1 (pixel 2) -> 2/3; class 1: TP 1, FN 1 -> 1/2
    #   class 2 absent from gt: not averaged. image mIoU = (2/3 + 1/2) / 2 = 7/12
    evaluator.update(gt, np.array([[0, 1, 0, 0]]))
    # image B: gt all class 2, pred all class 2 -> image mIoU 1
    evaluator.update(np.array([[2, 2]]), np.array([[2, 2]]))
    scores = evaluator.scores()
    assert scores.miou == pytest.approx(100 * (7 / 12 + 1) / 2)  # 79.1666...
    # per class: mean over the images whose gt holds the class
    np.testing.assert_allclose(scores.per_class_iou, [100 * 2 / 3, 50.0, 100.0])
    # pixel accuracy per image: A 3/4, B 1 -> 87.5; mean accuracy: A (2/2 + 1/2)/2, B 1
    assert scores.pixel_accuracy == pytest.approx(87.5)
    assert scores.mean_accuracy == pytest.approx(100 * (0.75 + 1) / 2)
    assert evaluator.images == 2


def test_paper_and_standard_differ_on_the_same_images():
    # The standard protocol ignores the void pixel, and pools both images in one matrix:
    #   class 0: TP 1, FP 1 -> 1/2; class 1: TP 1, FN 1 -> 1/2; class 2: TP 2 -> 1
    standard = Evaluator(3, protocol="standard", background_id=0)
    standard.update(np.array([[0, 1, 1, V]]), np.array([[0, 1, 0, 0]]))
    standard.update(np.array([[2, 2]]), np.array([[2, 2]]))
    assert standard.scores().miou == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)


def test_paper_image_scores_of_one_matrix():
    image = paper_image_scores(np.array([[3, 1, 0], [0, 0, 0], [1, 0, 1]]))
    # class 0: 3 / (4 + 4 - 3) = 3/5; class 1 absent from gt; class 2: 1 / (2 + 1 - 1) = 1/2
    assert image.miou == pytest.approx(100 * (0.6 + 0.5) / 2)
    assert math.isnan(image.iou[1])


def test_paper_protocol_without_background_keeps_void_and_skips_empty_images():
    evaluator = Evaluator(2, protocol="paper", background_id=None)
    evaluator.update(np.array([[V, V]]), np.array([[0, 1]]))  # nothing to score
    evaluator.update(np.array([[0, V]]), np.array([[0, 1]]))  # class 0 perfect
    assert evaluator.scores().miou == 100.0
    assert evaluator.images == 2


def test_standard_matches_torchmetrics_on_random_maps():
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("torchmetrics.classification")
    rng = np.random.default_rng(0)
    num_classes = 7
    jaccard = metrics.MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)
    per_class = metrics.MulticlassJaccardIndex(num_classes, average="none", ignore_index=255)
    accuracy = metrics.MulticlassAccuracy(num_classes, average="micro", ignore_index=255)
    evaluator = Evaluator(num_classes)
    for _ in range(4):
        # class 6 never occurs in gt nor pred (NaN, left out of the mean); class 5 is
        # predicted but absent from gt (IoU 0, counted in the mean)
        gt = rng.integers(0, 5, size=(16, 20))
        gt[rng.random(gt.shape) < 0.1] = 255
        noise = rng.integers(0, 6, size=gt.shape)
        pred = np.where(rng.random(gt.shape) < 0.5, np.where(gt == 255, 0, gt), noise)
        evaluator.update(gt, pred)
        for metric in (jaccard, per_class, accuracy):
            metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    scores = evaluator.scores()
    assert scores.miou == pytest.approx(100 * jaccard.compute().item(), abs=1e-4)
    reference = 100 * per_class.compute().numpy()
    np.testing.assert_allclose(scores.per_class_iou[:6], reference[:6], atol=1e-4)
    assert scores.per_class_iou[5] == 0.0
    assert math.isnan(scores.per_class_iou[6])  # torchmetrics gives 0 here but excludes it
    assert scores.pixel_accuracy == pytest.approx(100 * accuracy.compute().item(), abs=1e-4)
