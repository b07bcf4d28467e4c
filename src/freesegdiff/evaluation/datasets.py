"""Benchmark readers: the validation splits in their usual on-disk layouts.

Every reader yields :class:`Sample` s whose ``label_map`` holds the dataset's class ids (the line
order of its class-name file, see :mod:`freesegdiff.evaluation.classnames`) and 255 for void.
``--data-root`` may point at the dataset folder itself or at a folder above it (e.g. the folder
holding ``VOCdevkit``). Layouts, as MMSegmentation documents them:

=================  ==========================================================================
name               files (relative to the dataset folder) and label conversion
=================  ==========================================================================
voc21              ``VOCdevkit/VOC2012``: ``ImageSets/Segmentation/val.txt``,
                   ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG, 0 =
                   background, 1..20 classes, 255 void; RGB-coloured PNGs are decoded
                   through the VOC palette)
voc20              the same files; background becomes void, class k becomes k - 1
context60          ``VOCdevkit/VOC2010``: ``ImageSets/SegmentationContext/val.txt``,
                   ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png`` (0 =
                   background, 1..59 classes, as MMSegmentation's converter writes them)
context59          the same files; background becomes void, class k becomes k - 1
coco-stuff171      ``coco_stuff164k``: ``images/val2017/<id>.jpg``,
                   ``annotations/val2017/<id>_labelTrainIds.png`` (0..170, 255 void)
coco-stuff27       the same files, each class mapped to its COCO-Stuff supercategory
                   (:data:`COCO_STUFF_SUPERCATEGORY`: 12 thing, 15 stuff)
coco-object        ``coco_stuff164k`` as above: ``<id>_instanceTrainIds.png`` when present
                   (SCLIP's ``cvt_coco_object.py``: 0 background, 1..80 things) else
                   ``<id>_labelTrainIds.png`` with things 0..79 -> 1..80 and stuff 80..170 ->
                   background; or, without those, COCO 2017: ``annotations/
                   instances_val2017.json`` (pycocotools) with ``val2017/<id>.jpg`` (or
                   ``images/val2017``): every instance, crowd regions included, is painted
                   with its class, larger instances first so small ones stay visible; the
                   rest is background (this source has no void)
ade150             ``ADEChallengeData2016``: ``images/validation/<id>.jpg``,
                   ``annotations/validation/<id>.png`` (0 = "other" becomes void, k -> k - 1)
cityscapes         ``cityscapes``: ``leftImg8bit/val/<city>/<id>_leftImg8bit.png``,
                   ``gtFine/val/<city>/<id>_gtFine_labelTrainIds.png`` (0..18, 255), or the
                   raw ``_gtFine_labelIds.png`` mapped to the 19 train ids
=================  ==========================================================================

Readers check every file exists when they are opened, so a wrong ``--data-root`` fails at once
with what was looked for; samples are read lazily while iterating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from freesegdiff.errors import FreeSegDiffError, ImageReadError
from freesegdiff.evaluation.classnames import ClassName, load_class_names
from freesegdiff.infra.extras import install_hint
from freesegdiff.io.images import EncodedImage

logger = logging.getLogger(__name__)

VOID = 255


class DatasetError(FreeSegDiffError, OSError):
    """A dataset folder is missing, incomplete or holds labels we cannot read."""


@dataclass
class Sample:
    """One validation image and its ground truth.

    ``error`` is set when the ground truth cannot be used (unreadable, values the dataset does
    not define, or not the size of its image); ``label_map`` is then empty, ``(0, 0)``, and the
    evaluation reports the image instead of scoring it. ``encoded``: the image file's bytes
    when they were read already (a Ray run reads them in CPU tasks); predictors decode those
    instead of opening ``image_path``.
    """

    image_id: str  # unique in the split; the prediction cache's file stem
    image_path: Path
    label_map: np.ndarray  # (H, W) uint8 dataset class ids, 255 void
    error: DatasetError | None = None
    encoded: EncodedImage | None = None


class SegmentationDataset(Protocol):
    """What the evaluation loop needs from a benchmark."""

    name: str  # registry name, e.g. "voc21"
    classes: list[ClassName]  # in id order
    background_id: int | None  # id of the background class, None when the dataset has none
    source: str  # which files the samples come from, in words

    @property
    def class_names(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Sample]: ...


# ------------------------------------------------------------------------------ label decoding


def lookup_table(mapping: dict[int, int], default: int = -1) -> np.ndarray:
    """A 256-entry int16 table: raw label value -> class id; ``default`` (-1: illegal) elsewhere."""
    table = np.full(256, default, dtype=np.int16)
    for raw, class_id in mapping.items():
        table[raw] = class_id
    return table


def identity_table(num_classes: int) -> np.ndarray:
    """Values 0..N-1 and 255 are kept; anything else is illegal."""
    return lookup_table({**{k: k for k in range(num_classes)}, VOID: VOID})


def reduce_zero_table(num_classes: int) -> np.ndarray:
    """MMSegmentation's ``reduce_zero_label``: 0 -> void, k -> k - 1 (k = 1..N), 255 kept."""
    return lookup_table({0: VOID, **{k: k - 1 for k in range(1, num_classes + 1)}, VOID: VOID})


