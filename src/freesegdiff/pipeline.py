"""The FreeSeg-Diff pipeline: builds the stages, owns the models, and calls the stages in order.

No algorithm lives here. The steps of :meth:`FreeSegDiff.segment_arrays` are those of
docs/method.md, each done by the stage that owns it, in :mod:`freesegdiff.stages`:

====  =====================  ==================================================
step  stage                  where
====  =====================  ==================================================
1     caption                ``captioner.py`` (:class:`Captioner`)
2, 9  entities, label texts  ``entities.py``, ``vocabulary.py`` (:class:`LabelVocabulary`)
3-7   features               ``features/`` (:class:`FeatureExtractor`)
8     clusters               ``clustering/`` (:class:`Clusterer`)
10-11 naming                 ``naming/`` (``classify.namer``: MaskNamer, DenseNamer)
12    refinement             ``refine/`` (:class:`Refiner`)
13    composition            ``compose.py`` (:func:`compose`)
14    back to the image size ``compose.py`` (:func:`resize_composition`)
====  =====================  ==================================================
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from freesegdiff.config import CaptionConfig, FeatureConfig, PipelineConfig, with_settings
from freesegdiff.errors import (
    ConfigError,
    FreeSegDiffError,
    ImageReadError,
)
from freesegdiff.infra import timing
from freesegdiff.infra.arrays import fit_longest_side
from freesegdiff.infra.devices import resolve_device, resolve_dtype, to_host
from freesegdiff.infra.hub import LoadOptions, check_models_available
from freesegdiff.infra.stream import poll
from freesegdiff.infra.timing import StageTimer
from freesegdiff.infra.tuning import RuntimeOptions, after_loading, tune_process
from freesegdiff.io.images import EncodedImage, ImageInput, load_image
from freesegdiff.result import BACKGROUND, SegmentationResult
from freesegdiff.stages.clustering import METHODS, Clusterer
from freesegdiff.stages.compose import Composition, compose, resize_composition
from freesegdiff.stages.entities import EntityExtractor
from freesegdiff.stages.features import EXTRACTORS, FeatureExtractor
from freesegdiff.stages.naming import NAMERS
from freesegdiff.stages.naming.masked_crops import MaskClassifier, Naming
from freesegdiff.stages.refine import REFINERS, Refiner
from freesegdiff.stages.vocabulary import (
    ImageVocabulary,
    LabelVocabulary,
    TextEmbedder,
    normalise_classes,
)

logger = logging.getLogger(__name__)


def _source_name(item: ImageInput) -> str | None:
    if isinstance(item, EncodedImage):
        return item.name
    return str(item) if isinstance(item, (str, Path)) else None


def _pretrained_text(
    name: str, device: torch.device, dtype: torch.dtype, load: LoadOptions
) -> TextEmbedder:
    from freesegdiff.stages.vocabulary import load_text_embedder

    return load_text_embedder(name, device, dtype, load)


@dataclass(frozen=True)
class ModelSource:
    """Where a pipeline's networks come from: three factories, given the names in
    :class:`~freesegdiff.config.ModelConfig`.

    ``features(name, feature_config, device, dtype, load, runtime) -> FeatureExtractor``
    (:class:`~freesegdiff.stages.features.diffusion.DiffusionFeatures` by default);
    ``clip(name, device, dtype, load) -> (CLIPModel, CLIPProcessor)``;
    ``captioner(name, caption_config, device, dtype, load, runtime) -> Captioner``;
    ``text(name, device, dtype, load) -> TextEmbedder``: Stable Diffusion's text encoder alone,
    for closed-vocabulary pruning when the features come from a ViT backbone (which has none).
    """

    features: Callable[..., FeatureExtractor]
    clip: Callable[..., tuple[Any, Any]]
    captioner: Callable[..., Any]
    text: Callable[..., TextEmbedder] = _pretrained_text


def _pretrained_features(
    name: str,
    config: FeatureConfig,
    device: torch.device,
    dtype: torch.dtype,
    load: LoadOptions,
    runtime: RuntimeOptions | None,
) -> FeatureExtractor:
    extractor = EXTRACTORS.get(config.extractor)
    features: FeatureExtractor = extractor.from_pretrained(
        name, config=config, device=device, dtype=dtype, load=load, runtime=runtime
    )
    return features


def _pretrained_clip(
    name: str, device: torch.device, dtype: torch.dtype, load: LoadOptions
) -> tuple[Any, Any]:
    from freesegdiff.stages.naming.masked_crops import load_clip

    return load_clip(name, dtype, load, device)


def _pretrained_captioner(
    name: str,
    config: CaptionConfig,
    device: torch.device,
    dtype: torch.dtype,
    load: LoadOptions,
    runtime: RuntimeOptions | None = None,
) -> Any:
    from freesegdiff.stages.captioner import Captioner

    return Captioner.from_pretrained(
        name, config=config, device=device, dtype=dtype, load=load, runtime=runtime
    )


# Each library's from_pretrained on Hub ids, local folders in the Hub's layouts, or tiny: names.
PRETRAINED = ModelSource(_pretrained_features, _pretrained_clip, _pretrained_captioner)


def check_settings(config: PipelineConfig) -> tuple[torch.device, torch.dtype]:
    """Check what the settings need of this machine and of the stage registries; return the
    device and dtype.

    The values themselves were checked when ``config`` was made (each section of
    :mod:`freesegdiff.config` checks its own); here: the device and dtype this machine has, the
    optional packages the settings need, and that every implementation named is registered
    (``features.extractor``, ``clustering.method``, ``classify.namer``, ``refine.method``).
    Called by
    :meth:`FreeSegDiff.from_config` before any model loads; what depends on a model (layer
    names, sizes the UNet takes, the scheduler's timestep range) is checked when it loads.

    Raises:
        ConfigError: the first setting that cannot work here, named.
    """
    from freesegdiff.infra.extras import require_for_config

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    require_for_config(config)  # an optional package the settings need (pydensecrf, ...)
    EXTRACTORS.check(config.features.extractor)
    METHODS.check(config.clustering.method)
    NAMERS.check(config.classify.namer)
    REFINERS.check(config.refine.method)
    return device, dtype


def names_pixels(config: PipelineConfig) -> bool:
    """True when ``config`` names every pixel (the dense namer without regions): no feature
    extractor and no clustering run, and their models never load."""
    return config.classify.namer == "dense" and config.dense.regions == "pixels"


def unused_models(config: PipelineConfig, pruning: bool = False) -> tuple[str, ...]:
    """The fields of ``config.models`` a pipeline of ``config`` never loads (not checked).

    ``pruning``: the caller passes class lists (closed vocabulary); a ViT pipeline, or one that
    names pixels, then loads Stable Diffusion's text encoder to prune them with the caption, so
    the diffusion model is needed. Otherwise a ViT pipeline needs no diffusion model, a Stable
    Diffusion one no backbone, and one that names pixels neither.
    """
    prunes = pruning and config.vocabulary.prune_with_caption and config.models.captioner
    if names_pixels(config):
        return ("backbone",) if prunes else ("backbone", "diffusion")
    if config.features.extractor != "vit":
        return ("backbone",)
    return () if prunes else ("diffusion",)


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
        features: FeatureExtractor | None,
        classifier: MaskClassifier,
        captioner: Any | None = None,
        text_embedder: Callable[[], TextEmbedder] | None = None,
        entities: Callable[..., list[str]] | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> None:
        self.config = config
        # closed-vocabulary text embeddings: the features' text encoder, unless given (ViT)
        self._text_source = text_embedder
        # (no feature stage when the namer names pixels: the CLIP model's device and dtype)
        self.device = features.device if features is not None else classifier.device
        self.dtype = features.dtype if features is not None else classifier.dtype
        # The stages, each built from its config section (settings are read here, once).
        self.captioner = captioner
        self.vocabulary = LabelVocabulary(
            config.vocabulary,
            entities if entities is not None else EntityExtractor(config.entities),
            self.text_embedder,
        )
        self.features = features
        self.clusterer = Clusterer(config.clustering, config.seed)
        self.classifier = classifier
        self.namer = NAMERS.get(config.classify.namer).from_classifier(classifier, config)
        self.refiner = Refiner(config.refine, self.device, runtime)
        self.runtime = runtime
        self._model_lock = threading.Lock()
        self._refine_threads: Any = None
        self.last_stream: Any = None  # the last streamed run's executor (its stats)

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        config: PipelineConfig,
        *,
        runtime: RuntimeOptions | None = None,
        source: ModelSource | None = None,
        entities: Callable[..., list[str]] | None = None,
    ) -> FreeSegDiff:
        """Build the pipeline of ``config``: check its settings, get its models, build the stages.

        Args:
            runtime: speed and memory tuning (:mod:`freesegdiff.infra.tuning`), e.g.
                ``RuntimeOptions.fast()``; None (default) leaves the process and the models
                as they are. The command line switches it on.
            source: where the networks come from; None: :data:`PRETRAINED`, each library's
                ``from_pretrained`` on the names of ``config.models`` (Hub id, folder or
                ``tiny:``). ``freesegdiff bench`` passes random weights in real architectures.
            entities: the entity stage to use instead of one built from ``config.entities``
                (an ablation grid's, whose entity lists are shared between runs).
        """
        device, dtype = check_settings(config)  # before any model loads
        vit = config.features.extractor == "vit"
        pixels = names_pixels(config)
        if source is None or source is PRETRAINED:  # every missing model in one message
            check_models_available(config.models, skip=unused_models(config))
        source = source or PRETRAINED
        if runtime is not None:
            tune_process(runtime)  # before loading: weights get their own mappings
        models = config.models
        load = LoadOptions.of(models)
        features = None
        if not pixels:  # a namer of pixels needs no features
            feature_model = models.backbone if vit else models.diffusion
            features = source.features(feature_model, config.features, device, dtype, load, runtime)
            features.release_unused()  # the VAE decoder and the UNet's tail are never run
            if runtime is not None:
                after_loading(runtime)  # give the freed modules' memory back
        clip, processor = source.clip(models.clip, device, dtype, load)
        classify = config.classify
        classifier = MaskClassifier(
            clip,
            processor,
            device,
            dtype,
            template=classify.label_template,
            batch_size=classify.batch_size,
            image_processing=classify.image_processing,
        )
        captioner = None
        if models.captioner:
            captioner = source.captioner(
                models.captioner, config.caption, device, dtype, load, runtime
            )
        if runtime is not None:
            after_loading(runtime)  # copies left behind by dtype and layout conversions
        text = None
        if vit or pixels:  # no SD text encoder loaded: prune with it, loaded on first use
            text = partial(source.text, models.diffusion, device, dtype, load)
        return cls(
            config,
            features=features,
            classifier=classifier,
            captioner=captioner,
            text_embedder=text,
            entities=entities,
            runtime=runtime,
        )

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

        changes: dict[str, Any] = dict(overrides or {})
        if device is not None:
            changes["device"] = device
        if dtype is not None:
            changes["dtype"] = dtype
        if seed != "preset":
            changes["seed"] = seed
        return cls.from_config(with_settings(load_preset(name), changes))

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
            with timer(timing.IO):
                arrays = [self._load(item) for item in chunk]
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
        for name, outcome, _ in self.iter_segment_with_images(inputs, classes, prefetch):
            yield name, outcome

    def iter_segment_with_images(
        self,
        inputs: Iterable[ImageInput],
        classes: Sequence[str] | None = None,
        prefetch: int = 2,
    ) -> Iterator[tuple[str, SegmentationResult | FreeSegDiffError, np.ndarray | None]]:
        """As :meth:`iter_segment`, with each image's ``(H, W, 3)`` uint8 pixels as read (None
        when it could not be read), so that writing outputs need not decode it again.

        With ``runtime.stream`` (:class:`~freesegdiff.infra.tuning.RuntimeOptions`, what the
        CLI uses) the batches are streamed (:meth:`_iter_streamed`): the same batches, the
        same results, the stage groups of different batches overlapped.
        """
        names = normalise_classes(classes)
        if self.runtime is not None and self.runtime.streams(self.device):
            yield from self._iter_streamed(inputs, names, prefetch)
            return
        step = max(1, self.config.batch_size)
        loaded: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch) * step)
        done = object()

        def reader() -> None:
            try:
                for index, item in enumerate(inputs):
                    name = _source_name(item) or f"image-{index}"
                    outcome = self._read(name, item)  # never raises: a dead reader would hang
                    if isinstance(outcome, FreeSegDiffError):
                        loaded.put((name, outcome, 0.0))
                    else:
                        loaded.put((name, *outcome))
            finally:
                loaded.put(done)

        thread = threading.Thread(target=reader, name="freesegdiff-reader", daemon=True)
        thread.start()
        pending: list[tuple[str, np.ndarray, float]] = []
        finished = False
        while not finished:
            entry = poll(loaded)
            if entry is done:
                finished = True
            else:
                name, payload, seconds = entry
                if isinstance(payload, FreeSegDiffError):
                    yield name, payload, None
                    continue
                pending.append((name, payload, seconds))
            if pending and (len(pending) == step or finished):
                yield from self._segment_guarded(pending, names)
                pending = []
        thread.join()

    def _iter_streamed(
        self, inputs: Iterable[ImageInput], classes: list[str] | None, prefetch: int = 2
    ) -> Iterator[tuple[str, SegmentationResult | FreeSegDiffError, np.ndarray | None]]:
        """:meth:`iter_segment_with_images` through the streaming executor
        (:mod:`freesegdiff.infra.stream`; docs/method.md, runtime settings).

        The groups: reading (the source thread), caption (steps 1, 2, 9), features (3-7),
        clustering and naming (8, 10, 11), refinement (12: each image's masks a task of
        :meth:`refine_threads`, so images refine side by side in the CRF worker processes) and
        composition (13, 14); the caller writes. Where the compute groups do not overlap
        (``runtime.overlap``; by default on the CPU, whose cores the models' kernels already
        fill: CRF processes or a second kernel beside them only oversubscribe the cores, which
        measured 20 % slower), steps 1-12 run in one thread as in the serial path, and reading,
        composition and writing overlap them. Batches are the serial path's (the next
        ``batch_size`` readable images), so every result is the serial one. A batch that fails
        in any group is segmented again image by image, serially, as the serial path does; an
        image that cannot be read fails alone. Outcomes are yielded in input order.
        """
        from freesegdiff.infra.stream import Group, Item, Stream

        step = max(1, self.config.batch_size)
        runtime = self.runtime
        assert runtime is not None
        # Without overlap (the CPU's default) one thread computes, taking turns with the
        # serial retries below; on CUDA the groups launch their work side by side.
        overlap = runtime.overlaps(self.device)
        models: Any = nullcontext() if overlap else self._model_lock

        def read() -> Iterator[Any]:
            pending: list[tuple[int, str, np.ndarray, float]] = []
            for index, item in enumerate(inputs):
                name = _source_name(item) or f"image-{index}"
                outcome = self._read(name, item)
                if isinstance(outcome, FreeSegDiffError):
                    yield Item(_Unread(index, name), error=outcome)
                    continue
                pending.append((index, name, *outcome))
                if len(pending) == step:
                    yield self._loaded_batch(pending, classes)
                    pending = []
            if pending:
                yield self._loaded_batch(pending, classes)

        composition = Group("composition", lambda batch: (batch, self._compose(batch)))
        if overlap:  # each compute group its own thread; images refine side by side
            groups = [
                Group("caption", self._describe),
                Group("features", self._extract),
                Group("naming", self._name),
                Group("refinement", partial(self._refine, threads=self.refine_threads())),
                composition,
            ]
        else:  # one thread computes, as the serial path; reading and composition overlap it
            groups = [Group("compute", self._compute, models), composition]
        stream = Stream(groups, depth=max(1, prefetch))
        self.last_stream = stream
        done: dict[int, tuple[str, SegmentationResult | FreeSegDiffError, np.ndarray | None]] = {}
        following = 0
        for item in stream.run(read()):
            payload = item.payload
            if isinstance(payload, _Unread):
                assert isinstance(item.error, FreeSegDiffError)
                done[payload.index] = (payload.name, item.error, None)
            else:
                batch = payload if item.error is not None else payload[0]
                if item.error is None:
                    for (index, name, _), image, result in zip(
                        batch.entries, batch.images, payload[1], strict=True
                    ):
                        done[index] = (name, result, image)
                elif len(batch.entries) == 1:  # as the serial path: this image fails
                    (index, name, _), image = batch.entries[0], batch.images[0]
                    logger.error("segmenting %s failed", name, exc_info=item.error)
                    message = f"segmenting {name} failed: {item.error}"
                    done[index] = (name, FreeSegDiffError(message), image)
                else:  # as the serial path: again, image by image, here
                    for (index, name, seconds), image in zip(
                        batch.entries, batch.images, strict=True
                    ):
                        with models:
                            (done[index],) = self._segment_guarded(
                                [(name, image, seconds)], classes
                            )
            while following in done:
                yield done.pop(following)
                following += 1

    def _compute(self, batch: _Batch) -> _Batch:
        """Steps 1-12 of a batch, one group after another (a stream without overlap)."""
        return self._refine(self._name(self._extract(self._describe(batch))))

    def refine_threads(self) -> Any:
        """The threads a streamed run refines its images in (one per CRF worker process, else
        one), started on first use and kept for the pipeline's life."""
        if self._refine_threads is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = self.refiner.pool
            count = max(1, pool.processes if pool is not None else 1)
            self._refine_threads = ThreadPoolExecutor(
                count, thread_name_prefix="freesegdiff-refine"
            )
        return self._refine_threads

    def _read(self, name: str, item: ImageInput) -> tuple[np.ndarray, float] | FreeSegDiffError:
        """One input's pixels and reading seconds, or the error that says why it cannot be read
        (never raised: a reader that died would end the run)."""
        timer = StageTimer()
        try:
            with timer(timing.IO):
                array = self._load(item)
        except FreeSegDiffError as error:
            return error
        except Exception as error:
            return ImageReadError(f"cannot read {name}: {type(error).__name__}: {error}")
        return array, timer.seconds[timing.IO]

    def _loaded_batch(
        self, entries: list[tuple[int, str, np.ndarray, float]], classes: list[str] | None
    ) -> _Batch:
        """A :class:`_Batch` of read images with their reading seconds on its timer."""
        batch = _Batch(
            [array for _, _, array, _ in entries],
            [name for _, name, _, _ in entries],
            classes,
            self._reading_timer(seconds for _, _, _, seconds in entries),
            entries=[(index, name, seconds) for index, name, _, seconds in entries],
        )
        return self._check_batch(batch)

    def _segment_guarded(
        self, batch: list[tuple[str, np.ndarray, float]], classes: list[str] | None
    ) -> Iterator[tuple[str, SegmentationResult | FreeSegDiffError, np.ndarray]]:
        """Segment a batch; on failure retry image by image so one bad image loses only itself."""
        try:
            results = self._segment_loaded(batch, classes)
        except Exception as error:  # isolate the culprit below
            if len(batch) == 1:
                name, image, _ = batch[0]
                logger.exception("segmenting %s failed", name)
                yield name, FreeSegDiffError(f"segmenting {name} failed: {error}"), image
                return
            for one in batch:
                yield from self._segment_guarded([one], classes)
            return
        for (name, image, _), result in zip(batch, results, strict=True):
            yield name, result, image

    def _segment_loaded(
        self, batch: list[tuple[str, np.ndarray, float]], classes: list[str] | None
    ) -> list[SegmentationResult]:
        timer = self._reading_timer(seconds for _, _, seconds in batch)
        return self.segment_arrays(
            [array for _, array, _ in batch], [name for name, _, _ in batch], classes, timer
        )

    def _reading_timer(self, seconds: Iterable[float]) -> StageTimer:
        """A fresh timer of a batch, its images' reading seconds already on it."""
        timer = StageTimer(self.device)
        timer.seconds[timing.IO] = sum(seconds)
        return timer

    def _load(self, item: ImageInput) -> np.ndarray:
        """One image as ``(H, W, 3)`` uint8, within ``limits.max_pixels`` (docs/method.md)."""
        limits = self.config.limits
        return load_image(item, max_pixels=limits.max_pixels, oversize=limits.oversize)

    # ------------------------------------------------------------------------------ stages
    def release_text_encoder(self) -> None:
        """Free the SD text encoder (0.25 GB in bfloat16) for runs without class lists.

        Open vocabulary needs it only for the empty prompt, which is embedded first. Afterwards
        a call with ``classes`` (and caption pruning on) raises :class:`ConfigError`.
        """
        if self.features is not None:
            self.features.release_text_encoder()

    def text_embedder(self) -> TextEmbedder:
        """The embedder that matches entities to classes: the feature stage's text encoder, or
        (features from a ViT backbone) Stable Diffusion's, loaded when first needed."""
        if self._text_source is not None:
            return self._text_source()
        assert self.features is not None  # set: no text source means features are there
        embedder: TextEmbedder = self.features.text_embedder()
        return embedder

    def segment_arrays(
        self,
        images: Sequence[np.ndarray],
        sources: Sequence[str | None],
        classes: list[str] | None = None,
        timer: StageTimer | None = None,
    ) -> list[SegmentationResult]:
        """Segment a batch of RGB uint8 ``(H, W, 3)`` arrays (every model runs once per batch).

        The steps of docs/method.md, each a call of its stage (see the module docstring), in
        the four groups a streamed run overlaps across batches (:meth:`iter_segment`).
        """
        batch = self._check_batch(_Batch(list(images), list(sources), classes, timer))
        self._describe(batch)  # 1, 2, 9
        self._extract(batch)  # 3-7
        self._name(batch)  # 8, 10, 11
        self._refine(batch)  # 12
        return self._compose(batch)  # 13, 14

    def _check_batch(self, batch: _Batch) -> _Batch:
        if batch.classes is None and self.captioner is None:
            raise ConfigError(
                "open vocabulary needs a captioner to name things: set models.captioner "
                "(--captioner-model) or give class names (classes=[...], --classes)"
            )
        if batch.timer is None:
            batch.timer = StageTimer(self.device)
        return batch

    def _describe(self, batch: _Batch) -> _Batch:
        """Steps 1, 2 and 9: captions, their entities and each image's label texts."""
        timer = batch.timer
        assert timer is not None
        # 1. caption (None each without a captioner)
        batch.captions = [None] * len(batch.images)
        if self.captioner is not None:
            with timer(timing.CAPTION):
                batch.captions = list(self.captioner.caption(batch.images))
        # 2, 9. entities and label texts
        with timer(timing.ENTITIES):
            batch.vocabularies = [
                self.vocabulary(caption, batch.classes) for caption in batch.captions
            ]
        return batch

    def _extract(self, batch: _Batch) -> _Batch:
        """Steps 3-7: the diffusion (or ViT) features ``(B, C, F, F)``, unless the namer names
        pixels."""
        if not self.namer.names_pixels:
            assert self.features is not None and batch.timer is not None
            batch.features = self.features(batch.images, seed=self.config.seed, timer=batch.timer)
        return batch

    def _name(self, batch: _Batch) -> _Batch:
        """Steps 8, 10 and 11: class-agnostic masks, and CLIP's name for each (or for every
        pixel); the masks come to the host as ``(K, h, w)`` bool arrays."""
        timer = batch.timer
        assert timer is not None
        # Steps 8-13 work at most at the working size (limits.working_size); steps 1-7
        # resize the images themselves, from the full-size pixels.
        batch.work = [
            fit_longest_side(image, self.config.limits.working_size) for image in batch.images
        ]
        batch.cluster_maps = [None] * len(batch.images)
        if batch.features is not None:
            # 8. class-agnostic masks: one (h, w) cluster map per image, at the working size
            with timer(timing.CLUSTERING):
                batch.cluster_maps = [
                    self.clusterer(batch.features[i], len(vocabulary.candidates), image.shape[:2])
                    for i, (image, vocabulary) in enumerate(
                        zip(batch.work, batch.vocabularies, strict=True)
                    )
                ]
            batch.features = None  # (B, C, F, F) no longer needed
        # 10, 11. CLIP names every cluster (or every pixel: its own regions)
        with timer(timing.CLIP):
            batch.namings = self.namer(batch.work, batch.cluster_maps, batch.vocabularies)
            batch.coarse = [to_host(naming.masks).numpy() for naming in batch.namings]
        return batch

    def _refine(self, batch: _Batch, threads: Any = None) -> _Batch:
        """Step 12: each image's kept masks refined, here or (streamed) as tasks of the
        ``threads`` executor that :meth:`_compose` waits for."""
        for image, naming, coarse in zip(batch.work, batch.namings, batch.coarse, strict=True):
            kept = coarse[naming.kept]
            if threads is None:
                batch.refined.append(_timed_refinement(self.refiner, image, kept))
            else:
                batch.refined.append(threads.submit(_timed_refinement, self.refiner, image, kept))
        return batch

    def _compose(self, batch: _Batch) -> list[SegmentationResult]:
        """Steps 13 and 14: each image's label map at its own size, and its result."""
        assert batch.timer is not None
        shared = batch.timer.split(len(batch.images))
        results = []
        for index, (image, naming) in enumerate(zip(batch.work, batch.namings, strict=True)):
            image_timer = StageTimer(self.device)
            coarse = batch.coarse[index]
            refinement = batch.refined[index]
            refined_kept, seconds = (
                refinement if isinstance(refinement, tuple) else refinement.result()
            )
            image_timer.seconds[timing.REFINEMENT] = seconds
            # 13. composition; 14. the label map at the image's size
            with image_timer(timing.COMPOSITION):
                composition = compose(
                    refined_kept,
                    naming.kept,
                    naming.cluster_labels,
                    batch.vocabularies[index].texts,
                    naming.scores,
                    image.shape[:2],
                )
                composition = resize_composition(composition, batch.images[index].shape[:2])
            refined = np.zeros_like(coarse)
            refined[naming.kept] = refined_kept
            timings = {**shared, **image_timer.seconds}
            results.append(
                _result(
                    batch.images[index],
                    batch.sources[index],
                    batch.captions[index],
                    batch.vocabularies[index],
                    _cluster_map(naming, batch.cluster_maps[index]),
                    naming,
                    composition,
                    coarse,
                    refined,
                    timings,
                )
            )
        return results


