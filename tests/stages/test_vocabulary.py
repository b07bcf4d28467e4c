"""Closed-vocabulary pruning: correlation distance, the mean threshold, the SD text embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from freesegdiff.errors import ConfigError, EmptyVocabularyError
from freesegdiff.infra.tiny.vocab import write_clip_tokenizer
from freesegdiff.stages.vocabulary import (
    candidate_indices,
    class_embeddings,
    correlation_distance,
    open_label_texts,
    prune_classes,
    text_embedder,
)

# ------------------------------------------------------------------ correlation distance


def test_correlation_distance_matches_scipy() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=generator) * 3 + 1
    b = torch.randn(5, 33, generator=generator) - 2
    expected = cdist(a.numpy(), b.numpy(), "correlation")
    got = correlation_distance(a, b)
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_correlation_distance_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [5.0, 5.0, 8.0]])
    # centred a = (-1, 0, 1); centred rows of b: (-2, 0, 2), (1, 0, -1), (-1, -1, 2)
    # cos: 1, -1, 3 / (sqrt(2) * sqrt(6)) = sqrt(3) / 2
    expected = [[0.0, 2.0, 1.0 - math.sqrt(3) / 2]]
    np.testing.assert_allclose(correlation_distance(a, b).numpy(), expected, atol=1e-12)


def test_correlation_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        correlation_distance(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same length"):
        correlation_distance(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------- prune_classes

# Five orthonormal directions of R^6 whose coordinates sum to zero (Helmert's basis): the
# Pearson correlation of two unit vectors built from them is their dot product, so an entity
# c * class + sqrt(1 - c^2) * NOISE has correlation distance exactly 1 - c to that class and 1 to
# every other class.
_HELMERT = torch.tensor(
    [
        [1, -1, 0, 0, 0, 0],
        [1, 1, -2, 0, 0, 0],
        [1, 1, 1, -3, 0, 0],
        [1, 1, 1, 1, -4, 0],
        [1, 1, 1, 1, 1, -5],
    ],
    dtype=torch.float64,
)
_BASIS = _HELMERT / _HELMERT.norm(dim=1, keepdim=True)
CAR, DOG, CAT, TREE, NOISE = _BASIS

CLASSES = ["car", "dog", "cat", "tree"]


def _mix(direction: torch.Tensor, correlation: float) -> torch.Tensor:
    return correlation * direction + math.sqrt(1 - correlation**2) * NOISE


# entity -> vector; its nearest class and distance in the comment.
VECTORS = {
    "A photo of car": CAR,
    "A photo of dog": DOG,
    "A photo of cat": CAT,
    "A photo of tree": TREE,
    "kitten": _mix(CAT, 1.0),  # cat, 0.0
    "tabby": _mix(CAT, 0.9),  # cat, 0.1
    "puppy": _mix(DOG, 0.8),  # dog, 0.2
    "lamp": _mix(CAR, 0.6),  # car, 0.4
    "cloud": _mix(TREE, 0.4),  # tree, 0.6
}


class FakeEmbed:
    """Looks texts up in VECTORS (scaled and shifted: correlation ignores both); logs calls."""

    def __init__(self, vectors: dict[str, torch.Tensor] = VECTORS) -> None:
        self.vectors = vectors
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([2.0 * self.vectors[text] + 3.0 for text in texts])


def test_fake_embedding_distances() -> None:
    embed = FakeEmbed()
    distances = correlation_distance(
        embed(["kitten", "tabby", "puppy", "lamp", "cloud"]),
        embed([f"A photo of {name}" for name in CLASSES]),
    )
    expected = [
        [1.0, 1.0, 0.0, 1.0],
        [1.0, 1.0, 0.1, 1.0],
        [1.0, 0.2, 1.0, 1.0],
        [0.4, 1.0, 1.0, 1.0],
        [1.0, 1.0, 1.0, 0.6],
    ]
    np.testing.assert_allclose(distances.numpy(), expected, atol=1e-12)


def test_prune_keeps_entities_at_most_the_mean_nearest_distance() -> None:
    # Nearest distances 0, 0.1, 0.2, 0.4, 0.6: their mean is 1.3 / 5 = 0.26, so kitten, tabby
    # and puppy keep cat, cat and dog. (The mean of the whole 5 x 4 matrix, (15 + 1.3) / 20 =
    # 0.815, would keep every class.) The result follows the order of CLASSES.
    embed = FakeEmbed()
    entities = ["cloud", "puppy", "kitten", "lamp", "tabby"]
    assert prune_classes(entities, CLASSES, embed) == ["dog", "cat"]
    assert embed.calls == [[f"A photo of {name}" for name in CLASSES], entities]


def test_prune_keeps_a_distance_equal_to_the_mean() -> None:
    # 0, 0.2, 0.4: the mean is 0.2 and puppy (0.2) is kept.
    assert prune_classes(["kitten", "puppy", "lamp"], CLASSES, FakeEmbed()) == ["dog", "cat"]


def test_prune_counts_every_entity_in_the_mean() -> None:
    # 0, 0, 0, 0.2, 0.4: mean 0.12, only cat. Counted once each, kitten would give 0.2 and dog.
    entities = ["kitten", "kitten", "kitten", "puppy", "lamp"]
    assert prune_classes(entities, CLASSES, FakeEmbed()) == ["cat"]
    assert prune_classes(["kitten", "puppy", "lamp"], CLASSES, FakeEmbed()) == ["dog", "cat"]


def test_prune_one_entity_keeps_its_class() -> None:
    assert prune_classes(["cloud"], CLASSES, FakeEmbed()) == ["tree"]


def test_prune_uses_the_template() -> None:
    vectors = {f"a {name} in the wild": VECTORS[f"A photo of {name}"] for name in CLASSES}
    embed = FakeEmbed({**VECTORS, **vectors})
    assert prune_classes(["lamp"], CLASSES, embed, template="a {} in the wild") == ["car"]
    assert embed.calls[0] == [f"a {name} in the wild" for name in CLASSES]


def test_prune_without_entities() -> None:
    embed = FakeEmbed()
    assert prune_classes([], CLASSES, embed) == []
    assert embed.calls == []


def test_prune_without_classes() -> None:
    with pytest.raises(EmptyVocabularyError, match="at least one class"):
        prune_classes(["kitten"], [], FakeEmbed())


def test_prune_template_needs_a_slot() -> None:
    with pytest.raises(ConfigError, match="must contain"):
        prune_classes(["kitten"], CLASSES, FakeEmbed(), template="A photo")


def test_candidate_indices() -> None:
    entities = torch.stack([VECTORS[name] for name in ("cloud", "puppy", "kitten")])
    classes = torch.stack([CAR, DOG, CAT, TREE])
    # 0.6, 0.2, 0.0 -> mean 0.2667: puppy (dog, 1) and kitten (cat, 2)
    assert candidate_indices(entities, classes) == [1, 2]
    assert candidate_indices(torch.zeros(0, 6), classes) == []


# ----------------------------------------------------------------------- text_embedder


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A CLIP tokenizer saved and loaded back, and a tiny random CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip-text")
    vocab_size = write_clip_tokenizer(Path(folder))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


TEXTS = ["a cat", "a small red dog", "A photo of tree"]


def test_text_embedder_shape(tiny_text_model: tuple[Any, Any]) -> None:
    tokenizer, model = tiny_text_model
    embed = text_embedder(tokenizer, model, "cpu", torch.float32)
    rows = embed(TEXTS)
    assert rows.shape == (3, 16)
    assert rows.dtype == torch.float32
    assert rows.device.type == "cpu"
    assert embed([]).shape == (0, 16)


def test_text_embedder_batch_equals_one_by_one(tiny_text_model: tuple[Any, Any]) -> None:
    tokenizer, model = tiny_text_model
    batched = text_embedder(tokenizer, model, "cpu", torch.float32)(TEXTS)
    one_by_one = torch.cat(
        [text_embedder(tokenizer, model, "cpu", torch.float32)([text]) for text in TEXTS]
    )
    in_pairs = text_embedder(tokenizer, model, "cpu", torch.float32, batch_size=2)(TEXTS)
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched, in_pairs, atol=1e-6, rtol=0)


def test_text_embedder_by_hand(tiny_text_model: tuple[Any, Any]) -> None:
    """Mean over all 77 positions of the padded prompt, padding included, as SD's prompt."""
    tokenizer, model = tiny_text_model
    rows = text_embedder(tokenizer, model, "cpu", torch.float32)(TEXTS)
    for text, row in zip(TEXTS, rows, strict=True):
        tokens = tokenizer(text, padding="max_length", max_length=77, truncation=True)
        ids = torch.tensor([tokens["input_ids"]])
        assert ids.shape == (1, 77)
        assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.pad_token_id
        with torch.no_grad():
            states = model(input_ids=ids).last_hidden_state[0]  # (77, 16)
        torch.testing.assert_close(row, states.sum(dim=0) / 77, atol=1e-6, rtol=0)
        used = sum(tokens["attention_mask"])  # BOS, words, EOS: the mean over these differs
        assert not torch.allclose(row, states[:used].mean(dim=0), atol=1e-3)