# Cityscapes label ids -> the 19 train ids (cityscapesscripts' labels.py); the rest is void.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def _voc_palette() -> np.ndarray:
    from freesegdiff.io.visualize.colors import voc_color

    return np.array([voc_color(i) for i in range(256)], dtype=np.uint8)


def read_label_png(path: Path, table: np.ndarray, rgb_palette: bool = False) -> np.ndarray:
    """Read a label PNG and map its raw values through ``table``.

    Args:
        path: palette ("P") or grey ("L") PNG of raw label values.
        table: 256-entry raw value -> class id table; -1 marks values that must not occur.
        rgb_palette: accept RGB PNGs coloured with the VOC palette (decoded to indices).

    Returns:
        ``(H, W)`` uint8 class ids, 255 void.

    Raises:
        DatasetError: unreadable file (a decompression bomb too), unexpected mode, or a value
            the table forbids.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            raw = np.asarray(image)
    except Exception as error:  # any decoding failure is this file's problem, not the run's
        raise DatasetError(
            f"cannot read the label file {str(path)!r}: {type(error).__name__}: {error}"
        ) from error
    if mode == "RGB" and rgb_palette:
        raw = _decode_rgb(raw, path)
    elif mode not in ("P", "L") and not (mode.startswith("I") and raw.max(initial=0) <= 255):
        raise DatasetError(
            f"{str(path)!r} is a {mode} image; label files must be palette or 8-bit grey PNGs "
            "of class indices"
        )
    labels = table[raw.astype(np.uint8)]
    if (labels < 0).any():
        bad = np.unique(raw[labels < 0])[:10].tolist()
        raise DatasetError(f"{str(path)!r} holds label values {bad} this dataset does not define")
    return labels.astype(np.uint8)


def _decode_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    """VOC-palette-coloured RGB -> palette indices."""
    palette = _voc_palette().astype(np.int32)
    codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    index_of = {int(code): i for i, code in reversed(list(enumerate(codes)))}
    rgb = pixels.astype(np.int32)
    flat = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    unique, inverse = np.unique(flat, return_inverse=True)
    missing = [int(u) for u in unique if int(u) not in index_of]
    if missing:
        colours = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in missing[:5]]
        raise DatasetError(
            f"{str(path)!r} holds colours {colours} that are not VOC palette colours"
        )
    indices = np.array([index_of[int(u)] for u in unique], dtype=np.uint8)
    return indices[inverse].reshape(flat.shape)


def header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` that an image file's header states (no pixel is decoded,
    :func:`freesegdiff.io.images.header_size`).

    None when the header cannot be read or claims more pixels than the default limit (a
    decompression bomb): reading the image then fails in the pipeline, which reports it for
    that image (the image's failure, not its ground truth's).
    """
    from freesegdiff.config import DEFAULT_MAX_PIXELS
    from freesegdiff.io.images import header_size as read_header

    try:
        return read_header(path, max_pixels=DEFAULT_MAX_PIXELS)
    except ImageReadError:
        return None


