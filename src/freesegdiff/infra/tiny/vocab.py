"""A small English vocabulary and tokenizer files built from it, for the tiny random models.

The words are real (the VOC and COCO class names, common scene nouns, adjectives and function
words) so that a tiny captioner's random output still parses into nouns and adjectives.
"""

from __future__ import annotations

from pathlib import Path

NOUNS = [
    "person",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "bird",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "bottle",
    "chair",
    "table",
    "sofa",
    "plant",
    "television",
    "laptop",
    "phone",
    "book",
    "clock",
    "vase",
    "cup",
    "bowl",
    "banana",
    "apple",
    "pizza",
    "cake",
    "tree",
    "grass",
    "sky",
    "road",
    "wall",
    "building",
    "water",
    "sea",
    "floor",
    "field",
    "branch",
    "street",
    "window",
    "door",
    "kitchen",
    "room",
    "beach",
    "snow",
    "mountain",
    "rock",
    "flower",
    "fence",
    "bench",
    "umbrella",
    "kite",
    "bed",
    "toilet",
    "sink",
    "oven",
    "keyboard",
    "mouse",
    "frisbee",
    "ball",
    "picture",  # so that BLIP's caption prompt "a picture of " round-trips through the tokenizer
    "photo",
]
ADJECTIVES = [
    "small",
    "large",
    "red",
    "black",
    "white",
    "brown",
    "green",
    "blue",
    "old",
    "young",
    "wooden",
    "tall",
]
OTHERS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "near",
    "next",
    "to",
    "by",
    "is",
    "are",
    "sitting",
    "standing",
    "playing",
    "holding",
    "parked",
    "flying",
    "there",
    "two",
    "three",
    "some",
]
WORDS: tuple[str, ...] = tuple(dict.fromkeys([*NOUNS, *ADJECTIVES, *OTHERS]))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by CLIP's byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def clip_bpe(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a CLIP-style byte-level BPE whose merges build every word.

    Returns:
        ``(vocab, merges)``: vocab maps token -> id (256 bytes, 256 end-of-word bytes, the merged
        tokens, then the two special tokens); merges are ``(left, right)`` pairs in rank order.
    """
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            left = left + right
            if merge not in merges:
                merges.append(merge)
                tokens.append(left)
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> int:
    """Save a CLIP tokenizer over :data:`WORDS` to ``folder``; return its vocabulary size."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # the tokenizers backend takes pairs
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(folder)
    return len(vocab)


BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_bert_vocab(folder: Path, words: tuple[str, ...] = WORDS) -> Path:
    """Write a WordPiece ``vocab.txt`` (special tokens, then ``words``); return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join([*BERT_SPECIAL, *words, ".", ","]) + "\n")
    return path