def test_text_embedder_low_precision(tiny_text_model: tuple[Any, Any]) -> None:
    tokenizer, model = tiny_text_model
    full = text_embedder(tokenizer, model, "cpu", torch.float32)(TEXTS)
    low = text_embedder(tokenizer, model, "cpu", torch.bfloat16)(TEXTS)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=2e-2, rtol=0)


def test_text_embedder_rejects_one_string(tiny_text_model: tuple[Any, Any]) -> None:
    tokenizer, model = tiny_text_model
    with pytest.raises(TypeError, match="not one string"):
        text_embedder(tokenizer, model, "cpu", torch.float32)("a cat")


# ------------------------------------------- released label texts (docs/method.md, step 9)
def test_open_label_texts_put_the_distractors_first() -> None:
    """Point 2: class names, then the entities not among them; only entities are candidates."""
    voc = ["aeroplane", "cat", "dog", "sofa"]
    texts, candidates = open_label_texts(["small cat", "cat", "cushion", "cushion"], voc)
    assert texts == ["aeroplane", "cat", "dog", "sofa", "small cat", "cushion", "cushion"]
    # "cat" is both a distractor and an entity: a candidate, at its distractor position
    assert candidates == ["cat", "small cat", "cushion", "cushion"]
    assert open_label_texts(["bird", "branch"]) == (["bird", "branch"], ["bird", "branch"])
    assert open_label_texts([], voc) == (voc, [])


