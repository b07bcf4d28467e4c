"""Dense naming: per-pixel class probabilities from CLIP's patch tokens (docs/method.md, "dense
naming"), as NACLIP's released code computes them (Hajimiri et al., WACV 2025), on transformers'
``CLIPModel``.

CLIP's vision transformer runs as usual up to its last block; the last block's attention is
replaced (``dense.attention``: NACLIP's Gaussian neighbourhood plus key-key similarity, the
neighbourhood alone, key-key, SCLIP's correlative self-attention, or CLIP's own) and the block
may keep only that attention's output (``dense.block = "reduced"``: no residual, no MLP). Every
token then goes through the final layer norm and the projection; the patch tokens, L2-normalised,
are scored against the texts' embeddings (the normalised mean over the 80 ImageNet prompt
templates). The input is the image resized so its short side is 336 (ratio kept), cut into
224-pixel windows at a 112-pixel stride whose upsampled cosines are averaged where they overlap;
the cosines are upsampled to the image's size, optionally propagated by PAMR, and a softmax with
logit scale 40 over the texts gives the probabilities.

:class:`DenseClip` computes the probabilities; :class:`DenseNamer` (``classify.namer =
"dense"``) names the pipeline's clusters from them, or every pixel (``dense.regions =
"pixels"``: NACLIP itself).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from freesegdiff.config import DenseConfig, PipelineConfig
from freesegdiff.infra.arrays import image_tensor
from freesegdiff.infra.devices import to_device
from freesegdiff.stages.naming.masked_crops import (
    MaskClassifier,
    Naming,
    _pooled,
    cluster_masks,
)
from freesegdiff.stages.refine.pamr import pamr

__all__ = ["DenseClip", "DenseNamer", "imagenet_templates", "resized_size"]

# CLIP's pixel mean and standard deviation in 0..255 (NACLIP's data preprocessor), RGB
PIXEL_MEAN = (122.771, 116.746, 104.094)
PIXEL_STD = (68.501, 66.632, 70.323)
TEXT_CHUNK = 640  # prompts per text-tower forward
TEXT_CACHE = 8192  # texts whose embeddings are kept


@lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompt templates (``data/prompts/imagenet80.txt``), ``{}`` the name."""
    text = (resources.files("freesegdiff") / "data" / "prompts" / "imagenet80.txt").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(lines)


