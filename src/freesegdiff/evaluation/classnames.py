"""Class names of the benchmarks, with synonyms, read from the files shipped in the package.

``freesegdiff/data/classnames/<dataset>.txt`` holds one class a line, in dataset id order (the
first class line is id 0). A line lists the class's synonyms, comma-separated (the SCLIP/NACLIP
convention); ``name: synonyms`` gives the class a display name other than its first synonym.
Lines starting with ``#`` and blank lines are skipped. The shipped synonyms are the standard
training-free protocol's files verbatim, so on VOC21 and COCO-Object the background class is
named "background" and matched through stuff words (sky, wall, tree, grass, road, ...).

A user file (``--class-names FILE``) may drop the ``name:`` prefixes: the display names then come
from the dataset's shipped file, and only the synonyms are taken from the user's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from freesegdiff.errors import ConfigError


@dataclass(frozen=True)
class ClassName:
    """One dataset class: how results name it and the texts that stand for it."""

    name: str  # display name (results.json, results.md)
    synonyms: tuple[str, ...]  # texts given to the pipeline; any of them means this class


def parse_class_names(text: str, source: str = "class-name file") -> list[ClassName]:
    """Parse the class-name format above; ``source`` names the file in error messages.

    Raises:
        ConfigError: a class line has no synonym, or the file has no class at all.
    """
    return [entry for entry, _ in _parse(text, source)]


def _parse(text: str, source: str) -> list[tuple[ClassName, bool]]:
    """Classes of ``text``, each with whether its line named it explicitly (``name:``)."""
    classes: list[tuple[ClassName, bool]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        body = rest if sep else line
        synonyms = tuple(word.strip() for word in body.split(",") if word.strip())
        if not synonyms:
            raise ConfigError(f"{source}, line {number}: a class needs at least one name")
        entry = ClassName(name=name.strip() if sep else synonyms[0], synonyms=synonyms)
        classes.append((entry, bool(sep)))
    if not classes:
        raise ConfigError(f"{source} lists no class")
    return classes


def shipped_class_files() -> list[str]:
    """Names of the shipped class-name files (dataset names), sorted."""
    folder = resources.files("freesegdiff") / "data" / "classnames"
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_class_names(dataset: str, override: str | Path | None = None) -> list[ClassName]:
    """The classes of ``dataset`` (a registry name such as ``voc21``), in id order.

    Args:
        dataset: the name of a shipped file (see :func:`shipped_class_files`).
        override: optional user file in the same format with one line per class of the dataset;
            its synonyms replace the shipped ones, display names stay the shipped ones unless the
            user's line has a ``name:`` prefix.

    Raises:
        ConfigError: unknown dataset, unreadable override, or a class count that does not match.
    """
    files = shipped_class_files()
    if dataset not in files:
        raise ConfigError(f"no class names for dataset {dataset!r}; known: {', '.join(files)}")
    text = (resources.files("freesegdiff") / "data" / "classnames" / f"{dataset}.txt").read_text()
    classes = parse_class_names(text, source=f"{dataset}.txt")
    if override is None:
        return classes
    path = Path(override)
    try:
        user_text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the class-name file {str(path)!r}: {error}") from error
    user = _parse(user_text, source=str(path))
    if len(user) != len(classes):
        raise ConfigError(
            f"{str(path)!r} lists {len(user)} classes but {dataset} has {len(classes)}; "
            "give one line per class, in the dataset's id order"
        )
    return [
        ClassName(name=mine.name if named else shipped.name, synonyms=mine.synonyms)
        for shipped, (mine, named) in zip(classes, user, strict=True)
    ]


@dataclass(frozen=True)
class FlatVocabulary:
    """The synonyms of all classes as one text list, each text mapped back to its class id.

    ``texts[j]`` stands for class ``class_ids[j]``. A text listed by several classes is kept
    once: for a class other than ``background_id`` if one lists it (COCO-Object lists "bed" both
    as a background stuff word and as a class; the class wins), else for the first class.
    """

    texts: tuple[str, ...]
    class_ids: tuple[int, ...]

    def class_of(self) -> dict[str, int]:
        """``{text: class id}``."""
        return dict(zip(self.texts, self.class_ids, strict=True))


def flatten_synonyms(classes: Sequence[ClassName], background_id: int | None) -> FlatVocabulary:
    """Flatten ``classes`` into :class:`FlatVocabulary`, in class order then synonym order."""
    owner: dict[str, int] = {}
    for class_id, entry in enumerate(classes):
        for text in entry.synonyms:
            if text not in owner or (owner[text] == background_id and class_id != background_id):
                owner[text] = class_id
    texts: list[str] = []
    ids: list[int] = []
    for class_id, entry in enumerate(classes):
        for text in entry.synonyms:
            if owner.get(text) == class_id and text not in texts:
                texts.append(text)
                ids.append(class_id)
    return FlatVocabulary(texts=tuple(texts), class_ids=tuple(ids))


def label_texts(
    classes: Sequence[ClassName], background_id: int | None, mode: str = "names"
) -> FlatVocabulary:
    """The texts a benchmark run gives the pipeline (``vocabulary.dataset_texts``).

    ``"names"`` (released): one text per class, its display name (``aeroplane``,
    ``diningtable``, ``pottedplant``, ``tvmonitor`` on VOC), the background class left out: its
    pixels are the ones no mask claims. ``"synonyms"``: every synonym of every class, the
    background's stuff words included (:func:`flatten_synonyms`; the later papers' protocol).

    Raises:
        ConfigError: an unknown ``mode``.
    """
    if mode == "synonyms":
        return flatten_synonyms(classes, background_id)
    if mode != "names":
        raise ConfigError(f"vocabulary.dataset_texts must be 'names' or 'synonyms', got {mode!r}")
    kept = [(entry.name, index) for index, entry in enumerate(classes) if index != background_id]
    return FlatVocabulary(
        texts=tuple(name for name, _ in kept), class_ids=tuple(index for _, index in kept)
    )
