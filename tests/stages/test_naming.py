"""CLIP mask scoring and the paper's assignment rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from freesegdiff.config import ClassifyConfig
from freesegdiff.errors import ConfigError
from freesegdiff.stages.naming.masked_crops import MaskClassifier, assign_labels

CPU = torch.device("cpu")


# ---------------------------------------------------------------- assignment, by hand
def test_each_label_claims_its_best_cluster_and_clusters_take_their_best_claim():
    scores = np.array(
        [
            [0.7, 0.6, 0.1],  # "cat" is best in cluster 0
            [0.2, 0.3, 0.1],  # "sofa" is best in cluster 1
            [0.1, 0.1, 0.8],  # "floor" is best in cluster 2
        ]
    )
    assert assign_labels(scores) == [0, 1, 2]


def test_a_label_claims_one_cluster_so_redundant_clusters_become_background():
    # "cat" wins both columns, but keeps only its best (cluster 1); cluster 0 then has only
    # zeros left and is dropped.
    scores = np.array([[0.9, 0.95], [0.1, 0.05]])
    # row "dog" keeps cluster 0 (0.1 > 0.05): cluster 0 -> dog, cluster 1 -> cat
    assert assign_labels(scores) == [1, 0]
    scores = np.array([[0.9, 0.95], [0.0, 0.0]])
    assert assign_labels(scores) == [-1, 0]


def test_non_candidates_cannot_claim():
    scores = np.array([[0.9, 0.2], [0.1, 0.8]])
    assert assign_labels(scores, np.array([False, True])) == [-1, 1]
    assert assign_labels(scores, np.array([False, False])) == [-1, -1]


def test_ties_first_go_to_the_lowest_index():
    # A row tie: label 0 claims cluster 0 (first). A column tie: cluster 1 takes label 1.
    scores = np.array([[0.5, 0.5], [0.25, 0.5], [0.25, 0.5]])
    assert assign_labels(scores, ties="first") == [0, 1]


def test_ties_all_keep_every_tied_cluster():
    """Released rule: a label whose largest score is tied keeps every tied cluster.

    Row 0 ties clusters 0 and 1 at 0.5: it keeps both. In column 1 it ties row 1's 0.5 and wins
    by its lower label index, so clusters 0 and 1 both take label 0. Cluster 2 takes label 2
    (0.4 is row 2's maximum).
    """
    scores = np.array([[0.5, 0.5, 0.1], [0.25, 0.5, 0.2], [0.25, 0.1, 0.4]])
    assert assign_labels(scores) == [0, 0, 2]
    assert assign_labels(scores, ties="first") == [0, 1, 2]
    # by hand, the released lines: m[m < m.max(1, keepdims=True)] = 0; argmax over each column
    m = scores.copy()
    m[m < m.max(axis=1, keepdims=True)] = 0
    assert m.argmax(axis=0).tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match=r"ties must be 'all' or 'first', got 'last'"):
        assign_labels(scores, ties="last")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"classify\.ties must be one of 'all', 'first'"):
        ClassifyConfig(ties="last")  # type: ignore[arg-type]


def test_empty_label_set_or_no_clusters():
    assert assign_labels(np.zeros((0, 4))) == [-1, -1, -1, -1]
    assert assign_labels(np.zeros((3, 0))) == []
    with pytest.raises(ValueError, match="candidates must be"):
        assign_labels(np.ones((2, 2)), np.array([True]))


# ---------------------------------------------------------------- CLIP, tiny model
@pytest.fixture(scope="module")
def classifier(tiny_clip_path) -> MaskClassifier:
    return MaskClassifier.from_pretrained(str(tiny_clip_path), device=CPU)


def test_preprocessing_matches_the_clip_processor(classifier, photos):
    image = photos["chelsea"]  # 300 x 451
    ours = classifier.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    reference = classifier.processor(images=Image.fromarray(image), return_tensors="pt")
    assert ours.shape == reference.pixel_values.shape == (1, 3, 32, 32)
    # Torch's antialiased bicubic follows PIL's to within a few grey levels.
    difference = (ours - reference.pixel_values).abs()
    assert float(difference.mean()) < 0.02
    assert float(difference.max()) < 0.15


def test_torch_crop_corner_is_the_processors(tiny_clip_path):
    """Point 6: the centre crop's corner at the floor of half the margin, as transformers puts
    it; an odd margin (32 x 51: margin 19) shows the difference from rounding (10)."""
    model = MaskClassifier.from_pretrained(str(tiny_clip_path), device=CPU)
    ramp = torch.arange(51.0).repeat(3, 32, 1)[None]  # (1, 3, 32, 51), column index as value
    ours = model.preprocess(ramp)
    first_column = ours[0, 0, 0, 0] * model.std[0, 0, 0, 0] + model.mean[0, 0, 0, 0]
    assert round(float(first_column / model.rescale)) == 19 // 2 == 9
    image = np.ascontiguousarray(np.broadcast_to(np.arange(51, dtype=np.uint8), (32, 51)))
    rgb = np.stack([image] * 3, axis=-1)
    reference = model.processor(images=Image.fromarray(rgb), return_tensors="pt").pixel_values
    assert torch.allclose(ours, reference, atol=1e-5)


def test_processor_path_gives_the_released_inputs(tiny_clip_path, photos):
    """The released inputs: each masked uint8 image through the CLIP processor."""
    model = MaskClassifier.from_pretrained(str(tiny_clip_path), device=CPU)
    image = photos["coffee"]
    masks = torch.zeros(2, *image.shape[:2], dtype=torch.bool)
    masks[0, :100] = True
    masks[1, 100:, 50:] = True
    ours = model.masked_images(image, masks)
    for mask, row in zip(masks, ours, strict=True):
        masked = mask.numpy()[:, :, None].astype(np.uint8) * image
        expected = model.processor(images=masked, return_tensors="pt").pixel_values[0]
        assert torch.equal(row, expected)


def test_scores_equal_clip_run_the_usual_way(classifier, photos):
    image = photos["coffee"]
    height, width = image.shape[:2]
    masks = torch.zeros(3, height, width, dtype=torch.bool)
    masks[0, : height // 2] = True
    masks[1, height // 2 :] = True
    masks[2, :, : width // 3] = True
    labels = ["cup", "table", "wall", "plant"]
    (scores,) = classifier.score([(image, masks, labels)])
    assert scores.shape == (4, 3)
    assert np.allclose(scores.sum(0), 1.0, atol=1e-5)
    # Independent path: PIL masked images through the processor and CLIPModel.forward.
    pictures = [Image.fromarray(image * m.numpy()[:, :, None]) for m in masks]
    inputs = classifier.processor(text=labels, images=pictures, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = classifier.model(**inputs).logits_per_image  # (masks, labels)
    expected = torch.softmax(logits, dim=1).T.numpy()
    assert np.allclose(scores, expected, atol=2e-3)


def test_a_batch_scores_like_single_images_and_texts_are_cached(classifier, photos):
    a, b = photos["chelsea"], photos["rocket"]
    mask_a = torch.ones(2, *a.shape[:2], dtype=torch.bool)
    mask_a[1, :10] = False
    mask_b = torch.ones(1, *b.shape[:2], dtype=torch.bool)
    batch = classifier.score([(a, mask_a, ["cat", "dog"]), (b, mask_b, ["sky"]), (b, mask_b, [])])
    single = classifier.score([(a, mask_a, ["cat", "dog"])])
    assert np.allclose(batch[0], single[0], atol=1e-5)
    assert batch[1].tolist() == [[1.0]]  # one label: softmax gives 1
    assert batch[2].shape == (0, 1)
    cached = classifier.text_embeddings(["cat", "dog"])
    assert classifier.text_embeddings(["cat", "dog"]) is cached
