"""Naming the masks with CLIP (docs/method.md, steps 10 and 11).

Every cluster becomes one CLIP input: the whole image with every pixel outside the cluster set
to black. All masked images of a batch go through the vision tower in one forward; the text
embeddings of a label set are computed once and cached. The score of label ``t`` for cluster
``k`` is the softmax over the labels of CLIP's scaled cosine similarities.

The masked images are prepared either by transformers' own CLIP image processor (PIL on the
CPU, ``image_processing="processor"``: the released script's inputs, bit for bit) or by the same
resize, crop and normalisation in torch on the pipeline's device (``"torch"``: no host round
trip; pixels within one grey level of the processor's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.infra.arrays import image_tensor
from freesegdiff.infra.devices import frozen, to_device
from freesegdiff.infra.hub import LoadOptions, load_pretrained

ImageProcessing = Literal["processor", "torch"]
TieRule = Literal["all", "first"]


def _pooled(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output object (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _edge(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def load_clip(
    name: str,
    dtype: torch.dtype = torch.float32,
    load: LoadOptions | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a Hub id, a folder or ``tiny:clip``, the weights
    straight into ``dtype`` on ``device`` (:func:`freesegdiff.infra.weights.load_model`)."""
    from transformers import CLIPModel, CLIPProcessor

    from freesegdiff.infra.weights import load_model

    options: dict[str, Any] = {"what": "CLIP", "flag": "--clip-model", "load": load}
    model = load_model(CLIPModel.from_pretrained, name, dtype=dtype, device=device, **options)
    processor = load_pretrained(CLIPProcessor.from_pretrained, name, **options)
    return model, processor


