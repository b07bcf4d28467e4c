"""An independent, plain-torch NACLIP (Hajimiri et al., "Pay Attention to Your Neighbours",
WACV 2025) for the tests: per-pixel class probabilities from a transformers ``CLIPModel``'s
weight tensors, written from the papers (NACLIP; SCLIP, Wang et al., ECCV 2024) and the
released code's semantics (github sinahmr/NACLIP: ``naclip.py``, ``clip/model.py``,
``pamr.py``, the mmseg test pipeline of ``configs/``). It imports nothing from freesegdiff and
is written for clarity, not speed: one crop at a time, batch size 1, as the release runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

TEMPLATES = (
    Path(__file__).parents[3] / "src" / "freesegdiff" / "data" / "prompts" / "imagenet80.txt"
)
# SegDataPreProcessor's (CLIP's) RGB mean and standard deviation, in 0..255 units
MEAN = (122.771, 116.746, 104.094)
STD = (68.501, 66.632, 70.323)


# ----------------------------------------------------------------------------- common blocks
def _layer_norm(x: torch.Tensor, weights: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(
        x, x.shape[-1:], weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], eps
    )


def _linear(x: torch.Tensor, weights: dict, prefix: str) -> torch.Tensor:
    return F.linear(x, weights[f"{prefix}.weight"], weights.get(f"{prefix}.bias"))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _mlp(x: torch.Tensor, weights: dict, prefix: str) -> torch.Tensor:
    return _linear(_quick_gelu(_linear(x, weights, f"{prefix}.fc1")), weights, f"{prefix}.fc2")


def _heads(x: torch.Tensor, weights: dict, prefix: str, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of tokens x (..., L, D), each (..., heads, L, D / heads), biases included."""
    *batch, length, width = x.shape
    return tuple(
        _linear(x, weights, f"{prefix}.{name}_proj")
        .view(*batch, length, heads, width // heads)
        .transpose(-3, -2)
        for name in ("q", "k", "v")
    )


def _merge(weights_: torch.Tensor, v: torch.Tensor, weights: dict, prefix: str) -> torch.Tensor:
    """Attention weights (..., heads, L, L) applied to v, the heads concatenated, out_proj."""
    out = (weights_ @ v).transpose(-3, -2).flatten(-2)
    return _linear(out, weights, f"{prefix}.out_proj")


def _clip_attention(
    x: torch.Tensor, weights: dict, prefix: str, heads: int, mask=None
) -> torch.Tensor:
    q, k, v = _heads(x, weights, prefix, heads)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return _merge(scores.softmax(dim=-1), v, weights, prefix)


def _residual_block(x: torch.Tensor, weights: dict, prefix: str, heads: int, eps: float, mask=None):
    x = x + _clip_attention(
        _layer_norm(x, weights, f"{prefix}.layer_norm1", eps),
        weights,
        f"{prefix}.self_attn",
        heads,
        mask,
    )
    return x + _mlp(_layer_norm(x, weights, f"{prefix}.layer_norm2", eps), weights, f"{prefix}.mlp")


def _layers(weights: dict, tower: str) -> int:
    return len({key.split(".")[3] for key in weights if key.startswith(f"{tower}.encoder.layers.")})


# ------------------------------------------------------------------------------------- text
def load_templates(path: Path = TEMPLATES) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def encode_texts(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP's projected end-of-text token of each prompt (not normalised): (P, D)."""
    weights = model.state_dict()
    config = model.config.text_config
    assert config.hidden_act == "quick_gelu"
    tokens = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    )
    ids = tokens["input_ids"]
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = weights["text_model.embeddings.token_embedding.weight"][ids]  # (P, L, D)
    x = x + weights["text_model.embeddings.position_embedding.weight"][:length]
    for i in range(_layers(weights, "text_model")):
        x = _residual_block(
            x,
            weights,
            f"text_model.encoder.layers.{i}",
            config.num_attention_heads,
            config.layer_norm_eps,
            causal,
        )
    x = _layer_norm(x, weights, "text_model.final_layer_norm", config.layer_norm_eps)
    # the first end-of-text token of each prompt (the padding may be the same token)
    end = (ids == tokenizer.eos_token_id).int().argmax(dim=1)
    return x[torch.arange(len(ids)), end] @ weights["text_projection.weight"].T


def text_embeddings(
    model, tokenizer, texts: Sequence[str], templates: Sequence[str] | None = None
) -> torch.Tensor:
    """(T, D) unit vectors: each text's normalised mean of its normalised template embeddings."""
    templates = load_templates() if templates is None else templates
    rows = []
    for text in texts:
        features = encode_texts(model, tokenizer, [t.replace("{}", text) for t in templates])
        features = features / features.norm(dim=-1, keepdim=True)
        mean = features.mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


# ------------------------------------------------------------------------------------ image
def preprocess(image: np.ndarray, short_side: int = 336, long_side: int = 2048) -> torch.Tensor:
    """mmseg's ``Resize(scale=(long, short), keep_ratio=True)`` (mmcv ``imrescale``, OpenCV
    bilinear on uint8) and ``SegDataPreProcessor``'s normalisation: (3, h, w) float32."""
    height, width = image.shape[:2]
    scale = min(long_side / max(height, width), short_side / min(height, width))
    size = (int(width * scale + 0.5), int(height * scale + 0.5))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def neighbourhood(rows: int, cols: int, std: float) -> torch.Tensor:
    """NACLIP's Gaussian bias over the (1 + rows * cols) tokens: 0 for the class token."""
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    r, c = r.flatten(), c.flatten()
    distance2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    out = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.float64)
    out[1:, 1:] = torch.exp(-distance2 / (2 * std**2))
    return out.float()