def test_multiword_class_is_the_mean_of_its_words() -> None:
    """Point 7: "potted plant" is the mean of "A photo of potted" and "A photo of plant"."""
    vectors = {
        "A photo of potted": torch.tensor([1.0, 0.0, 3.0]),
        "A photo of plant": torch.tensor([0.0, 2.0, 1.0]),
        "A photo of cat": torch.tensor([5.0, 5.0, 5.0]),
        "A photo of potted plant": torch.tensor([9.0, 9.0, 0.0]),
    }
    embed = FakeEmbed(vectors)
    rows = class_embeddings(["potted plant", "cat"], embed)
    # FakeEmbed returns 2 v + 3: potted (5, 3, 9), plant (3, 7, 5), their mean (4, 5, 7)
    assert rows.tolist() == [[4.0, 5.0, 7.0], [13.0, 13.0, 13.0]]
    assert embed.calls == [["A photo of potted", "A photo of plant", "A photo of cat"]]
    whole = class_embeddings(["potted plant", "cat"], embed, multiword="whole")
    assert whole.tolist() == [[21.0, 21.0, 3.0], [13.0, 13.0, 13.0]]
    with pytest.raises(ConfigError, match="multiword_classes"):
        class_embeddings(["cat"], embed, multiword="first")  # type: ignore[arg-type]


def test_prune_matches_a_multiword_class_by_its_words() -> None:
    """The released matching finds "dining table" for "table" through the mean of its words;
    the whole-name embedding (here anti-correlated with "table") does not: "car" is nearer."""
    vectors = dict(VECTORS)
    vectors["A photo of dining"] = DOG
    vectors["A photo of table"] = DOG
    vectors["A photo of dining table"] = -DOG
    vectors["table"] = _mix(DOG, 0.95)
    classes = ["dining table", "car"]
    embed = FakeEmbed(vectors)
    assert prune_classes(["table"], classes, embed) == ["dining table"]
    assert prune_classes(["table"], classes, embed, multiword="whole") == ["car"]