def resized_size(height: int, width: int, short_side: int, long_side: int) -> tuple[int, int]:
    """``(height, width)`` after a ratio-keeping resize that fits the short side in
    ``short_side`` and the long side in ``long_side`` (MMCV's ``rescale_size``: the smaller of
    the two scales, each side rounded half up)."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def gaussian_neighbourhood(rows: int, cols: int, std: float) -> torch.Tensor:
    """``(1 + rows * cols, 1 + rows * cols)`` float32 attention bias: between patches ``(r, c)``
    and ``(r', c')`` of the grid, ``exp(-((r - r')^2 + (c - c')^2) / (2 std^2))``; zero in the
    class token's row and column (NACLIP's neighbourhood, std in patches)."""
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    r, c = r.flatten(), c.flatten()
    squared = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    bias = torch.zeros(1 + rows * cols, 1 + rows * cols, dtype=torch.float64)
    bias[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return bias.float()


def window_origins(size: int, crop: int, stride: int) -> list[int]:
    """Start of each sliding window along one side of ``size`` pixels (NACLIP's
    ``forward_slide``: ``ceil((size - crop) / stride) + 1`` windows, the last one pushed back
    inside the image)."""
    crop = min(crop, size)
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


class DenseClip:
    """Per-pixel probabilities of label texts from a transformers ``CLIPModel``.

    Args:
        model: the ``CLIPModel`` (any patch size; the position embedding is interpolated for
            other input sizes as NACLIP does it).
        processor: its ``CLIPProcessor`` (the tokenizer is used).
        config: the ``dense`` settings.
        device, dtype: where and in which precision the towers run (cosines in float32).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: DenseConfig,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.tokenizer = processor.tokenizer
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        vision = model.vision_model
        self.patch = int(vision.embeddings.patch_embedding.kernel_size[0])
        self._positions: dict[tuple[int, int], torch.Tensor] = {}
        self._biases: dict[tuple[int, int], torch.Tensor] = {}
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.mean = torch.tensor(PIXEL_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(PIXEL_STD, device=self.device).view(3, 1, 1)

    # ---------------------------------------------------------------------------- texts
    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``(T, D)`` unit-norm float32 embeddings: per text the normalised mean of the
        normalised embeddings of its prompts (the 80 templates, or the text alone)."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._texts]
        if missing:
            templates = imagenet_templates() if self.config.templates == "imagenet80" else ("{}",)
            prompts = [template.format(text) for text in missing for template in templates]
            chunks = []
            for start in range(0, len(prompts), TEXT_CHUNK):
                tokens = self.tokenizer(
                    prompts[start : start + TEXT_CHUNK],
                    padding=True,
                    truncation=True,
                    max_length=77,
                    return_tensors="pt",
                ).to(self.device)
                features = _pooled(self.model.get_text_features(**tokens)).float()
                chunks.append(F.normalize(features, dim=-1))
            per_prompt = torch.cat(chunks).view(len(missing), len(templates), -1)
            for text, embedding in zip(
                missing, F.normalize(per_prompt.mean(1), dim=-1), strict=True
            ):
                self._texts[text] = embedding
        for text in texts:
            self._texts.move_to_end(text)
        embeddings = torch.stack([self._texts[text] for text in texts]) if texts else None
        while len(self._texts) > max(TEXT_CACHE, len(texts)):
            self._texts.popitem(last=False)
        if embeddings is None:
            return torch.zeros(0, self.model.config.projection_dim, device=self.device)
        return embeddings

    # ---------------------------------------------------------------------------- images
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, h, w)`` float32 normalised, resized as the settings
        say (OpenCV's bilinear on the uint8 image, as released, or torch's, antialiased)."""
        height, width = image.shape[:2]
        size = resized_size(height, width, self.config.short_side, self.config.long_side)
        if self.config.resize == "cv2":
            import cv2

            resized = cv2.resize(
                np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR
            )
            pixels = to_device(image_tensor(resized), self.device).float()
        else:
            pixels = to_device(image_tensor(image), self.device).float()[None]
            if tuple(size) != (height, width):
                pixels = F.interpolate(
                    pixels, size=size, mode="bilinear", align_corners=False, antialias=True
                )
            pixels = pixels[0]
        return (pixels - self.mean) / self.std

    def _position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """``(1 + rows * cols, D)``: the model's position embedding, interpolated for another
        grid as NACLIP does (bicubic, scale factors ``(side + 0.1) / N``)."""
        weight = self.model.vision_model.embeddings.position_embedding.weight
        tokens = 1 + rows * cols
        if tokens == weight.shape[0]:
            return weight
        if (rows, cols) not in self._positions:
            patches = weight[1:].float()
            side = int(math.sqrt(patches.shape[0]))
            grid = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(
                grid,
                scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                mode="bicubic",
                align_corners=False,
                recompute_scale_factor=False,
            )
            patches = grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)
            self._positions[rows, cols] = torch.cat([weight[:1].float(), patches]).to(weight.dtype)
        return self._positions[rows, cols]

    def _attention(self, layer: Any, x: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """A block's self-attention on ``x`` (B, L, D), already layer-normed: CLIP's own when
        ``grid`` is None (every block but the last), else the ``dense.attention`` option."""
        attention = layer.self_attn
        batch, length, width = x.shape
        heads = attention.num_heads
        head = width // heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, head).transpose(1, 2)  # (B, heads, L, head)

        q, k, v = split(attention.q_proj(x)), split(attention.k_proj(x)), split(attention.v_proj(x))
        scale = head**-0.5
        if grid is None or self.config.attention == "vanilla":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            option = self.config.attention
            if option == "naclip":
                bias = self._bias(grid).to(x.dtype)
                weights = torch.softmax(k @ k.transpose(-1, -2) * scale + bias, dim=-1)
            elif option == "nonly":
                bias = self._bias(grid).to(x.dtype)
                # the bias scaled by the mean over heads and token pairs of |q_i| |k_j|
                per_head = q.norm(dim=-1).mean(dim=-1) * k.norm(dim=-1).mean(dim=-1)  # (B, heads)
                norms = per_head.mean(dim=-1)  # (B,)
                weights = torch.softmax(bias * (scale * norms).view(batch, 1, 1, 1), dim=-1)
                weights = weights.expand(batch, heads, length, length)
            elif option == "kk":
                weights = torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1)
            else:  # "csa"
                weights = torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1) + torch.softmax(
                    k @ k.transpose(-1, -2) * scale, dim=-1
                )
            out = weights @ v
        out = out.transpose(1, 2).reshape(batch, length, width)
        result: torch.Tensor = attention.out_proj(out)
        return result

    def _bias(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._biases:
            bias = gaussian_neighbourhood(*grid, self.config.gaussian_std)
            self._biases[grid] = bias.to(self.device)
        return self._biases[grid]

    @torch.inference_mode()
    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` normalised -> ``(B, P, rows, cols)`` float32 unit-norm projected patch
        tokens (``rows = h // patch``), through the modified last block."""
        vision = self.model.vision_model
        embeddings = vision.embeddings
        x = embeddings.patch_embedding(pixels.to(self.dtype))  # (B, D, rows, cols)
        batch, width, rows, cols = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.to(x.dtype).expand(batch, 1, width)
        x = torch.cat([cls, x], dim=1) + self._position_embedding(rows, cols).to(x.dtype)
        x = vision.pre_layrnorm(x)
        layers = vision.encoder.layers
        for layer in layers[:-1]:
            x = x + self._attention(layer, layer.layer_norm1(x), None)
            x = x + layer.mlp(layer.layer_norm2(x))
        last = layers[-1]
        attended = self._attention(last, last.layer_norm1(x), (rows, cols))
        if self.config.block == "reduced":
            x = attended
        else:
            x = x + attended
            x = x + last.mlp(last.layer_norm2(x))
        x = self.model.visual_projection(vision.post_layernorm(x))[:, 1:].float()
        x = F.normalize(x, dim=-1)
        return x.transpose(1, 2).reshape(batch, -1, rows, cols)

    def _window_logits(self, crops: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` crops -> ``(B, T, h, w)`` cosines, upsampled from the patch grid."""
        tokens = self.patch_tokens(crops)  # (B, P, rows, cols)
        logits = torch.einsum("bprc,tp->btrc", tokens, texts)
        return F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def logits(self, image: np.ndarray, texts: Sequence[str]) -> torch.Tensor:
        """``(T, H, W)`` float32 cosines of each pixel of ``image`` ``(H, W, 3)`` uint8 with each
        text, at the image's size (PAMR applied when ``dense.pamr_iterations`` > 0)."""
        height, width = image.shape[:2]
        embeddings = self.text_embeddings(texts)  # (T, P)
        pixels = self.preprocess(image)  # (3, h, w)
        h, w = pixels.shape[-2:]
        config = self.config
        if config.slide_crop > 0:
            crop_h, crop_w = min(config.slide_crop, h), min(config.slide_crop, w)
            boxes = [
                (top, left)
                for top in window_origins(h, config.slide_crop, config.slide_stride)
                for left in window_origins(w, config.slide_crop, config.slide_stride)
            ]
            summed = torch.zeros(len(texts), h, w, device=self.device)
            count = torch.zeros(1, h, w, device=self.device)
            for start in range(0, len(boxes), config.batch_size):
                chunk = boxes[start : start + config.batch_size]
                crops = torch.stack([pixels[:, t : t + crop_h, x : x + crop_w] for t, x in chunk])
                for (top, left), logits in zip(
                    chunk, self._window_logits(crops, embeddings), strict=True
                ):
                    summed[:, top : top + crop_h, left : left + crop_w] += logits
                    count[:, top : top + crop_h, left : left + crop_w] += 1
            logits = summed / count
        else:
            logits = self._window_logits(pixels[None], embeddings)[0]
        logits = F.interpolate(
            logits[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
        if config.pamr_iterations > 0:
            guide = F.interpolate(
                pixels[None], size=(height, width), mode="bilinear", align_corners=False
            )[0]
            logits = pamr(
                guide, logits, iterations=config.pamr_iterations, dilations=config.pamr_dilations
            )
        return logits

    def probabilities(self, image: np.ndarray, texts: Sequence[str]) -> torch.Tensor:
        """``(T, H, W)`` float32: per pixel, the softmax over the texts of ``logit_scale`` times
        the cosines (:meth:`logits`)."""
        if not texts:
            return torch.zeros(0, *image.shape[:2], device=self.device)
        return torch.softmax(self.logits(image, texts) * self.config.logit_scale, dim=0)


class DenseNamer:
    """Steps 10 and 11 from dense probabilities (``classify.namer = "dense"``).

    With ``dense.regions = "clusters"`` each cluster takes the candidate text whose mean
    probability over its pixels is highest (``region_rule = "mean"``), or its pixels' majority
    label (``"vote"``); with ``"pixels"`` there are no clusters: every pixel takes its best
    candidate text, and the regions are the pixels sharing one. A pixel, or a cluster under
    ``"mean"``, whose best candidate probability is below ``dense.prob_thd`` is background.
    Probabilities are the softmax over all the image's texts; texts that are not candidates
    (caption pruning) cannot be chosen, as with the masked-image namer.
    """

    def __init__(self, dense: DenseClip) -> None:
        self.dense = dense
        self.config = dense.config

    @classmethod
    def from_classifier(cls, classifier: MaskClassifier, config: PipelineConfig) -> DenseNamer:
        """The namer of ``config`` on the pipeline's CLIP model."""
        return cls(
            DenseClip(
                classifier.model,
                classifier.processor,
                config.dense,
                classifier.device,
                classifier.dtype,
            )
        )

    @property
    def names_pixels(self) -> bool:
        """True when the namer makes its own regions (no clustering is needed)."""
        return self.config.regions == "pixels"

    def __call__(
        self,
        images: Sequence[np.ndarray],
        cluster_maps: Sequence[torch.Tensor | None],
        vocabularies: Sequence[Any],
    ) -> list[Naming]:
        """One :class:`Naming` per image.

        Args:
            images: ``(H, W, 3)`` uint8 RGB.
            cluster_maps: per image ``(H, W)`` int64 cluster indices ``0..K-1``; None for each
                image when the namer names pixels.
            vocabularies: per image, anything with ``texts`` and ``candidates``.
        """
        return [
            self._one(image, cluster_map, vocabulary)
            for image, cluster_map, vocabulary in zip(
                images, cluster_maps, vocabularies, strict=True
            )
        ]

    def _one(self, image: np.ndarray, cluster_map: torch.Tensor | None, vocabulary: Any) -> Naming:
        texts = list(vocabulary.texts)
        candidates = set(vocabulary.candidates)
        allowed = torch.tensor([text in candidates for text in texts], dtype=torch.bool)
        probs = self.dense.probabilities(image, texts)  # (T, H, W)
        device = probs.device
        allowed = allowed.to(device)
        chosen = probs * allowed[:, None, None]  # non-candidates cannot win
        if len(texts) and bool(allowed.any()):
            best, labels = chosen.max(dim=0)  # (H, W): first maximum on ties
            labels = torch.where(best < self.config.prob_thd, -1, labels)
        else:
            labels = torch.full(image.shape[:2], -1, dtype=torch.int64, device=device)
        if cluster_map is None:  # the regions are the pixels sharing a label, background last
            present = torch.unique(labels)
            named = present[present >= 0]
            lookup = torch.full((len(texts) + 1,), len(named), dtype=torch.int64, device=device)
            lookup[named] = torch.arange(len(named), device=device)
            cluster_map = lookup[torch.where(labels < 0, len(texts), labels)]
            cluster_labels = [int(t) for t in named.tolist()] + [-1] * int(bool((labels < 0).any()))
        else:
            cluster_map = cluster_map.to(device)
            cluster_labels = []
        masks = cluster_masks(cluster_map)  # (K, H, W)
        count = len(masks)
        flat = masks.reshape(count, -1).float()
        area = flat.sum(dim=1)  # (K,)
        pixels = probs.reshape(len(texts), flat.shape[1])
        scores = (pixels @ flat.T) / area.clamp(min=1)  # (T, K) mean probabilities
        if not cluster_labels:
            cluster_labels = self._region_labels(
                scores * allowed[:, None], labels, cluster_map, area
            )
        return Naming(masks, scores.cpu().numpy().astype(np.float32), cluster_labels, cluster_map)

    def _region_labels(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        cluster_map: torch.Tensor,
        area: torch.Tensor,
    ) -> list[int]:
        """Per cluster its text index or -1: by mean probability or by the pixels' vote."""
        texts, clusters = scores.shape
        if texts == 0:
            return [-1] * clusters
        if self.config.region_rule == "mean":
            best, choice = scores.max(dim=0)
            keep = (best >= self.config.prob_thd) & (best > 0) & (area > 0)
            return [
                int(c) if k else -1 for c, k in zip(choice.tolist(), keep.tolist(), strict=True)
            ]
        # votes: background counted as the last label, so ties go to the lowest text index
        votes = torch.where(labels < 0, texts, labels).flatten()  # (H*W,) in 0..T
        counts = torch.zeros(clusters, texts + 1, device=labels.device)
        owner = cluster_map.flatten()  # each pixel's cluster
        counts.index_put_(
            (owner, votes), torch.ones_like(votes, dtype=torch.float), accumulate=True
        )
        winner = counts.argmax(dim=1)
        return [
            int(w) if w < texts and a > 0 else -1
            for w, a in zip(winner.tolist(), area.tolist(), strict=True)
        ]