def positions(weights: dict, rows: int, cols: int) -> torch.Tensor:
    """Position embeddings for a (rows, cols) patch grid, as the release's
    ``interpolate_pos_encoding`` (the model's own table when the token count matches)."""
    table = weights["vision_model.embeddings.position_embedding.weight"]
    n = table.shape[0] - 1
    if rows * cols == n:
        return table
    side = int(math.sqrt(n))
    grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        mode="bicubic",
        scale_factor=((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n)),
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert grid.shape[-2:] == (rows, cols)
    return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])


def last_attention(x, weights, prefix, heads, attention, rows, cols, std) -> torch.Tensor:
    """The last block's attention of NACLIP's ablations on tokens x (L, D)."""
    q, k, v = _heads(x, weights, prefix, heads)
    scale = q.shape[-1] ** -0.5
    if attention == "vanilla":
        a = (q @ k.transpose(1, 2) * scale).softmax(-1)
    elif attention == "kk":
        a = (k @ k.transpose(1, 2) * scale).softmax(-1)
    elif attention == "csa":  # SCLIP: the two softmaxes summed, not renormalised
        a = (q @ q.transpose(1, 2) * scale).softmax(-1) + (k @ k.transpose(1, 2) * scale).softmax(
            -1
        )
    elif attention == "naclip":
        a = (k @ k.transpose(1, 2) * scale + neighbourhood(rows, cols, std)).softmax(-1)
    elif attention == "nonly":
        # the Gaussian alone, scaled by the mean over heads and all (i, j) of |q_i| |k_j|
        strength = scale * (q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :]).mean().item()
        a = (neighbourhood(rows, cols, std) * strength).expand(heads, -1, -1).softmax(-1)
    else:
        raise ValueError(attention)
    return _merge(a, v, weights, prefix)


def patch_features(
    model, crop: torch.Tensor, attention: str, block: str, std: float
) -> torch.Tensor:
    """Projected, normalised patch tokens of a (3, h, w) crop: (rows * cols, D), rows = h // p."""
    weights = model.state_dict()
    config = model.config.vision_config
    assert config.hidden_act == "quick_gelu"
    eps, heads, p = config.layer_norm_eps, config.num_attention_heads, config.patch_size
    rows, cols = crop.shape[1] // p, crop.shape[2] // p
    patches = F.conv2d(
        crop[None], weights["vision_model.embeddings.patch_embedding.weight"], stride=p
    )
    x = torch.cat(
        [weights["vision_model.embeddings.class_embedding"][None], patches[0].flatten(1).T]
    )
    x = x + positions(weights, rows, cols)
    x = _layer_norm(x, weights, "vision_model.pre_layrnorm", eps)
    layers = _layers(weights, "vision_model")
    for i in range(layers - 1):
        x = _residual_block(x, weights, f"vision_model.encoder.layers.{i}", heads, eps)
    last = f"vision_model.encoder.layers.{layers - 1}"
    attended = last_attention(
        _layer_norm(x, weights, f"{last}.layer_norm1", eps),
        weights,
        f"{last}.self_attn",
        heads,
        attention,
        rows,
        cols,
        std,
    )
    if block == "reduced":
        x = attended
    elif block == "vanilla":
        x = x + attended
        x = x + _mlp(_layer_norm(x, weights, f"{last}.layer_norm2", eps), weights, f"{last}.mlp")
    else:
        raise ValueError(block)
    x = (
        _layer_norm(x, weights, "vision_model.post_layernorm", eps)
        @ weights["visual_projection.weight"].T
    )
    x = x[1:]
    return x / x.norm(dim=-1, keepdim=True)


