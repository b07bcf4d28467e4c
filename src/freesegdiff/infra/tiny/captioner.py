"""Tiny random BLIP and BLIP-2 captioners with their processors, in the transformers layout.

Both save exactly what the Hub checkpoints hold (``config.json``, ``generation_config.json``,
weights, tokenizer and processor files), so ``BlipForConditionalGeneration`` /
``Blip2ForConditionalGeneration`` and ``BlipProcessor`` / ``Blip2Processor`` load them back with
``from_pretrained``, like ``Salesforce/blip-image-captioning-base`` and
``Salesforce/blip2-opt-2.7b``. Inputs are 32x32 images cut into 8x8 patches.

The language-model heads are biased so that greedy decoding only ever picks whole words of
:data:`freesegdiff.infra.tiny.vocab.WORDS` (plus "." and "," for BLIP) or the end-of-caption token:
a random captioner would otherwise emit special tokens and byte-level fragments, and its
captions would neither parse into nouns downstream nor have a predictable word count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from freesegdiff.infra.tiny.vocab import WORDS, write_bert_vocab

IMAGE_SIZE = 32  # tiny input resolution (the real BLIP base uses 384, BLIP-2 224)
PATCH_SIZE = 8
NUM_QUERY_TOKENS = 4  # BLIP-2 Q-Former queries (the real model uses 32)
# Wider than the transformers default (0.02; 1e-10 for BLIP's vision embeddings) so that the
# image visibly changes a random caption: different photos get different captions.
INIT_STD = 0.3
# BLIP: the head bias of every banned token. BLIP-2: channel 0 of a banned token's (tied)
# embedding, which meets a constant 1 in the final hidden state; moderate, as it is also an
# input embedding, yet ~25 standard deviations below the random logits.
BANNED_LOGIT = -1.0e4
BANNED_CHANNEL = -30.0
# OPT's special tokens, ids 0..3 as in facebook/opt-* and Salesforce/blip2-opt-*.
OPT_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")
IMAGE_TOKEN = "<image>"


def _vision_config() -> dict[str, Any]:
    """The shared tiny ViT: (B, 3, 32, 32) -> (B, 1 + 16, 16)."""
    return {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "initializer_range": INIT_STD,
    }


def _image_processor() -> Any:
    """BLIP's image processor at 32x32 (resize, rescale, CLIP mean/std), PIL backend.

    The PIL variant is what transformers 5 falls back to without torchvision anyway; naming it
    keeps the saved ``processor_config.json`` the same on every machine.
    """
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_blip(folder: Path, seed: int = 0) -> None:
    """Save a tiny random ``BlipForConditionalGeneration`` and ``BlipProcessor`` under ``folder``.

    The tokenizer is BLIP's: a lower-casing BERT WordPiece (here over :data:`WORDS`) with
    ``[DEC]`` added as the bos token (the decoder's start token) and ``[ENC]`` as an extra
    special token; ``[SEP]`` ends a caption.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
    )

    folder = Path(folder)
    write_bert_vocab(folder)
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "encoder_hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "initializer_range": INIT_STD,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config=_vision_config(),
        projection_dim=16,
        initializer_range=INIT_STD,
    )
    model = BlipForConditionalGeneration(config).eval()
    token_ids = tokenizer.get_vocab()
    allowed = [tokenizer.sep_token_id, *(token_ids[token] for token in (*WORDS, ".", ","))]
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias  # (vocab,), added to the tied head
        keep = bias[allowed].clone()
        bias.fill_(BANNED_LOGIT)
        bias[allowed] = keep
    model.save_pretrained(folder)
    BlipProcessor(image_processor=_image_processor(), tokenizer=tokenizer).save_pretrained(folder)


def _byte_level_bpe(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a GPT-2 byte-level BPE in which every word is one token.

    Each word exists twice, as at the start of a text (``dog``) and after a space (``Ġdog``).
    The merges are learnt by the ``tokenizers`` BPE trainer on exactly those forms, so applying
    them in rank order rebuilds each word whole (hand-written merges can be pre-empted by a
    higher-ranked pair inside another word). Ids 0..3 are OPT's ``<s> <pad> </s> <unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never reached: training stops when every word is one token
        min_frequency=0,
        special_tokens=list(OPT_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*words, *(" " + word for word in words)], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges: list[tuple[str, str]] = []
    for merge in model["merges"]:  # ["a", "b"] pairs, or "a b" in older tokenizers releases
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merges.append((left, right))
    return dict(model["vocab"]), merges


def opt_tokenizer() -> Any:
    """A GPT-2 byte-level BPE over :data:`WORDS` laid out like ``blip2-opt``'s tokenizer.

    It prepends ``</s>`` (OPT's bos, which is also its eos), pads with ``<pad>`` and knows the
    ``<image>`` token that BLIP-2's processor repeats once per query token.
    """
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer

    vocab, merges = _byte_level_bpe(WORDS)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,  # annotated list[str]; tokenizers wants pairs
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], True)
    return tokenizer


def build_blip2(folder: Path, seed: int = 0) -> None:
    """Save a tiny random ``Blip2ForConditionalGeneration`` (OPT decoder) and ``Blip2Processor``.

    Laid out like ``Salesforce/blip2-opt-2.7b``: a GPT-2 byte-level BPE tokenizer that prepends
    ``</s>`` (OPT's bos, which is also its eos) and knows an ``<image>`` token; the processor
    stores ``num_query_tokens`` and, when given text, prepends that many ``<image>`` tokens
    which the model replaces with the Q-Former outputs.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = opt_tokenizer()
    token_ids = tokenizer.get_vocab()  # token -> id, added tokens included
    image_token_id = token_ids[IMAGE_TOKEN]
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=_vision_config(),
        qformer_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
            "vocab_size": 128,  # the Q-Former's own text embeddings, unused for captioning
            "cross_attention_frequency": 1,
            "initializer_range": INIT_STD,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "word_embed_proj_dim": 16,
            "ffn_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "init_std": INIT_STD,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
        initializer_range=INIT_STD,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    allowed = [tokenizer.eos_token_id, *(token_ids["Ġ" + word] for word in WORDS)]
    # OPT's head has no bias and is tied to the input embeddings: make channel 0 of the final
    # hidden state a constant 1 and give every banned token's embedding a large negative
    # channel 0, which is a bias in effect. Words come only in their "Ġword" form, so the
    # decoded caption is always space-separated whole words.
    decoder = model.language_model.model.decoder
    with torch.no_grad():
        decoder.final_layer_norm.weight[0] = 0.0
        decoder.final_layer_norm.bias[0] = 1.0
        embeddings = decoder.embed_tokens.weight  # (vocab, hidden)
        keep = embeddings[allowed, 0].clone()
        embeddings[:, 0] = BANNED_CHANNEL
        embeddings[allowed, 0] = keep
    model.save_pretrained(folder)
    processor = Blip2Processor(
        image_processor=_image_processor(), tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )
    processor.save_pretrained(folder)