@dataclass
class _Batch:
    """One batch of images on its way through the steps (see :meth:`FreeSegDiff.segment_arrays`):
    each group of steps fills its fields."""

    images: list[np.ndarray]
    sources: list[str | None]
    classes: list[str] | None
    timer: StageTimer | None = None
    captions: list[str | None] = field(default_factory=list)
    vocabularies: list[ImageVocabulary] = field(default_factory=list)
    features: torch.Tensor | None = None
    work: list[np.ndarray] = field(default_factory=list)
    cluster_maps: list[torch.Tensor | None] = field(default_factory=list)
    namings: list[Naming] = field(default_factory=list)
    coarse: list[np.ndarray] = field(default_factory=list)
    refined: list[Any] = field(default_factory=list)  # (masks, seconds) or a future of them
    # streamed runs: each image's input index, name and reading seconds
    entries: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Unread:
    """An input that could not be read, at its place in the input order."""

    index: int
    name: str


def _timed_refinement(
    refiner: Refiner, image: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, float]:
    """Step 12 for one image: its refined ``(N, h, w)`` bool masks and the seconds taken."""
    began = time.perf_counter()
    refined = refiner(image, masks)
    return refined, time.perf_counter() - began


def _cluster_map(naming: Naming, clustered: torch.Tensor | None) -> torch.Tensor:
    """The image's regions: the namer's own (it named pixels) or the clusters of step 8."""
    regions = naming.cluster_map if naming.cluster_map is not None else clustered
    assert regions is not None
    return regions


def _result(
    image: np.ndarray,
    source: str | None,
    caption: str | None,
    vocabulary: ImageVocabulary,
    cluster_map: torch.Tensor,
    naming: Naming,
    composition: Composition,
    coarse: np.ndarray,
    refined: np.ndarray,
    timings: dict[str, float],
) -> SegmentationResult:
    """The stages' outputs for one image, as the plain data the caller receives."""
    return SegmentationResult(
        label_map=composition.label_map,
        labels={0: BACKGROUND, **{s.id: s.label for s in composition.segments}},
        segments=composition.segments,
        caption=caption,
        entities=list(vocabulary.entities),
        vocabulary=list(vocabulary.texts),
        candidates=list(vocabulary.candidates),
        cluster_map=cluster_map.cpu().numpy().astype(np.int32),
        scores=naming.scores,
        cluster_labels=naming.cluster_labels,
        coarse_masks=coarse,
        refined_masks=refined,
        timings=timings,
        source=source,
        image_size=(int(image.shape[1]), int(image.shape[0])),
        warnings=list(vocabulary.warnings),
    )


def __getattr__(name: str) -> Any:
    from freesegdiff import _moved

    return _moved.moved_name(__name__, name)  # names of 0.1 that live elsewhere now
