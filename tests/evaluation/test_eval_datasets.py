"""Dataset readers on small synthetic datasets written in each on-disk layout; class names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from freesegdiff.errors import ConfigError
from freesegdiff.evaluation.classnames import (
    flatten_synonyms,
    load_class_names,
    parse_class_names,
    shipped_class_files,
)
from freesegdiff.evaluation.datasets import DATASETS, DatasetError, open_dataset
from freesegdiff.evaluation.synthetic import write_synthetic_dataset

LAYOUTS = [(name, "stuff") for name in DATASETS] + [("coco-object", "json")]
CLASS_COUNTS = {
    "voc21": 21,
    "voc20": 20,
    "context60": 60,
    "context59": 59,
    "coco-object": 81,
    "coco-stuff171": 171,
    "coco-stuff27": 27,
    "ade150": 150,
    "cityscapes": 19,
}


@pytest.mark.parametrize(("name", "source"), LAYOUTS)
def test_reader_returns_the_written_labels(tmp_path, name, source):
    if source == "json":
        pytest.importorskip("pycocotools")
    written = write_synthetic_dataset(name, tmp_path, num_images=3, coco_source=source)
    dataset = open_dataset(name, tmp_path)
    assert len(dataset) == 3
    assert len(dataset.class_names) == CLASS_COUNTS[name]
    samples = list(dataset)
    assert sorted(s.image_id for s in samples) == written.image_ids
    for sample in samples:
        assert sample.label_map.dtype == np.uint8
        np.testing.assert_array_equal(sample.label_map, written.labels[sample.image_id])
        with Image.open(sample.image_path) as image:
            assert image.size == (sample.label_map.shape[1], sample.label_map.shape[0])


def test_voc_background_handling(tmp_path):
    write_synthetic_dataset("voc21", tmp_path, num_images=1)
    voc21, voc20 = open_dataset("voc21", tmp_path), open_dataset("voc20", tmp_path)
    assert voc21.background_id == 0 and voc20.background_id is None
    assert voc21.class_names[0] == "background" and voc20.class_names[0] == "aeroplane"
    label21 = next(iter(voc21)).label_map
    label20 = next(iter(voc20)).label_map
    # VOC20 is VOC21 with background made void and every class id one lower
    expected = np.where((label21 == 0) | (label21 == 255), 255, label21 - 1)
    np.testing.assert_array_equal(label20, expected)


def test_data_root_may_be_the_dataset_folder_itself(tmp_path):
    write_synthetic_dataset("voc21", tmp_path, num_images=2)
    assert len(open_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012")) == 2
    assert len(open_dataset("voc21", tmp_path / "VOCdevkit")) == 2


def test_voc_rgb_coloured_labels_are_decoded_through_the_palette(tmp_path):
    written = write_synthetic_dataset("voc21", tmp_path, num_images=1)
    (image_id,) = written.image_ids
    path = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{image_id}.png"
    with Image.open(path) as image:
        image.convert("RGB").save(path)
    np.testing.assert_array_equal(
        next(iter(open_dataset("voc21", tmp_path))).label_map, written.labels[image_id]
    )


def test_coco_object_prefers_instance_train_ids(tmp_path):
    written = write_synthetic_dataset("coco-object", tmp_path, num_images=1)
    (image_id,) = written.image_ids
    folder = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    object_ids = np.full((30, 40), 7, dtype=np.uint8)  # SCLIP's converted file, used as is
    Image.fromarray(object_ids, mode="L").save(folder / f"{image_id}_instanceTrainIds.png")
    np.testing.assert_array_equal(next(iter(open_dataset("coco-object", tmp_path))).label_map, 7)


def test_wrong_root_says_where_it_looked(tmp_path):
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/val\.txt"):
        open_dataset("voc21", tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset("ade150", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown dataset 'voc'"):
        open_dataset("voc", tmp_path)


def test_missing_label_file_fails_when_opened(tmp_path):
    written = write_synthetic_dataset("ade150", tmp_path, num_images=2)
    missing = written.image_ids[1]
    (tmp_path / "ADEChallengeData2016" / "annotations" / "validation" / f"{missing}.png").unlink()
    with pytest.raises(DatasetError, match="1 of 2 images lack"):
        open_dataset("ade150", tmp_path)


def test_label_values_the_dataset_does_not_define_are_errors(tmp_path):
    written = write_synthetic_dataset("cityscapes", tmp_path, num_images=2)
    stem = written.image_ids[1]
    city = stem.split("_")[0]
    path = tmp_path / "cityscapes" / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((30, 40), 19, dtype=np.uint8)).save(path)
    good, bad = list(open_dataset("cityscapes", tmp_path))  # the bad one loses only itself
    assert good.error is None
    np.testing.assert_array_equal(good.label_map, written.labels[good.image_id])
    assert isinstance(bad.error, DatasetError)
    assert "label values [19]" in str(bad.error) and str(path) in str(bad.error)
    assert bad.label_map.shape == (0, 0)


def test_every_dataset_ships_its_class_names():
    assert shipped_class_files() == sorted(DATASETS)
    for name, count in CLASS_COUNTS.items():
        assert len(load_class_names(name)) == count


def test_standard_background_synonyms_and_class_wording():
    voc21 = load_class_names("voc21")
    assert voc21[0].name == "background"
    assert voc21[0].synonyms[:4] == ("sky", "wall", "tree", "wood")
    assert len(voc21[0].synonyms) == 26
    person = voc21[15]
    assert person.name == "person" and "person in jeans" in person.synonyms
    assert voc21[20].name == "tvmonitor" and voc21[20].synonyms[0] == "television monitor"
    coco = load_class_names("coco-object")
    assert coco[0].synonyms == voc21[0].synonyms
    assert coco[1].synonyms[-1] == "body"
    ade = load_class_names("ade150")
    assert ade[44].name == "chest of drawers" and ade[44].synonyms == ("chestofdrawers",)


def test_flattened_synonyms_map_back_to_their_class():
    voc21 = load_class_names("voc21")
    flat = flatten_synonyms(voc21, background_id=0)
    class_of = flat.class_of()
    assert class_of["sky"] == 0 and class_of["aeroplane"] == 1 and class_of["screen"] == 20
    assert len(flat.texts) == 26 + 19 + 7 + 5 - 1  # 26 background + 7 person + 5 tv words
    # COCO-Object lists "bed" as a background word and as a class: the class keeps it
    coco = load_class_names("coco-object")
    assert flatten_synonyms(coco, background_id=0).class_of()["bed"] == 60
    assert len(set(flatten_synonyms(coco, 0).texts)) == len(flatten_synonyms(coco, 0).texts)


def test_parse_and_override_class_names(tmp_path):
    parsed = parse_class_names("# comment\n\nbackground: sky, wall\ncat\ndog, puppy\n")
    assert [(c.name, c.synonyms) for c in parsed] == [
        ("background", ("sky", "wall")),
        ("cat", ("cat",)),
        ("dog", ("dog", "puppy")),
    ]
    user = tmp_path / "mine.txt"
    user.write_text("\n".join(["sky, ground"] + [f"word{i}" for i in range(1, 20)] + ["tv: telly"]))
    merged = load_class_names("voc21", override=user)
    assert merged[0].name == "background" and merged[0].synonyms == ("sky", "ground")
    assert merged[1].name == "aeroplane" and merged[1].synonyms == ("word1",)
    assert merged[20].name == "tv"
    user.write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match="lists 2 classes but voc21 has 21"):
        load_class_names("voc21", override=user)


def test_coco_stuff27_groups_the_171_classes_into_coco_stuffs_supercategories():
    """Spot checks by name: each fine class lands in the supercategory COCO-Stuff gives it."""
    from freesegdiff.evaluation.classnames import load_class_names
    from freesegdiff.evaluation.datasets import COCO_STUFF_SUPERCATEGORY

    fine = [entry.name for entry in load_class_names("coco-stuff171")]
    coarse = [entry.name for entry in load_class_names("coco-stuff27")]
    assert len(COCO_STUFF_SUPERCATEGORY) == 171 and len(coarse) == 27
    expected = {
        "person": "person",
        "tv": "electronic",
        "refrigerator": "appliance",
        "pizza": "food",
        "bed": "furniture",
        "teddy bear": "indoor",
        "knife": "kitchen",
        "umbrella": "accessory",
        "giraffe": "animal",
        "fire hydrant": "outdoor",
        "kite": "sports",
        "boat": "vehicle",
        "ceiling-tile": "ceiling",
        "carpet": "floor",
        "salad": "food-stuff",
        "cabinet": "furniture-stuff",
        "cardboard": "rawmaterial",
        "curtain": "textile",
        "wall-brick": "wall",
        "window-blind": "window",
        "skyscraper": "building",
        "gravel": "ground",
        "grass": "plant",
        "clouds": "sky",
        "mountain": "solid",
        "fence": "structural",
        "sea": "water",
    }
    for name, supercategory in expected.items():
        assert coarse[COCO_STUFF_SUPERCATEGORY[fine.index(name)]] == supercategory, name
    assert set(COCO_STUFF_SUPERCATEGORY) == set(range(27))
    assert max(COCO_STUFF_SUPERCATEGORY[:80]) == 11 and min(COCO_STUFF_SUPERCATEGORY[80:]) == 12
