"""BLIP's captioner at its floor: the runtime trick ``fast_captioner``.

transformers' BLIP text decoder is a BERT with cross-attention. Decoding one token for a few
beams multiplies a handful of rows by every weight of the decoder: about 0.49 GB of float32
weights per step for BLIP base, whatever the number of rows. Three things kept it several times
above what reading those weights costs, and this module removes them (docs/method.md, runtime
tuning; figures in benchmarks/RESULTS.md):

1. **The matrix kernel.** ``F.linear`` on a few rows re-packs each weight on every call
   (oneDNN's and MKL's GEMMs are built for many rows). On the CPU the decoder's weights are
   packed once for oneDNN's inner-product kernel (:class:`Projection`), which then reads them at
   memory bandwidth. On CUDA, or wherever oneDNN is unavailable, ``F.linear`` stays.
2. **The image's keys and values per beam.** transformers repeats each image's embeddings per
   beam, so the cross-attention keys and values (577 tokens x 12 layers) are computed and read
   ``num_beams`` times per step. Here they are computed once per image, and the beams of an image
   attend to them together as rows of one query (beams never leave their image, so nothing is
   ever reordered).
3. **The self-attention cache.** A preallocated static cache (:class:`DecoderCache`), reordered
   between steps by one ``index_select`` per layer into a second buffer, instead of
   concatenating tensors per step.
4. **The vision encoder's attention** runs as one fused ``scaled_dot_product_attention`` per
   layer instead of two matrix products, a scaling and a softmax over ``(heads, 577, 577)``
   (:func:`install_vision`; about 7 % of the encoder on the CPU).

The beam search itself stays transformers' ``generate``: the same logits processors, length
penalty, stopping rule and tie-breaking. Only the decoder's forward is replaced, and only when it
is given a :class:`DecoderCache` (:func:`decoder_cache`); every other call runs the released
forward. The arithmetic is the released one in another kernel, so the logits agree to float32
rounding (about 1e-6 relative), not bit for bit; the generated tokens are the same
(tests/infra/test_fast_captioner.py compares them with ``generate`` on real photos, with the tiny
and the real-architecture BLIP, with beams ending at every step).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from freesegdiff.stages.captioner import Captioner

_INSTALLED = "_freesegdiff_fast_captioner"


class Projection:
    """One ``nn.Linear`` for a few rows at a time: ``(..., in) -> (..., out)``.

    On the CPU in float32 or bfloat16 its weight is packed once for oneDNN's inner product
    (a copy: about the weight's size again); elsewhere it calls ``F.linear`` on the module's own
    weight.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed: torch.Tensor | None = None
        weight = linear.weight
        if (
            weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
        ):
            try:
                with torch.no_grad():
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            except RuntimeError:  # a build without oneDNN's packed inner product
                self.packed = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``(..., in)`` -> ``(..., out)``, bias added."""
        if self.packed is None:
            return F.linear(rows, self.weight, self.bias)
        flat = rows.reshape(-1, rows.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*rows.shape[:-1], out.shape[-1])


class _Layer:
    """One decoder layer's projections and layer norms."""

    def __init__(self, layer: Any) -> None:
        attention, cross = layer.attention, layer.crossattention
        self.query = Projection(attention.self.query)
        self.key = Projection(attention.self.key)
        self.value = Projection(attention.self.value)
        self.attention_out = Projection(attention.output.dense)
        self.attention_norm = attention.output.LayerNorm
        self.cross_query = Projection(cross.self.query)
        self.cross_key = Projection(cross.self.key)
        self.cross_value = Projection(cross.self.value)
        self.cross_out = Projection(cross.output.dense)
        self.cross_norm = cross.output.LayerNorm
        self.intermediate = Projection(layer.intermediate.dense)
        self.activation = layer.intermediate.intermediate_act_fn
        self.output = Projection(layer.output.dense)
        self.output_norm = layer.output.LayerNorm


class _Decoder:
    """The packed weights of one ``BlipTextLMHeadModel`` (built on its first fast call)."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.head_size = int(config.hidden_size) // self.heads
        embeddings = model.bert.embeddings
        self.word_embeddings = embeddings.word_embeddings
        self.position_embeddings = embeddings.position_embeddings
        self.embedding_norm = embeddings.LayerNorm
        self.layers = [_Layer(layer) for layer in model.bert.encoder.layer]
        head = model.cls.predictions
        self.transform = Projection(head.transform.dense)
        self.transform_activation = head.transform.transform_act_fn
        self.transform_norm = head.transform.LayerNorm
        self.vocabulary = Projection(head.decoder)


class DecoderCache:
    """The decoder's keys and values during one ``generate`` call (see the module docstring).

    Self-attention: ``(rows, heads, capacity, head size)`` per layer, filled up to
    :meth:`get_seq_length`; cross-attention: ``(images, heads, image tokens, head size)`` per
    layer, computed on the first step. ``rows`` = images x ``beams``, image by image, as
    transformers lays out its beams.
    """

    def __init__(self, beams: int, capacity: int) -> None:
        from transformers.cache_utils import DynamicCache

        # generate() wants a transformers Cache; this one only ever answers get_seq_length,
        # reorder_cache and crop, so its own (empty) layers are never used.
        self._base = DynamicCache()
        self.beams = beams
        self.capacity = max(1, capacity)
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.spare_keys: list[torch.Tensor] = []
        self.spare_values: list[torch.Tensor] = []
        self.cross_keys: list[torch.Tensor] = []
        self.cross_values: list[torch.Tensor] = []
        self.is_compileable = False
        self.is_croppable = False

    def __getattr__(self, name: str) -> Any:
        # anything else generate() asks of a cache (flags, _is_user_defined) as a DynamicCache
        # answers it
        if name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held so far (the prompt and every generated token)."""
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows ``beam_idx`` ``(rows,)`` (each row's new parent), as beam search asks.

        Self-attention only: a row's parent is always a beam of the same image, whose
        cross-attention keys and values are the image's.
        """
        if not self.keys:
            return
        index = beam_idx.to(self.keys[0].device)
        used = self.length
        for layer in range(len(self.keys)):
            for held, spare in ((self.keys, self.spare_keys), (self.values, self.spare_values)):
                torch.index_select(
                    held[layer][:, :, :used], 0, index, out=spare[layer][:, :, :used]
                )
                held[layer], spare[layer] = spare[layer], held[layer]

    def crop(self, max_length: int) -> None:
        """Forget every token from ``max_length`` on (negative: that many from the end)."""
        self.length = max(
            0, self.length + max_length if max_length < 0 else min(max_length, self.length)
        )

    def append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``(rows, heads, new, head size)`` keys and values to ``layer``; returns every one
        held for it so far. The caller advances :attr:`length` once all layers are done."""
        start, new = self.length, keys.shape[2]
        if layer == len(self.keys):
            shape = (keys.shape[0], keys.shape[1], max(self.capacity, start + new), keys.shape[3])
            for store in (self.keys, self.values, self.spare_keys, self.spare_values):
                store.append(keys.new_empty(shape))
        elif start + new > self.keys[layer].shape[2]:  # more tokens than planned: grow
            grown = max(2 * self.keys[layer].shape[2], start + new)
            for store in (self.keys, self.values, self.spare_keys, self.spare_values):
                old = store[layer]
                bigger = old.new_empty((*old.shape[:2], grown, old.shape[3]))
                bigger[:, :, :start] = old[:, :, :start]
                store[layer] = bigger
        self.keys[layer][:, :, start : start + new] = keys
        self.values[layer][:, :, start : start + new] = values
        end = start + new
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def decoder_cache(captioner: Captioner, batch: int) -> dict[str, Any]:
    """``generate`` keywords for one batch of ``batch`` images that route BLIP's decoder through
    the fast forward (:func:`install`): a fresh :class:`DecoderCache`. Nothing for BLIP-2."""
    if captioner.kind != "blip":
        return {}
    install(captioner.model.text_decoder)
    install_vision(captioner.model.vision_model)
    config = captioner.config
    prompt = len(captioner.processor.tokenizer(config.prompt or "").input_ids)
    longest = config.max_length or 0
    if config.max_new_tokens is not None:
        longest = prompt + config.max_new_tokens
    cache = DecoderCache(beams=max(1, config.num_beams), capacity=max(longest, prompt + 1))
    return {cache_keyword(captioner.model.text_decoder): cache}


def cache_keyword(text_decoder: Any) -> str:
    """The ``generate`` keyword of BLIP's decoder cache in the installed transformers:
    ``cache`` (5.2x) or ``past_key_values`` (earlier), as the decoder's forward says; generate()
    refuses a keyword the forward does not take."""
    parameters = inspect.signature(text_decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def install(text_decoder: Any) -> None:
    """Give a ``BlipTextLMHeadModel`` the fast forward for calls that carry a
    :class:`DecoderCache`; any other call runs its own forward. Idempotent."""
    if getattr(text_decoder, _INSTALLED, False):
        return
    original = text_decoder.forward
    packed: list[_Decoder] = []

    @functools.wraps(original)  # generate() reads the forward's signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, DecoderCache) or args or not _plain_call(kwargs):
            return original(*args, **kwargs)
        if not packed:
            packed.append(_Decoder(text_decoder))
        return _decode(packed[0], cache, kwargs)

    text_decoder.forward = forward
    setattr(text_decoder, _INSTALLED, True)


def install_vision(vision_model: Any) -> None:
    """Give every attention of a ``BlipVisionModel`` a fused forward (one
    ``scaled_dot_product_attention``) for inference calls; with gradients on, or asked for its
    attention weights, the released forward runs. Idempotent."""
    if getattr(vision_model, _INSTALLED, False):
        return
    for layer in vision_model.encoder.layers:
        layer.self_attn.forward = _fused_attention(layer.self_attn)
    setattr(vision_model, _INSTALLED, True)


def _fused_attention(attention: Any) -> Any:
    """BLIP's vision attention ``(batch, tokens, width) -> (batch, tokens, width)`` fused."""
    original = attention.forward

    @functools.wraps(original)
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or args or kwargs.get("output_attentions"):
            return original(hidden_states, *args, **kwargs)
        batch, tokens, width = hidden_states.shape
        heads = attention.num_heads
        qkv = attention.qkv(hidden_states).reshape(batch, tokens, 3, heads, width // heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
        return attention.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None

    return forward


# keywords generate() passes that the fast forward reads or may ignore (given as None / False)
_READ = {
    "input_ids",
    "position_ids",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "attention_mask",
    "cache",
    "past_key_values",
    "logits_to_keep",
    "use_cache",
    "is_decoder",
    "return_dict",
    "cache_position",
}


def _plain_call(kwargs: dict[str, Any]) -> bool:
    """Whether a decoder call is one the fast forward computes exactly: token ids, an image, no
    padding, no gradients, nothing asked back but the logits."""
    if torch.is_grad_enabled() or kwargs.get("input_ids") is None:
        return False
    if kwargs.get("encoder_hidden_states") is None:
        return False
    for name, value in kwargs.items():
        if name not in _READ and value not in (None, False):
            return False
    for name in ("attention_mask", "encoder_attention_mask"):
        mask = kwargs.get(name)
        if mask is not None and not bool(mask.all()):
            return False
    return kwargs.get("is_decoder", True) is not False


def _decode(decoder: _Decoder, cache: DecoderCache, kwargs: dict[str, Any]) -> Any:
    """The fast forward: logits ``(rows, 1, vocabulary)`` of the last position."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    input_ids: torch.Tensor = kwargs["input_ids"]
    rows, new = input_ids.shape
    start = cache.length
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(start, start + new, device=input_ids.device)[None]
    hidden = decoder.word_embeddings(input_ids)
    hidden += decoder.position_embeddings(position_ids)
    hidden = decoder.embedding_norm(hidden)

    beams = cache.beams
    image = kwargs["encoder_hidden_states"]
    if rows % beams:
        raise ValueError(f"{rows} decoder rows are not images x {beams} beams")
    images = rows // beams
    heads, size = decoder.heads, decoder.head_size
    scale = math.sqrt(size)
    causal = None
    if new > 1:  # the prompt: each token sees itself and what came before
        seen = torch.ones(new, start + new, dtype=torch.bool, device=hidden.device).tril(start)
        causal = torch.zeros(seen.shape, dtype=hidden.dtype, device=hidden.device)
        causal.masked_fill_(~seen, torch.finfo(hidden.dtype).min)

    for index, layer in enumerate(decoder.layers):
        # self-attention over the cache
        query = layer.query(hidden).view(rows, new, heads, size).transpose(1, 2)
        key = layer.key(hidden).view(rows, new, heads, size).transpose(1, 2)
        value = layer.value(hidden).view(rows, new, heads, size).transpose(1, 2)
        keys, values = cache.append(index, key, value)
        scores = torch.matmul(query, keys.transpose(-1, -2)) / scale
        if causal is not None:
            scores = scores + causal
        context = torch.matmul(scores.softmax(dim=-1), values)
        context = context.transpose(1, 2).reshape(rows, new, heads * size)
        hidden = layer.attention_norm(layer.attention_out(context) + hidden)

        # cross-attention: the beams of an image are the rows of one query on its keys
        if len(cache.cross_keys) == index:
            per_image = image[::beams]
            tokens = per_image.shape[1]
            for store, projection in (
                (cache.cross_keys, layer.cross_key),
                (cache.cross_values, layer.cross_value),
            ):
                projected = projection(per_image).view(images, tokens, heads, size)
                store.append(projected.transpose(1, 2).contiguous())
        query = layer.cross_query(hidden).view(images, beams * new, heads, size).transpose(1, 2)
        scores = torch.matmul(query, cache.cross_keys[index].transpose(-1, -2)) / scale
        context = torch.matmul(scores.softmax(dim=-1), cache.cross_values[index])
        context = context.transpose(1, 2).reshape(rows, new, heads * size)
        hidden = layer.cross_norm(layer.cross_out(context) + hidden)

        # feed-forward
        inner = layer.activation(layer.intermediate(hidden))
        hidden = layer.output_norm(layer.output(inner) + hidden)
    cache.length = start + new

    last = hidden[:, -1:]
    last = decoder.transform_norm(decoder.transform_activation(decoder.transform(last)))
    logits = decoder.vocabulary(last)
    # the output's cache field is named as the installed transformers names it
    fields = CausalLMOutputWithCrossAttentions.__dataclass_fields__
    name = "cache" if "cache" in fields else "past_key_values"
    return CausalLMOutputWithCrossAttentions(logits=logits, **{name: cache})
