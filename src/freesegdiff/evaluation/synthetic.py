"""Tiny fake benchmarks written in the real on-disk layouts, for tests and smoke runs.

Public: :func:`write_synthetic_dataset` lets a user try ``freesegdiff eval`` and ``ablate``
end to end without downloading a benchmark (the README's "Benchmark evaluation" shows it).

Each image is random noise; its ground truth is a few rectangles of random classes and a void
stripe, written in the raw encoding the layout uses (palette PNG, reduce-zero labels, COCO-Stuff
train ids, Cityscapes label ids, COCO instance JSON). Alongside, the expected decoded label maps
are computed with rules written here independently of the readers, so a test can check a reader
against them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

VOID = 255

# COCO 2017 category ids of the 80 thing classes, in COCO-Object class order (ids 1..80).
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)

# A few Cityscapes label ids and their train ids (road, sidewalk, sky, person, car; 0 and 4 void).
CITYSCAPES_SOME_IDS = {7: 0, 8: 1, 23: 10, 24: 11, 26: 13, 0: VOID, 4: VOID}


@dataclass
class SyntheticDataset:
    """Where a synthetic dataset was written and what its reader must return."""

    root: Path  # give this as --data-root
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # image id -> (H, W) class ids

    @property
    def image_ids(self) -> list[str]:
        return sorted(self.labels)


def _blocks(rng: np.random.Generator, height: int, width: int, values: list[int]) -> np.ndarray:
    """(H, W) raw map: four quadrants of random ``values`` and a one-pixel stripe of ``values[0]``.

    The stripe (row H // 2) carries the layout's void or "other" value when ``values[0]`` is one.
    """
    raw = np.empty((height, width), dtype=np.uint8)
    top, left = height // 2, width // 2
    quadrants = [(slice(0, top), slice(0, left)), (slice(0, top), slice(left, None))]
    quadrants += [(slice(top, None), slice(0, left)), (slice(top, None), slice(left, None))]
    for rows, cols in quadrants:
        raw[rows, cols] = rng.choice(values[1:])
    raw[top, :] = values[0]
    return raw


def _write_image(path: Path, rng: np.random.Generator, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_label(path: Path, raw: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        from freesegdiff.io.visualize.colors import voc_color

        image = Image.fromarray(raw, mode="P")
        image.putpalette([channel for i in range(256) for channel in voc_color(i)])
    else:
        image = Image.fromarray(raw, mode="L")
    image.save(path)


def write_synthetic_dataset(
    name: str,
    root: str | Path,
    num_images: int = 3,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
    coco_source: Literal["stuff", "json"] = "stuff",
) -> SyntheticDataset:
    """Write a ``num_images`` split of benchmark ``name`` under ``root``.

    Args:
        name: a registry name (``voc21``, ``voc20``, ``context60``, ``context59``,
            ``coco-object``, ``coco-stuff171``, ``coco-stuff27``, ``ade150``, ``cityscapes``).
        root: folder to write into (created); the layout's own folders go below it.
        num_images: images in the split.
        size: ``(width, height)`` of every image.
        seed: random seed for pixels and labels.
        coco_source: for ``coco-object``: COCO-Stuff train-id PNGs or COCO instance JSON.

    Returns:
        The root and the expected decoded label map of every image id.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = size
    result = SyntheticDataset(root=root)
    if name in ("voc21", "voc20", "context60", "context59"):
        voc = name.startswith("voc")
        folder = root / "VOCdevkit" / ("VOC2012" if voc else "VOC2010")
        count = 21 if voc else 60
        ids = [f"20{10 + i:02d}_{i:06d}" for i in range(num_images)]
        split = "Segmentation" if voc else "SegmentationContext"
        (folder / "ImageSets" / split).mkdir(parents=True, exist_ok=True)
        (folder / "ImageSets" / split / "val.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            _write_image(folder / "JPEGImages" / f"{image_id}.jpg", rng, height, width)
            # VOC: void 255 stripe; Context has no void, its stripe is background 0.
            raw = _blocks(rng, height, width, [VOID if voc else 0, *range(count)])
            label_folder = "SegmentationClass" if voc else "SegmentationClassContext"
            _write_label(folder / label_folder / f"{image_id}.png", raw, palette=voc)
            with_background = name in ("voc21", "context60")
            expected = raw.copy()
            if not with_background:  # background -> void, k -> k - 1
                expected = np.where((raw == 0) | (raw == VOID), VOID, raw - 1).astype(np.uint8)
            result.labels[image_id] = expected
        return result
    if name in ("coco-stuff171", "coco-stuff27", "coco-object") and coco_source == "stuff":
        folder = root / "coco_stuff164k"
        for i in range(num_images):
            image_id = f"{139 + i:012d}"
            _write_image(folder / "images" / "val2017" / f"{image_id}.jpg", rng, height, width)
            # train ids 0..79 things, 80..170 stuff; pick both kinds on purpose
            raw = _blocks(rng, height, width, [VOID, 0, 15, 79, 80, 120, 170])
            label = folder / "annotations" / "val2017" / f"{image_id}_labelTrainIds.png"
            _write_label(label, raw, palette=False)
            if name == "coco-object":
                raw = np.where(raw == VOID, VOID, np.where(raw < 80, raw + 1, 0)).astype(np.uint8)
            if name == "coco-stuff27":  # person, cat, toothbrush, banner, metal, wood ->
                # person, animal, indoor, textile, rawmaterial, solid
                coarse = {0: 9, 15: 7, 79: 4, 80: 17, 120: 16, 170: 24, VOID: VOID}
                raw = np.vectorize(coarse.__getitem__)(raw).astype(np.uint8)
            result.labels[image_id] = raw
        return result
    if name == "coco-object":
        return _write_coco_json(root / "coco", rng, num_images, width, height)
    if name == "ade150":
        folder = root / "ADEChallengeData2016"
        for i in range(num_images):
            image_id = f"ADE_val_{i + 1:08d}"
            _write_image(folder / "images" / "validation" / f"{image_id}.jpg", rng, height, width)
            raw = _blocks(rng, height, width, [0, 1, 2, 13, 150])  # 0 = "other"
            _write_label(folder / "annotations" / "validation" / f"{image_id}.png", raw, False)
            result.labels[image_id] = np.where(raw == 0, VOID, raw - 1).astype(np.uint8)
        return result
    if name == "cityscapes":
        folder = root / "cityscapes"
        for i in range(num_images):
            city = ("frankfurt", "lindau", "munster")[i % 3]
            stem = f"{city}_000000_{i:06d}"
            _write_image(
                folder / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                rng,
                height,
                width,
            )
            labels = folder / "gtFine" / "val" / city
            if i == 0:  # only raw label ids for the first image: the reader must convert them
                raw = _blocks(rng, height, width, [0, 4, 7, 8, 23, 24, 26])
                _write_label(labels / f"{stem}_gtFine_labelIds.png", raw, palette=False)
                lookup = np.full(256, VOID, dtype=np.uint8)
                for label_id, train_id in CITYSCAPES_SOME_IDS.items():
                    lookup[label_id] = train_id
                result.labels[stem] = lookup[raw]
            else:
                raw = _blocks(rng, height, width, [VOID, 0, 5, 11, 18])
                _write_label(labels / f"{stem}_gtFine_labelTrainIds.png", raw, palette=False)
                result.labels[stem] = raw
        return result
    raise ValueError(f"no synthetic layout for dataset {name!r}")


def _write_coco_json(
    folder: Path, rng: np.random.Generator, num_images: int, width: int, height: int
) -> SyntheticDataset:
    """COCO 2017 layout: ``val2017/*.jpg`` and ``annotations/instances_val2017.json``.

    Per image: a large rectangle (polygon) of one class, a small rectangle of another class
    inside it (painted over the large one: smaller instances stay visible), and a crowd region
    (uncompressed RLE) of a third class; the rest is background (0).
    """
    from freesegdiff.evaluation.classnames import load_class_names

    names = [entry.name for entry in load_class_names("coco-object")][1:]
    categories = [
        {"id": cid, "name": cname, "supercategory": "thing"}
        for cid, cname in zip(COCO_CATEGORY_IDS, names, strict=True)
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    result = SyntheticDataset(root=folder)
    for i in range(num_images):
        image_id = 139 + i
        stem = f"{image_id:012d}"
        _write_image(folder / "val2017" / f"{stem}.jpg", rng, height, width)
        images.append(
            {"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height}
        )
        big, small, crowd = (int(c) for c in rng.choice(80, size=3, replace=False))
        expected = np.zeros((height, width), dtype=np.uint8)
        # polygon x0,y0 .. x1,y1 covers columns x0..x1-1 and rows y0..y1-1 (pycocotools)
        x0, y0, x1, y1 = 2, 2, width // 2 + 4, height - 2
        expected[y0:y1, x0:x1] = big + 1
        sx0, sy0, sx1, sy1 = 4, 4, 8, 7
        expected[sy0:sy1, sx0:sx1] = small + 1
        crowd_mask = np.zeros((height, width), dtype=bool)
        crowd_mask[:, width - 6 :] = True
        expected[crowd_mask] = crowd + 1
        for box, category, area in (
            ((x0, y0, x1, y1), big, (x1 - x0) * (y1 - y0)),
            ((sx0, sy0, sx1, sy1), small, 12),
        ):
            bx0, by0, bx1, by1 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[category],
                    "segmentation": [[bx0, by0, bx1, by0, bx1, by1, bx0, by1]],
                    "area": float(area),
                    "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                    "iscrowd": 0,
                }
            )
        annotations.append({
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": COCO_CATEGORY_IDS[crowd],
            "segmentation": {"counts": _uncompressed_rle(crowd_mask), "size": [height, width]},
            "area": float(crowd_mask.sum()),
            "bbox": [width - 6, 0, 6, height],
            "iscrowd": 1,
        })  # fmt: skip
        result.labels[stem] = expected
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations" / "instances_val2017.json").write_text(json.dumps(document))
    return result


def _uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of 0s then 1s, alternating, column-major."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(value), 1
    counts.append(run)
    return counts