class MaskClassifier:
    """CLIP scoring of masked images against label texts.

    Args:
        model: a transformers ``CLIPModel``; ``processor``: its ``CLIPProcessor``, whose image
            settings (resize, crop, mean, std) are applied here in torch on the model's device.
        template: how a label is written for CLIP (``"{}"``: the bare label, as the paper).
        batch_size: most masked images per vision forward.
        image_processing: ``"processor"`` (transformers' processor, as released) or
            ``"torch"`` (the same steps on ``device``); see the module docstring.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        template: str = "{}",
        batch_size: int = 64,
        cache_size: int = 256,
        image_processing: ImageProcessing = "processor",
    ) -> None:
        self.model = frozen(model, device, dtype)
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.template = template
        self.batch_size = batch_size
        self.image_processing = image_processing
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        images = processor.image_processor
        size = images.size
        self.shortest_edge = _edge(size, "shortest_edge")
        self.resize_to = (_edge(size, "height"), _edge(size, "width"))
        crop = images.crop_size if getattr(images, "do_center_crop", True) else None
        self.crop = (_edge(crop, "height"), _edge(crop, "width")) if crop is not None else None
        self.rescale = float(getattr(images, "rescale_factor", 1 / 255))
        self.mean = torch.tensor(images.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(images.image_std, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        template: str = "{}",
        batch_size: int = 64,
        image_processing: ImageProcessing = "processor",
        load: LoadOptions | None = None,
    ) -> MaskClassifier:
        """Load a transformers CLIP model and processor (Hub id, folder or ``tiny:clip``)."""
        model, processor = load_clip(name, dtype, load)
        return cls(
            model, processor, device, dtype, template, batch_size, image_processing=image_processing
        )

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``(T, D)`` unit-norm float32 embeddings of the label texts, cached per label set."""
        key = tuple(texts)
        cached = self._text_cache.get(key)
        if cached is not None:
            self._text_cache.move_to_end(key)
            return cached
        tokens = self.processor.tokenizer(
            [self.template.format(text) for text in texts],
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        embeddings = F.normalize(_pooled(self.model.get_text_features(**tokens)).float(), dim=-1)
        self._text_cache[key] = embeddings
        if len(self._text_cache) > self._cache_size:
            self._text_cache.popitem(last=False)
        return embeddings

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` float RGB in [0, 255] -> CLIP input ``(N, 3, S, S)``, as its processor:
        bicubic resize (shortest edge, aspect kept), centre crop, rescale, normalise."""
        height, width = pixels.shape[-2:]
        if self.shortest_edge is not None:
            short, long_ = (height, width) if height <= width else (width, height)
            new_long = int(self.shortest_edge * long_ / short)
            size = (
                (self.shortest_edge, new_long)
                if height <= width
                else (new_long, self.shortest_edge)
            )
        else:
            size = (self.resize_to[0] or height, self.resize_to[1] or width)
        if tuple(size) != (height, width):
            pixels = F.interpolate(
                pixels, size=size, mode="bicubic", align_corners=False, antialias=True
            )
        pixels = pixels.clamp(0, 255).round()  # the processor resizes uint8 images
        crop_h, crop_w = self.crop or (None, None)
        if crop_h and crop_w:
            # the crop's corner at the floor of half the margin, as the processor puts it
            top = max(0, (pixels.shape[-2] - crop_h) // 2)
            left = max(0, (pixels.shape[-1] - crop_w) // 2)
            pixels = pixels[..., top : top + crop_h, left : left + crop_w]
        return (pixels * self.rescale - self.mean) / self.std

    def masked_images(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        """The image ``(H, W, 3)`` uint8 blacked out outside each mask ``(K, H, W)`` bool,
        preprocessed: ``(K, 3, S, S)`` float32 on the device."""
        if self.image_processing == "processor":
            keep = masks.cpu().numpy().astype(np.uint8)[..., None]  # (K, H, W, 1)
            pictures = [np.ascontiguousarray(image) * mask for mask in keep]  # (H, W, 3) uint8
            # channels last said, not guessed: a 1 x 1 or 3 x 3 image is ambiguous to it
            inputs = self.processor.image_processor(
                images=pictures, return_tensors="pt", input_data_format="channels_last"
            )
            return inputs["pixel_values"].to(self.device, torch.float32)
        pixels = to_device(image_tensor(image), self.device).float()[None]  # (1, 3, H, W)
        masked = pixels * masks.to(self.device)[:, None].float()  # (K, 3, H, W)
        return self.preprocess(masked)

    @torch.inference_mode()
    def image_embeddings(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` preprocessed -> ``(N, D)`` unit-norm float32, in chunks."""
        chunks = []
        for start in range(0, inputs.shape[0], self.batch_size):
            batch = inputs[start : start + self.batch_size].to(self.dtype)
            chunks.append(_pooled(self.model.get_image_features(pixel_values=batch)).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def score(
        self, items: Sequence[tuple[np.ndarray, torch.Tensor, Sequence[str]]]
    ) -> list[np.ndarray]:
        """Score every mask of every image against that image's label texts.

        Args:
            items: per image ``(image (H, W, 3) uint8, masks (K, H, W) bool, label texts)``.

        Returns:
            per image a ``(T, K)`` float32 array of softmax probabilities over the T labels
            (each column sums to 1); ``(0, K)`` when the image has no labels.
        """
        todo = [index for index, (_, masks, texts) in enumerate(items) if texts and len(masks)]
        outputs = [np.zeros((len(texts), len(masks)), np.float32) for _, masks, texts in items]
        if not todo:
            return outputs
        inputs = torch.cat([self.masked_images(items[i][0], items[i][1]) for i in todo])
        image_features = self.image_embeddings(inputs)  # one vision pass for the whole batch
        scale = float(self.model.logit_scale.exp())
        offset = 0
        for index in todo:
            _, masks, texts = items[index]
            features = image_features[offset : offset + len(masks)]  # (K, D)
            offset += len(masks)
            logits = scale * self.text_embeddings(texts) @ features.T  # (T, K)
            outputs[index] = torch.softmax(logits, dim=0).cpu().numpy().astype(np.float32)
        return outputs


def assign_labels(
    scores: np.ndarray, candidates: np.ndarray | None = None, ties: TieRule = "all"
) -> list[int]:
    """The paper's assignment of labels to clusters (docs/method.md, step 11).

    1. rows of non-candidate labels are zeroed;
    2. in each row only the largest score is kept (a label claims one cluster); on an exact tie
       between clusters, ``ties="all"`` keeps it for every tied cluster (released), ``"first"``
       for the lowest cluster index only;
    3. each cluster takes the label with the largest kept score in its column (on a tie the
       lowest label index); a cluster whose kept scores are all zero is background.

    Args:
        scores: ``(T, K)`` label x cluster scores (non-negative).
        candidates: ``(T,)`` bool, which labels may be chosen; None: all.
        ties: ``"all"`` or ``"first"``, as above.

    Returns:
        per cluster, the index of its label in ``[0, T)``, or -1 for background.
    """
    if ties not in ("all", "first"):
        raise ValueError(f"ties must be 'all' or 'first', got {ties!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (labels, clusters), got shape {scores.shape}")
    labels, clusters = scores.shape
    if labels == 0 or clusters == 0:
        return [-1] * clusters
    kept = scores.copy()
    if candidates is not None:
        candidates = np.asarray(candidates, dtype=bool)
        if candidates.shape != (labels,):
            raise ValueError(f"candidates must be ({labels},), got {candidates.shape}")
        kept[~candidates] = 0.0
    if ties == "all":
        claimed = np.where(kept < kept.max(axis=1, keepdims=True), 0.0, kept)
    else:
        best_cluster = kept.argmax(axis=1)  # first maximum on ties
        claimed = np.zeros_like(kept)
        rows = np.arange(labels)
        claimed[rows, best_cluster] = kept[rows, best_cluster]
    choice = claimed.argmax(axis=0)
    return [int(c) if claimed[c, k] > 0 else -1 for k, c in enumerate(choice)]


def cluster_masks(cluster_map: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` cluster indices ``0..K-1`` -> ``(K, H, W)`` bool, one mask per index (an
    index no pixel has gives an empty mask)."""
    return torch.stack([cluster_map == k for k in range(int(cluster_map.max()) + 1)])


@dataclass(frozen=True)
class Naming:
    """Steps 10 and 11 for one image."""

    masks: torch.Tensor  # (K, H, W) bool cluster masks on the pipeline's device
    scores: np.ndarray  # (T, K) float32 CLIP probabilities, label text x cluster
    cluster_labels: list[int]  # per cluster, its label text index, or -1 (background)
    cluster_map: torch.Tensor | None = None  # (H, W) int64 cluster of each pixel, 0..K-1

    @property
    def kept(self) -> list[int]:
        """The clusters that keep a label, in cluster order."""
        return [k for k, label in enumerate(self.cluster_labels) if label >= 0]


class MaskNamer:
    """Stages 10 and 11: CLIP scores every cluster of a batch, then the assignment rule.

    Args:
        classifier: the CLIP scorer.
        ties: the assignment's tie rule (``classify.ties``).
    """

    names_pixels = False  # it names the clusters of step 8

    def __init__(self, classifier: MaskClassifier, ties: TieRule = "all") -> None:
        self.classifier = classifier
        self.ties: TieRule = ties

    @classmethod
    def from_classifier(cls, classifier: MaskClassifier, config: Any) -> MaskNamer:
        """The namer of ``config`` (a :class:`~freesegdiff.config.PipelineConfig`)."""
        return cls(classifier, config.classify.ties)

    def __call__(
        self,
        images: Sequence[np.ndarray],
        cluster_maps: Sequence[torch.Tensor],
        vocabularies: Sequence[Any],
    ) -> list[Naming]:
        """One :class:`Naming` per image.

        Args:
            images: ``(H, W, 3)`` uint8 RGB.
            cluster_maps: per image ``(H, W)`` int64 cluster indices ``0..K-1``.
            vocabularies: per image, anything with ``texts`` and ``candidates`` (an
                :class:`~freesegdiff.stages.vocabulary.ImageVocabulary`).
        """
        masks = [cluster_masks(cluster_map) for cluster_map in cluster_maps]
        items = [
            (image, mask, vocabulary.texts)
            for image, mask, vocabulary in zip(images, masks, vocabularies, strict=True)
        ]
        namings = []
        for mask, scores, vocabulary, cluster_map in zip(
            masks, self.classifier.score(items), vocabularies, cluster_maps, strict=True
        ):
            candidates = set(vocabulary.candidates)
            allowed = np.array([text in candidates for text in vocabulary.texts], dtype=bool)
            labels = assign_labels(scores, allowed, self.ties)
            namings.append(Naming(mask, scores, labels, cluster_map))
        return namings
