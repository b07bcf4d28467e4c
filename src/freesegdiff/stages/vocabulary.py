"""Closed vocabulary: which dataset classes the caption points to (docs/method.md, step 9).

Each entity of the caption is matched to its nearest class by the correlation distance between
Stable Diffusion text-encoder embeddings; the entities that match best (nearest distance at most
the mean of the nearest distances) nominate their class as a candidate. Only candidates can then
name a mask (docs/method.md, step 11).

The maths is in :func:`correlation_distance` and :func:`candidate_indices` (pure tensor
functions); :func:`prune_classes` wires them to an embedding function such as the one
:func:`text_embedder` builds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from freesegdiff.config import VocabularyConfig
from freesegdiff.errors import ConfigError, EmptyVocabularyError
from freesegdiff.stages.entities import AdjectiveForm

TextEmbedder = Callable[[Sequence[str]], torch.Tensor]
MultiwordRule = Literal["mean-of-words", "whole"]

# Nearest distances this close to the mean (relative) count as equal to it: below the resolution
# of float32 embeddings, so an exact tie is never lost to rounding.
_TIE_RTOL = 1e-6
_TIE_ATOL = 1e-12


def parse_class_names(
    text: str | None, *, what: str = "--classes", blank_is_open: bool = False
) -> list[str] | None:
    """A class list as people type it -> class names: ``"cat, dog,traffic light"`` (commas or
    line breaks) -> ``["cat", "dog", "traffic light"]``; None -> None (open vocabulary).

    Args:
        what: how the text is named in the message (``--classes``, ``the class box``).
        blank_is_open: blank text means open vocabulary (a web form's empty box), rather than
            a list without a name.

    Raises:
        ConfigError: the text names no class (``" , "``).
    """
    if text is None or (blank_is_open and not text.strip()):
        return None
    names = [name.strip() for name in text.replace("\n", ",").split(",") if name.strip()]
    if not names:
        how = "leave it empty" if blank_is_open else "leave it out"
        raise ConfigError(
            f"{what} {text!r} holds no class name: give names separated by commas, e.g. "
            f"'cat, dog, sofa', or {how} for open vocabulary"
        )
    return names


def normalise_classes(classes: Sequence[str] | None) -> list[str] | None:
    """Strip class names and reject empty ones; None stays None (open vocabulary)."""
    if classes is None:
        return None
    if isinstance(classes, str):
        raise ConfigError("classes must be a list of names, not one string; split it first")
    names = [str(name).strip() for name in classes]
    if not names:
        raise EmptyVocabularyError(
            "the class list is empty: give at least one class name, or no class list at all "
            "for open vocabulary (labels from the caption)"
        )
    if any(not name for name in names):
        raise EmptyVocabularyError(f"the class list {list(classes)!r} contains an empty name")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class ImageVocabulary:
    """Steps 2 and 9 for one image: what CLIP chooses from, and what may be chosen."""

    entities: list[str]  # the caption's entities, in order (duplicates as the rule keeps them)
    texts: list[str]  # the label texts CLIP scores; label id i + 1 is texts[i]
    candidates: list[str]  # the texts that may claim a cluster
    warnings: tuple[str, ...] = ()  # what was unusual but handled


class LabelVocabulary:
    """Stages 2 and 9: from a caption (and a class list, if any) to an :class:`ImageVocabulary`.

    Open vocabulary: ``open_distractors`` then the entities (:func:`open_label_texts`). Closed
    vocabulary: the classes, pruned by the caption's entities (:func:`prune_classes`) when
    ``prune_with_caption`` is on; the text embeddings come from ``embedder()``, built on first
    use, and are cached per text.

    Args:
        config: the ``vocabulary`` settings.
        entities: the entity stage (:class:`EntityExtractor`, or one that keeps its outputs).
        embedder: returns the text embedder for closed-vocabulary matching (it may raise
            :class:`ConfigError` when the text encoder was freed).
    """

    def __init__(
        self,
        config: VocabularyConfig,
        entities: Callable[[str | None, AdjectiveForm], list[str]],
        embedder: Callable[[], TextEmbedder],
    ) -> None:
        self.config = config
        self.entities = entities
        self._embedder = embedder
        self._embed: TextEmbedder | None = None
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), D)`` embeddings, each text embedded once per pipeline."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        if missing:
            if self._embed is None:
                self._embed = self._embedder()
            for text, row in zip(missing, self._embed(missing), strict=True):
                self._cache[text] = row
        return torch.stack([self._cache[text] for text in texts])

    def __call__(self, caption: str | None, classes: list[str] | None) -> ImageVocabulary:
        """The vocabulary of one image; ``caption`` None: no captioner ran."""
        config = self.config
        closed = classes is not None and config.prune_with_caption
        adjectives: AdjectiveForm = (
            "head" if closed and config.adjective_entities == "head" else "phrase"
        )
        entities = self.entities(caption, adjectives)
        if classes is None:
            texts, candidates = open_label_texts(entities, config.open_distractors)
            warnings = () if entities else (_no_object(caption, "the whole image is background"),)
            return ImageVocabulary(entities, texts, candidates, warnings)
        if caption is None or not config.prune_with_caption:
            return ImageVocabulary(entities, classes, classes)
        if not entities:
            why = "it cannot prune the classes; every class stays a candidate"
            return ImageVocabulary(entities, classes, classes, (_no_object(caption, why),))
        candidates = prune_classes(
            entities, classes, self.embed, config.class_template, config.multiword_classes
        )
        return ImageVocabulary(entities, classes, candidates)


def _no_object(caption: str | None, consequence: str) -> str:
    return f"the caption {caption!r} names no object, so {consequence}"


def open_label_texts(
    entities: Sequence[str], distractors: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Open vocabulary: ``(label texts, candidate texts)`` of one caption (docs/method.md, step 9).

    The label texts CLIP scores are ``distractors`` followed by the entities not among them, in
    caption order, a repeated entity repeated (the released script: the 19 VOC names, then the
    caption's words; the softmax runs over all of them). Candidates, the texts a cluster may
    take, are the label texts that are entities (a distractor the caption names is one).

    Example:
        >>> open_label_texts(["cat", "sofa", "cushion", "cushion"], ["cat", "dog"])
        (['cat', 'dog', 'sofa', 'cushion', 'cushion'], ['cat', 'sofa', 'cushion', 'cushion'])
    """
    distractors = list(distractors)
    named = set(entities)
    texts = distractors + [entity for entity in entities if entity not in distractors]
    return texts, [text for text in texts if text in named]


def text_embedder(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    device: str | torch.device,
    dtype: torch.dtype,
    batch_size: int = 64,
) -> TextEmbedder:
    """Build a function that embeds texts with the Stable Diffusion CLIP text encoder.

    Each text is tokenized as Stable Diffusion tokenizes a prompt (padded with the pad token to
    ``max_length`` = the tokenizer's ``model_max_length``, 77 for SD 1.x, and truncated to it),
    encoded without an attention mask (as SD 1.x does: its text encoder does not use one), and
    its ``last_hidden_state`` is averaged over **all** ``max_length`` positions, padding
    included. That is what the released script computes: ``pipe._encode_prompt(text).mean(1)``
    on the full ``(1, 77, 768)`` prompt embedding, both for the entities and for the class
    prompts. Because of the causal attention, the padding states are functions of the real
    tokens, and with a fixed 77 positions they make up most of the mean.

    Args:
        tokenizer: a ``transformers`` ``CLIPTokenizer`` (SD's ``tokenizer`` folder).
        text_encoder: the matching ``CLIPTextModel``, already on ``device``; it is not moved.
        device: where the token ids are sent (the text encoder's device).
        dtype: the dtype of the prompt embeddings in the pipeline; the hidden states are cast to
            it (as diffusers does with prompt embeddings) before being averaged in float32.
        batch_size: texts per text-encoder forward.

    Returns:
        ``embed(texts) -> (N, D)`` float32 CPU tensor, one row per text, D the encoder's hidden
        size (768 for SD 1.x). Computed under ``torch.inference_mode()``; an empty sequence
        gives a ``(0, D)`` tensor.

    Example:
        >>> embed = text_embedder(pipe.tokenizer, pipe.text_encoder, "cuda", torch.float16)
        ... # doctest: +SKIP
        >>> embed(["cat", "A photo of dog"]).shape  # doctest: +SKIP
        torch.Size([2, 768])
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    config: Any = text_encoder.config
    hidden_size = int(config.hidden_size)
    # Some tokenizers report a huge model_max_length when unset; the position table bounds it.
    max_length = min(int(tokenizer.model_max_length), int(config.max_position_embeddings))

    def embed(texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string: wrap it in [ ]")
        texts = list(texts)
        if not texts:
            return torch.empty(0, hidden_size)
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = tokenizer(
                    texts[start : start + batch_size],
                    padding="max_length",
                    max_length=max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                states = text_encoder(tokens.input_ids.to(device)).last_hidden_state  # (B, L, D)
                states = states.to(dtype).float()
                rows.append(states.mean(dim=1).cpu())  # (B, L, D) -> (B, D)
        return torch.cat(rows)

    return embed


def load_text_embedder(
    name: str, device: torch.device, dtype: torch.dtype, load: Any = None
) -> TextEmbedder:
    """:func:`text_embedder` of Stable Diffusion ``name``'s text encoder and tokenizer alone
    (its ``text_encoder`` and ``tokenizer`` folders; the VAE and UNet are not loaded).

    For closed-vocabulary pruning when the features come from a ViT backbone, which has no text
    encoder: the pruning is then the one Stable Diffusion features get. ``name``: a Hub id, a
    diffusers folder or ``tiny:stable-diffusion``; ``load``: a
    :class:`~freesegdiff.infra.hub.LoadOptions`.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    from freesegdiff.infra.devices import frozen
    from freesegdiff.infra.hub import load_pretrained
    from freesegdiff.infra.weights import load_model

    options: dict[str, Any] = {"what": "Stable Diffusion", "flag": "--diffusion-model"}
    options["load"] = load
    model = load_model(
        CLIPTextModel.from_pretrained,
        name,
        subfolder="text_encoder",
        dtype=dtype,
        device=device,
        **options,
    )
    tokenizer = load_pretrained(
        CLIPTokenizer.from_pretrained, name, subfolder="tokenizer", **options
    )
    return text_embedder(tokenizer, frozen(model, device, dtype), device, dtype)


def correlation_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One minus the Pearson correlation of every row of ``a`` with every row of ``b``.

    The same as ``scipy.spatial.distance.cdist(a, b, "correlation")``: each row is centred on its
    own mean, then ``1 - cos`` of the centred rows. 0 for perfectly correlated rows, 1 for
    uncorrelated, 2 for anti-correlated; a constant row gives NaN (as scipy).

    Args:
        a: ``(N, D)``.
        b: ``(M, D)``.

    Returns:
        ``(N, M)`` float64 on ``a``'s device (computed in float64, as scipy).

    Example:
        >>> rows = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
        >>> correlation_distance(torch.tensor([[1.0, 2.0, 3.0]]), rows).round(decimals=6)
        tensor([[0.0000, 2.0000, 0.5000]], dtype=torch.float64)
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected two 2-D tensors (N, D) and (M, D), got {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows must have the same length: {a.shape[1]} vs {b.shape[1]}")
    a = a.to(torch.float64)
    b = b.to(device=a.device, dtype=torch.float64)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return 1.0 - a @ b.T  # (N, D) @ (D, M) -> (N, M)


def candidate_indices(entity_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> list[int]:
    """Indices of the classes that the best-matching entities point to.

    Each entity (row of ``entity_embeddings``, ``(N, D)``) is matched to its nearest class (row
    of ``class_embeddings``, ``(M, D)``) by :func:`correlation_distance`, giving one nearest
    distance per entity. The threshold is the **mean of those N nearest distances** (not the
    mean of the whole N x M distance matrix), as the released script computes it
    (``np.mean(np.min(distances, axis=1))``). An entity whose nearest distance is at most that
    mean (ties within a relative 1e-6 included) keeps its nearest class.

    Returns:
        The kept class indices, ascending, each once. ``[]`` when N is 0.
    """
    if entity_embeddings.shape[0] == 0:
        return []
    distances = correlation_distance(entity_embeddings, class_embeddings)  # (N, M)
    nearest_distance, nearest_class = distances.min(dim=1)  # (N,), (N,)
    threshold = nearest_distance.mean()
    keep = nearest_distance <= threshold + _TIE_RTOL * threshold.abs() + _TIE_ATOL
    return sorted(set(nearest_class[keep].tolist()))


def class_embeddings(
    classes: Sequence[str],
    embed: TextEmbedder,
    template: str = "A photo of {}",
    multiword: MultiwordRule = "mean-of-words",
) -> torch.Tensor:
    """``(M, D)`` embeddings of class names for matching (docs/method.md, step 9).

    ``"whole"``: each name in the template (``"A photo of dining table"``).
    ``"mean-of-words"`` (released): a name of several words (split on white space) is the mean
    of the template's embedding over its words (``"A photo of dining"``, ``"A photo of
    table"``); a one-word name is embedded as with ``"whole"``.
    """
    if multiword not in ("mean-of-words", "whole"):
        raise ConfigError(
            f"vocabulary.multiword_classes must be 'mean-of-words' or 'whole', got {multiword!r}"
        )
    if multiword == "whole":
        return embed([template.format(name) for name in classes])
    words = [name.split() or [name] for name in classes]
    prompts = [template.format(word) for parts in words for word in parts]
    rows = embed(prompts)  # (sum of word counts, D)
    means, start = [], 0
    for parts in words:
        means.append(rows[start : start + len(parts)].mean(dim=0))
        start += len(parts)
    return torch.stack(means)


def prune_classes(
    entities: Sequence[str],
    classes: Sequence[str],
    embed: TextEmbedder,
    template: str = "A photo of {}",
    multiword: MultiwordRule = "mean-of-words",
) -> list[str]:
    """The classes of a closed vocabulary that the caption's entities point to.

    Args:
        entities: the caption's entities (:func:`freesegdiff.stages.entities.extract_entities`),
            each embedded as it is. Every entry counts once in the mean, repeated ones included.
            The released script matches an adjective entity by its head noun alone
            (``extract_entities(..., adjectives="head")``).
        classes: the dataset's class names.
        embed: ``texts -> (len(texts), D)`` embeddings, e.g. from :func:`text_embedder`.
        template: how a class name becomes the text that is embedded (``{}`` is the name).
        multiword: how a class name of several words is embedded (:func:`class_embeddings`).

    Returns:
        The candidate class names, each once, in the order of ``classes``: the nearest class of
        every entity whose nearest correlation distance is at most the mean, over the entities,
        of the nearest distances (see :func:`candidate_indices`). ``[]`` when there are no
        entities.

    Raises:
        EmptyVocabularyError: ``classes`` is empty.
        ConfigError: ``template`` has no ``{}`` for the class name, or ``multiword`` is unknown.

    Example:
        >>> prune_classes(["kitten", "puppy", "cloud"], ["cat", "dog", "car"], embed)
        ... # doctest: +SKIP
        ['cat', 'dog']
    """
    classes = list(classes)
    if not classes:
        raise EmptyVocabularyError(
            "the class list is empty: a closed vocabulary needs at least one class name "
            "(pass classes=None for an open vocabulary)"
        )
    if "{}" not in template:
        raise ConfigError(f"class template {template!r} must contain '{{}}' for the class name")
    entities = list(entities)
    if not entities:
        return []
    class_rows = class_embeddings(classes, embed, template, multiword)  # (M, D)
    entity_rows = embed(entities)  # (N, D)
    chosen = candidate_indices(entity_rows, class_rows)
    return list(dict.fromkeys(classes[index] for index in chosen))
