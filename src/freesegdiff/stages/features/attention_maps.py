"""Cross-attention-map features: the released script's "attention" features (docs/method.md,
``features.kind``).

For each hooked cross-attention layer, the released ``AttentionHook.computeAttentionMaps``
scores the layer's queries (``to_q`` of its input, the features of step 7) against the keys
(``to_k``) of one pooled text embedding per class, per head, scaled by ``1 / sqrt(head_dim)``:
``heads x classes`` maps of the layer's grid, each resized bilinearly to the feature grid.
The class embeddings are pooled as its ``runner.py`` pools them (:func:`pooled_prompt_embeddings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

PROMPT = "A photo of {}"


@torch.inference_mode()
def pooled_prompt_embeddings(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    classes: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """One pooled SD text embedding per class: ``(L, D)`` float32 on ``device``.

    As the released ``runner.py``: the prompt "A photo of {class}" padded to 77 tokens goes
    through the text encoder (a class of several words: the mean of the prompts of its words,
    position by position); the embedding is the mean over positions ``1 .. n - 1``, where ``n``
    is the number of tokens of the **class name** alone with its start and end tokens (so a
    one-word class pools "a photo", the prompt's first two words: the released behaviour).
    """
    rows = []
    for name in classes:
        prompts = (
            [PROMPT.format(word) for word in name.split()] if " " in name else [PROMPT.format(name)]
        )
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        states = text_encoder(tokens.input_ids.to(device))[0].float().mean(0)  # (77, D)
        length = len(tokenizer(name)["input_ids"])
        rows.append(states[1:length].mean(0))
    return torch.stack(rows)


def attention_score_maps(
    queries: torch.Tensor, keys: torch.Tensor, heads: int, size: int
) -> torch.Tensor:
    """Per-head attention scores of a layer's queries against class keys, as maps.

    Args:
        queries: ``(B, T, C)`` the layer's ``to_q`` output, ``T`` a square grid.
        keys: ``(L, C)`` its ``to_k`` of the ``L`` class embeddings.
        heads: the layer's attention heads (``C / heads`` channels each).
        size: side of the output grid (bilinear resize, as the query features).

    Returns:
        ``(B, heads * L, size, size)`` float32, channel ``h * L + l`` the score of class ``l``
        in head ``h``: ``q_h . k_h / sqrt(C / heads)``.
    """
    batch, tokens, channels = queries.shape
    side = round(tokens**0.5)
    if side * side != tokens:
        raise RuntimeError(f"{tokens} query tokens are not a square map")
    head_dim = channels // heads
    q = queries.float().reshape(batch, tokens, heads, head_dim).permute(0, 2, 1, 3)
    k = keys.float().reshape(-1, heads, head_dim).permute(1, 0, 2)  # (heads, L, d)
    scores = torch.einsum("bhtd,hld->bhlt", q, k) * head_dim**-0.5  # (B, heads, L, T)
    maps = scores.reshape(batch, -1, side, side)
    if side != size:
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return maps
