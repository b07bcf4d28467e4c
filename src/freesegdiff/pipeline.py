"""The FreeSeg-Diff pipeline: wires the stages and owns the models; no algorithm lives here.

caption -> entities -> (closed vocabulary: prune classes) -> diffusion features -> k-means
-> CLIP scores -> assignment -> refinement -> composition
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from freesegdiff.classify import MaskClassifier, assign_labels
from freesegdiff.clustering import cluster_features, upsample_cluster_map
from freesegdiff.compose import compose_label_map
from freesegdiff.config import PipelineConfig, set_by_path
from freesegdiff.devices import resolve_device, resolve_dtype
from freesegdiff.entities import AdjectiveForm
from freesegdiff.errors import ConfigError, EmptyVocabularyError, FreeSegDiffError
from freesegdiff.features import DiffusionFeatures
from freesegdiff.image_io import ImageInput, load_image
from freesegdiff.refine import refine_masks
from freesegdiff.result import BACKGROUND, Segment, SegmentationResult
from freesegdiff.timing import StageTimer

logger = logging.getLogger(__name__)


def _source_name(item: ImageInput) -> str | None:
    return str(item) if isinstance(item, (str, Path)) else None


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


class FreeSegDiff:
    """Training-free open-vocabulary segmentation of images.

    Build it with :meth:`from_preset` or :meth:`from_config`; models are loaded once and reused
    for every call. Call it on one image (path, PIL image or array) to get one
    :class:`SegmentationResult`, or on a list to get a list.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        features: DiffusionFeatures,
        classifier: MaskClassifier,
        captioner: Any | None = None,
    ) -> None:
        self.config = config
        self.device = features.device
        self.dtype = features.dtype
        self.features = features
        self.classifier = classifier
        self.captioner = captioner
        self._nlp: Any | None = None
        self._embed: Callable[[Sequence[str]], torch.Tensor] | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: PipelineConfig) -> FreeSegDiff:
        """Load every model the config names (Hub id, local folder or ``tiny:``)."""
        from freesegdiff.memory import retain_freed_memory, trim_freed_memory

        retain_freed_memory()  # before loading: weights get their own mappings (lower peak)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        models = config.models
        hub: dict[str, Any] = {
            "offline": models.offline,
            "revision": models.revision,
            "cache_dir": models.cache_dir,
        }
        features = DiffusionFeatures.from_pretrained(
            models.diffusion, config=config.features, device=device, dtype=dtype, **hub
        )
        features.release_unused()  # the VAE decoder and the UNet's tail are never run
        classifier = MaskClassifier.from_pretrained(
            models.clip,
            device=device,
            dtype=dtype,
            template=config.classify.label_template,
            batch_size=config.classify.batch_size,
            image_processing=config.classify.image_processing,
            **hub,
        )
        captioner = None
        if models.captioner:
            from freesegdiff.captioner import Captioner

            captioner = Captioner.from_pretrained(
                models.captioner, config=config.caption, device=device, dtype=dtype, **hub
            )
        trim_freed_memory()  # copies left behind by dtype and layout conversions
        return cls(config, features=features, classifier=classifier, captioner=captioner)

    @classmethod
    def from_preset(
        cls,
        name: str = "paper",
        *,
        device: str | None = None,
        dtype: str | None = None,
        seed: int | str | None = "preset",
        overrides: dict[str, Any] | None = None,
    ) -> FreeSegDiff:
        """Load preset ``name`` (see ``available_presets()``), with optional changes.

        Args:
            device, dtype: override the preset's (e.g. ``"cuda"``, ``"bfloat16"``).
            seed: an int, None for unseeded, or leave as is for the preset's.
            overrides: dotted settings, e.g. ``{"clustering.k": 5, "features.timestep": 100}``.
        """
        from freesegdiff.presets import load_preset

        config = load_preset(name)
        if device is not None:
            config = set_by_path(config, "device", device)
        if dtype is not None:
            config = set_by_path(config, "dtype", dtype)
        if seed != "preset":
            config = set_by_path(config, "seed", seed)
        for key, value in (overrides or {}).items():
            config = set_by_path(config, key, value)
        return cls.from_config(config)

    # ------------------------------------------------------------------------------ calling
    @overload
    def __call__(
        self, images: ImageInput, classes: Sequence[str] | None = None
    ) -> SegmentationResult: ...

    @overload
    def __call__(
        self, images: list[ImageInput], classes: Sequence[str] | None = None
    ) -> list[SegmentationResult]: ...

    def __call__(
        self, images: ImageInput | list[ImageInput], classes: Sequence[str] | None = None
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image or a list of images.

        Args:
            images: a path, PIL image or ``(H, W[, C])`` array, or a list of them.
            classes: fixed vocabulary (class names); None: open vocabulary from the caption.

        Returns:
            one :class:`SegmentationResult` per image (a single one for a single image).
        """
        single = not isinstance(images, list)
        items: list[ImageInput] = images if isinstance(images, list) else [images]
        names = normalise_classes(classes)
        results: list[SegmentationResult] = []
        step = max(1, self.config.batch_size)
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            timer = StageTimer(self.device)
            with timer("io"):
                arrays = [load_image(item) for item in chunk]
            results.extend(
                self.segment_arrays(arrays, [_source_name(i) for i in chunk], names, timer)
            )
        return results[0] if single else results

    def iter_segment(
        self,
        inputs: Iterable[ImageInput],
        classes: Sequence[str] | None = None,
        prefetch: int = 2,
    ) -> Iterator[tuple[str, SegmentationResult | FreeSegDiffError]]:
        """Segment many images, batch by batch, never stopping at a bad one.

        Images are read in a background thread while the models work. Yields
        ``(source name, result or the error for that image)`` in input order; an image that
        fails in a batch is retried alone so the others of its batch still get results.
        """
        names = normalise_classes(classes)
        step = max(1, self.config.batch_size)
        loaded: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch) * step)
        done = object()

        def reader() -> None:
            for index, item in enumerate(inputs):
                name = _source_name(item) or f"image-{index}"
                timer = StageTimer()
                try:
                    with timer("io"):
                        array = load_image(item)
                    loaded.put((name, array, timer.seconds["io"]))
                except FreeSegDiffError as error:
                    loaded.put((name, error, 0.0))
            loaded.put(done)

        thread = threading.Thread(target=reader, name="freesegdiff-reader", daemon=True)
        thread.start()
        pending: list[tuple[str, np.ndarray, float]] = []
        finished = False
        while not finished:
            entry = loaded.get()
            if entry is done:
                finished = True
            else:
                name, payload, seconds = entry
                if isinstance(payload, FreeSegDiffError):
                    yield name, payload
                    continue
                pending.append((name, payload, seconds))
            if pending and (len(pending) == step or finished):
                yield from self._segment_guarded(pending, names)
                pending = []
        thread.join()

    def _segment_guarded(
        self, batch: list[tuple[str, np.ndarray, float]], classes: list[str] | None
    ) -> Iterator[tuple[str, SegmentationResult | FreeSegDiffError]]:
        """Segment a batch; on failure retry image by image so one bad image loses only itself."""
        try:
            results = self._segment_loaded(batch, classes)
        except Exception as error:  # isolate the culprit below
            if len(batch) == 1:
                name = batch[0][0]
                logger.exception("segmenting %s failed", name)
                yield name, FreeSegDiffError(f"segmenting {name} failed: {error}")
                return
            for one in batch:
                yield from self._segment_guarded([one], classes)
            return
        yield from zip([name for name, _, _ in batch], results, strict=True)

    def _segment_loaded(
        self, batch: list[tuple[str, np.ndarray, float]], classes: list[str] | None
    ) -> list[SegmentationResult]:
        timer = StageTimer(self.device)
        timer.seconds["io"] = sum(seconds for _, _, seconds in batch)
        return self.segment_arrays(
            [array for _, array, _ in batch], [name for name, _, _ in batch], classes, timer
        )

    # ------------------------------------------------------------------------------ stages
    def _spacy(self) -> Any:
        if self._nlp is None:
            from freesegdiff.entities import load_spacy

            self._nlp = load_spacy(self.config.entities.spacy_model)
        return self._nlp

    def release_text_encoder(self) -> None:
        """Free the SD text encoder (0.25 GB in bfloat16) for runs without class lists.

        Open vocabulary needs it only for the empty prompt, which is embedded first. Afterwards
        a call with ``classes`` (and caption pruning on) raises :class:`ConfigError`.
        """
        self.features.release_text_encoder()

    def _embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """SD text-encoder embeddings used to match entities to classes, cached per text."""
        if "text_encoder" in self.features.released:
            raise ConfigError(
                "this pipeline freed its text encoder for open-vocabulary runs "
                "(release_text_encoder), so it cannot match the caption against class names; "
                "build it again, or set vocabulary.prune_with_caption to false (--no-prune)"
            )
        if self._embed is None:
            from freesegdiff.vocabulary import text_embedder

            self._embed = text_embedder(
                self.features.tokenizer, self.features.text_encoder, self.device, self.dtype
            )
        missing = [text for text in dict.fromkeys(texts) if text not in self._text_cache]
        if missing:
            for text, row in zip(missing, self._embed(missing), strict=True):
                self._text_cache[text] = row
        return torch.stack([self._text_cache[text] for text in texts])

    def caption(self, images: Sequence[np.ndarray], timer: StageTimer) -> list[str | None]:
        """Captions of a batch (None each when the pipeline has no captioner)."""
        if self.captioner is None:
            return [None] * len(images)
        with timer("caption"):
            return list(self.captioner.caption(images))

    def vocabulary(
        self, caption: str | None, classes: list[str] | None, warnings: list[str]
    ) -> tuple[list[str], list[str], list[str]]:
        """``(entities, label texts, candidate texts)`` for one image (docs/method.md, step 9).

        Open vocabulary: the label texts are ``vocabulary.open_distractors`` followed by the
        entities not among them (repeated entities kept, as released); only texts that are
        entities are candidates. Closed vocabulary: the label texts are the classes; the
        caption's entities (adjectives as ``vocabulary.adjective_entities`` says) prune them.
        """
        from freesegdiff.entities import extract_entities
        from freesegdiff.vocabulary import open_label_texts

        settings = self.config.vocabulary
        closed = classes is not None and settings.prune_with_caption
        adjectives: AdjectiveForm = (
            "head" if closed and settings.adjective_entities == "head" else "phrase"
        )
        entities: list[str] = []
        if caption is not None:
            entities = extract_entities(
                caption, rule=self.config.entities.rule, nlp=self._spacy(), adjectives=adjectives
            )
        if classes is None:
            if not entities:
                warnings.append(
                    f"the caption {caption!r} names no object; the whole image is background"
                )
            texts, candidates = open_label_texts(entities, settings.open_distractors)
            return entities, texts, candidates
        if caption is None or not settings.prune_with_caption:
            return entities, classes, classes
        if not entities:
            warnings.append(
                f"the caption {caption!r} names no object, so it cannot prune the classes; "
                "every class stays a candidate"
            )
            return entities, classes, classes
        from freesegdiff.vocabulary import prune_classes

        candidates = prune_classes(
            entities,
            classes,
            self._embed_texts,
            settings.class_template,
            multiword=settings.multiword_classes,
        )
        return entities, classes, candidates

    def segment_arrays(
        self,
        images: Sequence[np.ndarray],
        sources: Sequence[str | None],
        classes: list[str] | None = None,
        timer: StageTimer | None = None,
    ) -> list[SegmentationResult]:
        """Segment a batch of RGB uint8 ``(H, W, 3)`` arrays (every model runs once per batch)."""
        if classes is None and self.captioner is None:
            raise ConfigError(
                "open vocabulary needs a captioner to name things: set models.captioner "
                "(--captioner-model) or give class names (classes=[...], --classes)"
            )
        timer = timer or StageTimer(self.device)
        count = len(images)
        config = self.config
        warnings: list[list[str]] = [[] for _ in images]
        captions = self.caption(images, timer)
        with timer("entities"):
            vocab = [
                self.vocabulary(c, classes, w) for c, w in zip(captions, warnings, strict=True)
            ]
        features = self.features(images, seed=config.seed, timer=timer)  # (B, C, F, F)
        cluster_maps = []
        with timer("clustering"):
            for index, image in enumerate(images):
                small = cluster_features(
                    features[index],
                    config.clustering,
                    candidates=len(vocab[index][2]),
                    seed=config.seed,
                )
                full = upsample_cluster_map(
                    small, image.shape[0], image.shape[1], config.clustering.upsample
                )
                cluster_maps.append(full)
        with timer("clip"):
            masks = [
                torch.stack([m == k for k in range(int(m.max()) + 1)]) for m in cluster_maps
            ]  # per image (K, H, W) bool on the device
            scores = self.classifier.score(
                [
                    (image, mask, labels)
                    for image, mask, (_, labels, _) in zip(images, masks, vocab, strict=True)
                ]
            )
        results = []
        per_image = timer.split(count)
        for index, image in enumerate(images):
            item_timer = StageTimer(self.device)
            entities, labels, candidates = vocab[index]
            candidate_set = set(candidates)
            allowed = np.array([label in candidate_set for label in labels], dtype=bool)
            cluster_labels = assign_labels(scores[index], allowed, config.classify.ties)
            coarse = masks[index].cpu().numpy()
            kept = [k for k, label in enumerate(cluster_labels) if label >= 0]
            with item_timer("refinement"):
                refined_kept = refine_masks(image, coarse[kept], config.refine, self.device)
            refined = np.zeros_like(coarse)
            refined[kept] = refined_kept
            with item_timer("composition"):
                ids = [cluster_labels[k] + 1 for k in kept]
                label_map = compose_label_map(refined_kept, ids, image.shape[:2])
                segments = []
                seen: set[int] = set()
                for k, label_id in zip(kept, ids, strict=True):
                    if label_id in seen:
                        continue  # a label kept by tied clusters is one segment, the union
                    seen.add(label_id)
                    mask = label_map == label_id
                    area = int(mask.sum())
                    if area == 0:
                        continue  # covered entirely by earlier masks
                    segments.append(
                        Segment(
                            id=label_id,
                            label=labels[label_id - 1],
                            score=float(scores[index][label_id - 1, k]),
                            area=area,
                            mask=mask,
                            cluster=k,
                        )
                    )
            timings = dict(per_image)
            timings.update(item_timer.seconds)
            results.append(
                SegmentationResult(
                    label_map=label_map,
                    labels={0: BACKGROUND, **{s.id: s.label for s in segments}},
                    segments=segments,
                    caption=captions[index],
                    entities=entities,
                    vocabulary=list(labels),
                    candidates=list(candidates),
                    cluster_map=cluster_maps[index].cpu().numpy().astype(np.int32),
                    scores=scores[index],
                    cluster_labels=cluster_labels,
                    coarse_masks=coarse,
                    refined_masks=refined,
                    timings=timings,
                    source=sources[index],
                    image_size=(int(image.shape[1]), int(image.shape[0])),
                    warnings=warnings[index],
                )
            )
        return results
