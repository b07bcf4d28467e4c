"""Label colours: VOC palette for VOC names, a stable hashed colour otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from freesegdiff.io.visualize.colors import (
    MIN_COLOR_DISTANCE,
    color_distance,
    color_for,
    colors_for,
    hashed_color,
    palette_for,
    voc_color,
    voc_index,
)


def test_voc_palette_matches_the_dataset_pngs() -> None:
    # Values as in every VOC2012 SegmentationClass PNG palette.
    assert voc_color(0) == (0, 0, 0)
    assert voc_color(1) == (128, 0, 0)  # aeroplane
    assert voc_color(8) == (64, 0, 0)  # cat
    assert voc_color(11) == (192, 128, 0)  # diningtable
    assert voc_color(15) == (192, 128, 128)  # person
    assert voc_color(255) == (224, 224, 192)  # void


def test_voc_names_and_spellings_take_their_voc_colour() -> None:
    assert color_for("cat") == (64, 0, 0)
    assert color_for("Dining Table") == color_for("diningtable") == (192, 128, 0)
    assert color_for("airplane") == color_for("aeroplane") == (128, 0, 0)
    assert color_for("tv-monitor") == voc_color(20)
    assert color_for("background") == (0, 0, 0)
    assert voc_index("small bird") is None


def test_other_names_take_a_vivid_colour_fixed_by_the_name() -> None:
    colour = color_for("small bird")
    assert colour == hashed_color("small bird") == color_for("Small Bird ")
    assert colour == (80, 20, 208)  # BLAKE2b of "small bird": the same on every machine
    assert max(colour) >= 0.65 * 255 - 1  # never dark
    assert max(colour) - min(colour) > 0.5 * max(colour)  # never grey
    assert color_for("tree") != colour


def test_hashed_colour_does_not_depend_on_the_process_hash_seed() -> None:
    code = "from freesegdiff.io.visualize.colors import color_for; print(color_for('giraffe'))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout.strip())
    assert outputs == {str(color_for("giraffe"))}


def test_names_with_near_identical_colours_are_told_apart_in_one_image() -> None:
    names = [f"thing {i}" for i in range(400)]
    near = [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if color_distance(color_for(a), color_for(b)) < MIN_COLOR_DISTANCE
    ]
    assert near, "400 hashed colours must hold at least one close pair"
    first, second = near[0]
    colors = colors_for({0: "background", 1: first, 2: second})
    assert colors[1] == color_for(first)  # the lower id keeps its own colour
    assert color_distance(colors[1], colors[2]) >= MIN_COLOR_DISTANCE
    assert colors == colors_for({0: "background", 1: first, 2: second})  # deterministic


def test_palette_for_puts_each_label_colour_at_its_id() -> None:
    palette = palette_for({0: "background", 1: "cat", 2: "small bird"})
    assert len(palette) == 768
    assert palette[0:3] == [0, 0, 0]
    assert palette[3:6] == [64, 0, 0]
    assert palette[6:9] == list(color_for("small bird"))
    assert palette[255 * 3 :] == [224, 224, 192]  # unused indices keep the VOC palette
    assert palette_for({5: "person"})[0:3] == [0, 0, 0]  # 0 black even when not named


def test_palette_for_rejects_ids_a_png_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"0\.\.255"):
        palette_for({0: "background", 256: "cat"})