def crop_logits(model, crop, text, attention, block, std) -> torch.Tensor:
    """``forward_feature``: (T, h, w) cosines of a crop's patches, upsampled to the crop."""
    p = model.config.vision_config.patch_size
    rows, cols = crop.shape[1] // p, crop.shape[2] // p
    logits = (patch_features(model, crop, attention, block, std) @ text.T).T.reshape(
        1, -1, rows, cols
    )
    return F.interpolate(logits, size=crop.shape[1:], mode="bilinear", align_corners=False)[0]


def slide_logits(model, image, text, attention, block, std, crop: int, stride: int) -> torch.Tensor:
    """``forward_slide``: overlapping crops, logits averaged where they overlap."""
    _, height, width = image.shape
    total = torch.zeros(text.shape[0], height, width)
    count = torch.zeros(1, height, width)
    for i in range(max(height - crop + stride - 1, 0) // stride + 1):
        for j in range(max(width - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            total[:, y1:y2, x1:x2] += crop_logits(
                model, image[:, y1:y2, x1:x2], text, attention, block, std
            )
            count[:, y1:y2, x1:x2] += 1
    assert (count > 0).all()
    return total / count


# ------------------------------------------------------------------------------------- PAMR
def _window(x: torch.Tensor, dilations: Sequence[int]) -> list[torch.Tensor]:
    """The 3x3 window of every pixel of x (K, H, W) at each dilation, edges replicated, in the
    release's kernel order (row-major, the centre fifth): 9 * len(dilations) tensors (K, H, W)."""
    height, width = x.shape[1:]
    out = []
    for d in dilations:
        padded = F.pad(x[:, None], [d] * 4, mode="replicate")[:, 0]
        out += [
            padded[:, i * d : i * d + height, j * d : j * d + width]
            for i in range(3)
            for j in range(3)
        ]
    return out


def pamr(
    image: torch.Tensor, logits: torch.Tensor, iterations: int, dilations: Sequence[int]
) -> torch.Tensor:
    """The released ``PAMR(iterations, dilations)(image[None], logits[None])[0]``: image (C, H,
    W) the guide, logits (N, H, W)."""
    window = _window(image, dilations)
    std = torch.stack(window).std(dim=0)  # (C, H, W): every window position, centres included
    neighbours = [n for i, n in enumerate(window) if i % 9 != 4]
    affinity = torch.stack([-(image - n).abs() / (1e-8 + 0.1 * std) for n in neighbours])
    affinity = affinity.mean(dim=1).softmax(dim=0)  # (8 * len(dilations), H, W)
    for _ in range(iterations):
        neighbours = [n for i, n in enumerate(_window(logits, dilations)) if i % 9 != 4]
        logits = sum(w * n for w, n in zip(affinity, neighbours, strict=True))
    return logits


# ------------------------------------------------------------------------------------ whole
def probabilities(
    model,
    tokenizer,
    image: np.ndarray,
    texts: Sequence[str],
    *,
    attention: str = "naclip",
    block: str = "reduced",
    gaussian_std: float = 5.0,
    slide_crop: int = 224,
    slide_stride: int = 112,
    short_side: int = 336,
    long_side: int = 2048,
    pamr_iterations: int = 10,
    pamr_dilations: Sequence[int] = (8, 16),
    logit_scale: float = 40.0,
    templates: Sequence[str] | None = None,
    text: torch.Tensor | None = None,
) -> torch.Tensor:
    """NACLIP's per-pixel probabilities of an (H, W, 3) uint8 RGB image: (T, H, W) float32.
    ``text``: the texts' embeddings if already computed (:func:`text_embeddings`)."""
    with torch.no_grad():
        if text is None:
            text = text_embeddings(model, tokenizer, texts, templates)
        x = preprocess(image, short_side, long_side)
        if slide_crop > 0:
            logits = slide_logits(
                model, x, text, attention, block, gaussian_std, slide_crop, slide_stride
            )
        else:
            logits = crop_logits(model, x, text, attention, block, gaussian_std)
        size = image.shape[:2]
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        if pamr_iterations > 0:
            guide = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
            logits = pamr(guide, logits, pamr_iterations, pamr_dilations)
        return (logits * logit_scale).softmax(dim=0)