def checked_sample(
    image_id: str, image_path: Path, ground_truth: str, read: Callable[[], np.ndarray]
) -> Sample:
    """A :class:`Sample` whose ground truth was read by ``read`` and fits its image.

    Args:
        image_id: the sample's id.
        image_path: its image file.
        ground_truth: where the ground truth comes from, for messages (a file path).
        read: reads the ``(H, W)`` label map; may raise :class:`DatasetError`.

    Returns:
        The sample; with ``error`` set (naming both files and both sizes) when the ground truth
        is unreadable or its size differs from the size the image file's header states.
    """
    try:
        label_map = read()
    except DatasetError as error:
        return Sample(image_id, image_path, np.zeros((0, 0), dtype=np.uint8), error)
    size = header_size(image_path)
    label_size = (label_map.shape[1], label_map.shape[0])
    if size is not None and size != label_size:
        mismatch = DatasetError(
            f"the ground truth {ground_truth!r} is {label_size[0]}x{label_size[1]} but its image "
            f"{str(image_path)!r} is {size[0]}x{size[1]} (width x height)"
        )
        return Sample(image_id, image_path, np.zeros((0, 0), dtype=np.uint8), mismatch)
    return Sample(image_id, image_path, label_map)


# ------------------------------------------------------------------------------ readers


def find_dataset_folder(root: Path, candidates: Sequence[str], marker: str, what: str) -> Path:
    """The first of ``root / candidate`` that contains ``marker``.

    Raises:
        DatasetError: none does; the message lists every place looked at.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"the data root {str(root)!r} is not a folder")
    tried = []
    for candidate in candidates:
        folder = root / candidate if candidate else root
        if (folder / marker).exists():
            return folder
        tried.append(str(folder / marker))
    raise DatasetError(f"no {what} found under {str(root)!r}; looked for:\n  " + "\n  ".join(tried))


@dataclass
class _Entry:
    image_id: str
    image_path: Path
    label_path: Path


class LabelFileDataset:
    """A split whose ground truth is one label PNG per image, decoded through a lookup table."""

    def __init__(
        self,
        name: str,
        entries: list[_Entry],
        table: np.ndarray,
        background_id: int | None,
        source: str,
        rgb_palette: bool = False,
        tables: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.name = name
        self.classes = load_class_names(name)
        self.background_id = background_id
        self.source = source
        self._entries = entries
        self._table = table
        self._tables = tables or {}  # label-file suffix -> table, overriding ``table``
        self._rgb_palette = rgb_palette
        missing = [e for e in entries if not e.image_path.is_file() or not e.label_path.is_file()]
        if missing:
            first = missing[0]
            gone = first.image_path if not first.image_path.is_file() else first.label_path
            raise DatasetError(
                f"{name}: {len(missing)} of {len(entries)} images lack their image or label "
                f"file, e.g. {str(gone)!r}"
            )
        if not entries:
            raise DatasetError(f"{name}: the split lists no image ({source})")

    @property
    def class_names(self) -> list[str]:
        return [entry.name for entry in self.classes]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Sample]:
        for entry in self._entries:
            table = self._table
            for suffix, special in self._tables.items():
                if entry.label_path.name.endswith(suffix):
                    table = special
            yield checked_sample(
                entry.image_id,
                entry.image_path,
                str(entry.label_path),
                partial(read_label_png, entry.label_path, table, self._rgb_palette),
            )


def _read_split(path: Path) -> list[str]:
    """The image ids a split file lists, one per line, stripped, each once.

    An id listed twice (``good`` and ``  good  ``) would be predicted and scored twice, which
    skews every metric: the later lines are dropped with a warning that names them.
    """
    ids: list[str] = []
    first_line: dict[str, int] = {}
    repeated: list[str] = []
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    for number, line in enumerate(lines, start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in first_line:
            repeated.append(f"{image_id!r} on line {number} (first on line {first_line[image_id]})")
            continue
        first_line[image_id] = number
        ids.append(image_id)
    if repeated:
        shown = "; ".join(repeated[:5]) + (
            f"; and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        )
        logger.warning(
            "%s lists %d image ids again: %s; each image is scored once", path, len(repeated), shown
        )
    return ids


def _voc(root: Path, name: str) -> LabelFileDataset:
    folder = find_dataset_folder(
        root, ["", "VOC2012", "VOCdevkit/VOC2012"], "ImageSets/Segmentation/val.txt", "VOC2012"
    )
    entries = [
        _Entry(i, folder / "JPEGImages" / f"{i}.jpg", folder / "SegmentationClass" / f"{i}.png")
        for i in _read_split(folder / "ImageSets/Segmentation/val.txt")
    ]
    with_background = name == "voc21"
    return LabelFileDataset(
        name,
        entries,
        identity_table(21) if with_background else reduce_zero_table(20),
        background_id=0 if with_background else None,
        source=f"{folder} (SegmentationClass, val.txt)",
        rgb_palette=True,
    )


def open_voc21(root: Path) -> LabelFileDataset:
    """Pascal VOC 2012 val, 20 classes + background (id 0)."""
    return _voc(root, "voc21")


def open_voc20(root: Path) -> LabelFileDataset:
    """Pascal VOC 2012 val without background: background pixels are void."""
    return _voc(root, "voc20")


def _context(root: Path, name: str) -> LabelFileDataset:
    split = "ImageSets/SegmentationContext/val.txt"
    folder = find_dataset_folder(
        root, ["", "VOC2010", "VOCdevkit/VOC2010"], split, "Pascal Context (VOC2010)"
    )
    entries = [
        _Entry(
            i, folder / "JPEGImages" / f"{i}.jpg", folder / "SegmentationClassContext" / f"{i}.png"
        )
        for i in _read_split(folder / split)
    ]
    with_background = name == "context60"
    return LabelFileDataset(
        name,
        entries,
        identity_table(60) if with_background else reduce_zero_table(59),
        background_id=0 if with_background else None,
        source=f"{folder} (SegmentationClassContext, val.txt)",
    )


def open_context60(root: Path) -> LabelFileDataset:
    """Pascal Context val, 59 classes + background (id 0)."""
    return _context(root, "context60")


def open_context59(root: Path) -> LabelFileDataset:
    """Pascal Context val without background: background pixels are void."""
    return _context(root, "context59")


def _coco_stuff_entries(folder: Path, suffixes: Sequence[str]) -> list[_Entry]:
    """Images of ``images/val2017`` paired with the first existing label file of ``suffixes``."""
    labels = folder / "annotations" / "val2017"
    entries = []
    for image_path in sorted((folder / "images" / "val2017").glob("*.jpg")):
        stem = image_path.stem
        candidates = [labels / f"{stem}{suffix}" for suffix in suffixes]
        label = next((c for c in candidates if c.is_file()), candidates[-1])
        entries.append(_Entry(stem, image_path, label))
    return entries


def _open_coco_stuff(root: Path, name: str, table: np.ndarray, note: str = "") -> LabelFileDataset:
    """COCO-Stuff-164k val's train-id label files, mapped to ``name``'s classes by ``table``."""
    folder = find_dataset_folder(
        root, ["", "coco_stuff164k"], "annotations/val2017", "COCO-Stuff-164k"
    )
    return LabelFileDataset(
        name,
        _coco_stuff_entries(folder, ["_labelTrainIds.png"]),
        table,
        background_id=None,
        source=f"{folder} (annotations/val2017/*_labelTrainIds.png{note})",
    )


def open_coco_stuff171(root: Path) -> LabelFileDataset:
    """COCO-Stuff-164k val (5,000 images), 171 classes."""
    return _open_coco_stuff(root, "coco-stuff171", identity_table(171))


# COCO-Stuff train ids 0..79 are the things (COCO-Object 1..80), 80..170 the stuff (background).
COCO_STUFF_TO_OBJECT = lookup_table(
    {**{t: t + 1 for t in range(80)}, **{t: 0 for t in range(80, 171)}, VOID: VOID}
)


# COCO-Stuff's supercategories: the coarse class (0..26) of each of the 171 train ids, in train
# id order (things 0..79, stuff 80..170): the 27-class split of COCO-Stuff's own label hierarchy
# that unsupervised segmentation reports (PiCIE, STEGO, diffusion-feature methods).
COCO_STUFF_SUPERCATEGORY: tuple[int, ...] = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5,
    5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
    3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4,
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21,
    15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17,
    16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20,
    17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18,
    18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24,
)  # fmt: skip
COCO_STUFF_TO_27 = lookup_table({**dict(enumerate(COCO_STUFF_SUPERCATEGORY)), VOID: VOID})


def open_coco_stuff27(root: Path) -> LabelFileDataset:
    """COCO-Stuff-164k val (5,000 images) in its 27 supercategories (12 thing, 15 stuff)."""
    return _open_coco_stuff(root, "coco-stuff27", COCO_STUFF_TO_27, ", 171 -> 27 supercategories")


def open_coco_object(root: Path) -> SegmentationDataset:
    """COCO-Object: the 80 COCO thing classes + background (id 0), from COCO-Stuff or COCO JSON."""
    root = Path(root).expanduser()
    for candidate in ("", "coco_stuff164k"):
        folder = root / candidate if candidate else root
        if (folder / "annotations" / "val2017").is_dir() and (
            folder / "images" / "val2017"
        ).is_dir():
            return LabelFileDataset(
                "coco-object",
                _coco_stuff_entries(folder, ["_instanceTrainIds.png", "_labelTrainIds.png"]),
                COCO_STUFF_TO_OBJECT,
                background_id=0,
                source=f"{folder} (annotations/val2017, *_instanceTrainIds.png or "
                "*_labelTrainIds.png)",
                tables={"_instanceTrainIds.png": identity_table(81)},
            )
    for candidate in ("", "coco"):
        folder = root / candidate if candidate else root
        if (folder / "annotations" / "instances_val2017.json").is_file():
            return CocoInstancesDataset(folder)
    raise DatasetError(
        f"no COCO-Object data found under {str(root)!r}; looked for coco_stuff164k's "
        "annotations/val2017 with images/val2017, or COCO 2017's annotations/instances_val2017.json"
    )


class CocoInstancesDataset:
    """COCO-Object rasterised from COCO 2017 val instance annotations with pycocotools."""

    name = "coco-object"
    background_id: int | None = 0

    def __init__(self, folder: Path) -> None:
        try:
            from pycocotools.coco import COCO
        except ImportError as error:
            raise DatasetError(install_hint("coco-instances")) from error
        import contextlib
        import io

        self.classes = load_class_names("coco-object")
        annotations = folder / "annotations" / "instances_val2017.json"
        self._annotations = str(annotations)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            try:
                self._coco = COCO(str(annotations))
            except (OSError, ValueError, KeyError) as error:
                raise DatasetError(f"cannot read {str(annotations)!r}: {error}") from error
        by_name = {entry.name: class_id for class_id, entry in enumerate(self.classes)}
        self._class_of_category: dict[int, int] = {}
        for category in self._coco.loadCats(self._coco.getCatIds()):
            if category["name"] not in by_name:
                raise DatasetError(
                    f"{str(annotations)!r}: category {category['name']!r} is not a "
                    "COCO-Object class"
                )
            self._class_of_category[category["id"]] = by_name[category["name"]]
        images = next(
            (p for p in (folder / "val2017", folder / "images" / "val2017") if p.is_dir()), None
        )
        if images is None:
            raise DatasetError(f"no val2017 or images/val2017 image folder in {str(folder)!r}")
        self._images = images
        self._image_ids = sorted(self._coco.getImgIds())
        infos = self._coco.loadImgs(self._image_ids)
        missing = [
            info["file_name"] for info in infos if not (images / info["file_name"]).is_file()
        ]
        if missing:
            raise DatasetError(
                f"coco-object: {len(missing)} images of the annotations are missing in "
                f"{str(images)!r}, e.g. {missing[0]!r}"
            )
        if not self._image_ids:
            raise DatasetError(f"{str(annotations)!r} lists no image")
        self.source = f"{annotations} (pycocotools, crowd regions included)"

    @property
    def class_names(self) -> list[str]:
        return [entry.name for entry in self.classes]

    def __len__(self) -> int:
        return len(self._image_ids)

    def label_map(self, image_id: int) -> np.ndarray:
        """``(H, W)`` uint8: background 0, each instance painted with its class, largest first."""
        info = self._coco.loadImgs([image_id])[0]
        label_map = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        annotations = self._coco.loadAnns(self._coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        for annotation in sorted(annotations, key=lambda a: -float(a.get("area", 0.0))):
            mask = self._coco.annToMask(annotation).astype(bool)
            label_map[mask] = self._class_of_category[annotation["category_id"]]
        return label_map

    def __iter__(self) -> Iterator[Sample]:
        for image_id in self._image_ids:
            info = self._coco.loadImgs([image_id])[0]
            path = self._images / info["file_name"]
            where = f"{self._annotations} (image id {image_id})"
            yield checked_sample(path.stem, path, where, partial(self._read, image_id, where))

    def _read(self, image_id: int, where: str) -> np.ndarray:
        try:
            return self.label_map(image_id)
        except Exception as error:  # a malformed annotation loses its image only
            raise DatasetError(
                f"cannot rasterise {where}: {type(error).__name__}: {error}"
            ) from error


def open_ade150(root: Path) -> LabelFileDataset:
    """ADE20K SceneParsing val (2,000 images), 150 classes; "other" (0) is void."""
    folder = find_dataset_folder(
        root,
        ["", "ADEChallengeData2016", "ade/ADEChallengeData2016"],
        "annotations/validation",
        "ADE20K (ADEChallengeData2016)",
    )
    entries = [
        _Entry(p.stem, p, folder / "annotations" / "validation" / f"{p.stem}.png")
        for p in sorted((folder / "images" / "validation").glob("*.jpg"))
    ]
    return LabelFileDataset(
        "ade150",
        entries,
        reduce_zero_table(150),
        background_id=None,
        source=f"{folder} (annotations/validation)",
    )


def open_cityscapes(root: Path) -> LabelFileDataset:
    """Cityscapes val (500 images), the 19 train-id classes."""
    folder = find_dataset_folder(root, ["", "cityscapes"], "gtFine/val", "Cityscapes")
    entries = []
    for image_path in sorted((folder / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png")):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        labels = folder / "gtFine" / "val" / image_path.parent.name
        train_ids = labels / f"{stem}_gtFine_labelTrainIds.png"
        raw_ids = labels / f"{stem}_gtFine_labelIds.png"
        label = train_ids if train_ids.is_file() or not raw_ids.is_file() else raw_ids
        entries.append(_Entry(stem, image_path, label))
    raw_table = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID, default=VOID)
    return LabelFileDataset(
        "cityscapes",
        entries,
        identity_table(19),
        background_id=None,
        source=f"{folder} (gtFine/val, *_labelTrainIds.png or *_labelIds.png)",
        tables={"_gtFine_labelIds.png": raw_table},
    )


DATASETS: dict[str, Callable[[Path], SegmentationDataset]] = {
    "voc21": open_voc21,
    "voc20": open_voc20,
    "context60": open_context60,
    "context59": open_context59,
    "coco-object": open_coco_object,
    "coco-stuff171": open_coco_stuff171,
    "coco-stuff27": open_coco_stuff27,
    "ade150": open_ade150,
    "cityscapes": open_cityscapes,
}


def open_dataset(
    name: str, root: str | Path, class_names_file: str | Path | None = None
) -> SegmentationDataset:
    """Open the validation split of benchmark ``name`` (a :data:`DATASETS` key) under ``root``.

    Args:
        name: the benchmark.
        root: the dataset folder or a folder above it.
        class_names_file: a class-name file whose synonyms replace the shipped ones (see
            :func:`~freesegdiff.evaluation.classnames.load_class_names`).

    Raises:
        DatasetError: unknown name, or the files are not where the layout says.
        ConfigError: the class-name file does not fit the dataset.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    dataset = DATASETS[name](Path(root))
    if class_names_file is not None:
        dataset.classes = load_class_names(name, override=class_names_file)
    return dataset
