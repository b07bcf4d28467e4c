"""The whole pipeline on real photos with tiny random models loaded from their folders."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from freesegdiff.config import VOC19_NAMES, PipelineConfig, set_by_path
from freesegdiff.errors import ConfigError, EmptyVocabularyError, ImageReadError
from freesegdiff.pipeline import FreeSegDiff


def make_config(sd, clip, blip, **changes) -> PipelineConfig:
    settings = {
        "models": {"diffusion": str(sd), "clip": str(clip), "captioner": blip and str(blip)},
        "caption": {"max_new_tokens": 12, "min_new_tokens": 6},
        "features": {"image_size": 256},
        "refine": {"method": "none"},
    }
    for key, value in changes.items():
        settings.setdefault(key, {}).update(value)
    return PipelineConfig.from_dict(settings)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path, tiny_clip_path, tiny_blip_path) -> FreeSegDiff:
    return FreeSegDiff.from_config(make_config(tiny_sd_path, tiny_clip_path, tiny_blip_path))


def check_consistent(result, image: np.ndarray) -> None:
    """Invariants every result must satisfy, whatever the random models say."""
    height, width = image.shape[:2]
    assert result.label_map.shape == (height, width) and result.label_map.dtype == np.int32
    assert result.cluster_map.shape == (height, width)
    assert result.image_size == (width, height)
    assert set(np.unique(result.label_map)) <= set(result.labels)
    assert result.labels[0] == "background"
    k = result.scores.shape[1]
    assert result.scores.shape == (len(result.vocabulary), k)
    assert result.coarse_masks.shape == (k, height, width)
    assert len(result.cluster_labels) == k
    for segment in result.segments:
        assert np.array_equal(segment.mask, result.label_map == segment.id)
        assert segment.area == int(segment.mask.sum()) > 0
        assert result.vocabulary[segment.id - 1] == segment.label == result.labels[segment.id]
        assert result.cluster_labels[segment.cluster] == segment.id - 1
        assert segment.score == pytest.approx(result.scores[segment.id - 1, segment.cluster])
    assert sum(s.area for s in result.segments) + result.background_area == height * width
    # the coarse masks are the clusters, which tile the image
    assert np.array_equal(result.coarse_masks.sum(0), np.ones((height, width)))


def test_open_vocabulary_on_real_photos(pipe, photos, tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(path)
    results = pipe([path, photos["astronaut"]])
    assert len(results) == 2
    for result, image in zip(results, [photos["chelsea"], photos["astronaut"]], strict=True):
        check_consistent(result, image)
        assert result.caption and len(result.caption.split()) >= 6
        # the released label texts: 19 VOC names, then the entities not among them
        new = [e for e in result.entities if e not in VOC19_NAMES]
        assert result.vocabulary == [*VOC19_NAMES, *new]
        assert result.candidates == [t for t in result.vocabulary if t in result.entities]
        assert result.scores.shape[1] == 4  # K = 4 clusters
        assert {"caption", "vae", "unet", "clustering", "clip", "refinement"} <= set(result.timings)
    assert results[0].source == str(path) and results[1].source is None
    single = pipe(photos["astronaut"])
    assert np.array_equal(single.label_map, results[1].label_map)


def test_open_vocabulary_without_distractors_scores_the_entities_alone(
    tiny_sd_path, tiny_clip_path, tiny_blip_path, photos
):
    settings = {"vocabulary": {"open_distractors": []}, "entities": {"rule": "extended"}}
    config = make_config(tiny_sd_path, tiny_clip_path, tiny_blip_path, **settings)
    result = FreeSegDiff.from_config(config)(photos["chelsea"])
    check_consistent(result, photos["chelsea"])
    assert result.entities and result.vocabulary == result.entities == result.candidates


def test_blip2_captioner_runs_in_the_pipeline(tiny_sd_path, tiny_clip_path, tmp_path, photos):
    from freesegdiff.infra.tiny.captioner import build_blip2

    build_blip2(tmp_path / "blip2")
    pipe = FreeSegDiff.from_config(make_config(tiny_sd_path, tiny_clip_path, tmp_path / "blip2"))
    assert pipe.captioner is not None and pipe.captioner.kind == "blip2"
    result = pipe(photos["coffee"])
    check_consistent(result, photos["coffee"])
    assert result.caption


def test_closed_vocabulary_ids_follow_the_class_list(tiny_sd_path, tiny_clip_path, photos):
    pipe = FreeSegDiff.from_config(
        make_config(tiny_sd_path, tiny_clip_path, None, clustering={"k": 3})
    )
    classes = ["cat", "sofa", "floor", "wall"]
    result = pipe(photos["chelsea"], classes=classes)
    check_consistent(result, photos["chelsea"])
    assert result.caption is None and result.vocabulary == classes == result.candidates
    # every label claims its best cluster, and with 4 labels for 3 clusters every cluster has a
    # claimant, so nothing is background before refinement
    assert sorted(c for c in result.cluster_labels) == sorted(set(result.cluster_labels))
    assert all(label >= 0 for label in result.cluster_labels)
    for label_id, name in result.labels.items():
        assert label_id == 0 or classes[label_id - 1] == name


def test_caption_prunes_the_classes(pipe, photos):
    classes = ["person", "dog", "tree", "car", "pizza"]
    result = pipe(photos["rocket"], classes=classes)
    check_consistent(result, photos["rocket"])
    assert result.vocabulary == classes
    assert result.candidates and set(result.candidates) <= set(classes)
    allowed = {classes.index(c) for c in result.candidates}
    assert {label for label in result.cluster_labels if label >= 0} <= allowed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batches_give_the_same_label_maps(
    tiny_sd_path, tiny_clip_path, tiny_blip_path, photos, dtype
):
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    config = make_config(tiny_sd_path, tiny_clip_path, tiny_blip_path)
    one = FreeSegDiff.from_config(PipelineConfig.from_dict({**config.to_dict(), "dtype": dtype}))
    three = FreeSegDiff(
        PipelineConfig.from_dict({**one.config.to_dict(), "batch_size": 3}),
        features=one.features,
        classifier=one.classifier,
        captioner=one.captioner,
    )
    for a, b in zip(one(images), three(images), strict=True):
        assert a.caption == b.caption
        assert np.array_equal(a.cluster_map, b.cluster_map)
        assert np.array_equal(a.label_map, b.label_map)
        assert np.allclose(a.scores, b.scores, atol=1e-5)


def test_crf_refinement_runs_inside_the_pipeline(tiny_sd_path, tiny_clip_path, photos):
    pipe = FreeSegDiff.from_config(
        make_config(tiny_sd_path, tiny_clip_path, None, refine={"method": "crf"})
    )
    result = pipe(photos["coffee"], classes=["cup", "table", "spoon", "wall"])
    check_consistent(result, photos["coffee"])
    kept = [k for k, label in enumerate(result.cluster_labels) if label >= 0]
    assert kept
    # refinement moved at least some boundary pixels, and dropped clusters stay empty
    assert any(not np.array_equal(result.coarse_masks[k], result.refined_masks[k]) for k in kept)
    dropped = [k for k in range(len(result.cluster_labels)) if k not in kept]
    assert all(not result.refined_masks[k].any() for k in dropped)


def test_pydensecrf_backend_runs_on_images_read_from_files(
    tiny_sd_path, tiny_clip_path, photos, tmp_path
):
    """Regression: load_image returns read-only arrays, which pydensecrf refused ("buffer source
    array is read-only"). Through the pipeline, both backends agree on every pixel here."""
    path = tmp_path / "coffee.png"
    Image.fromarray(photos["coffee"]).save(path)
    classes = ["cup", "table", "spoon", "wall"]
    label_maps = {}
    for backend in ("pydensecrf", "torch"):
        refine = {"method": "crf", "backend": backend}
        pipe = FreeSegDiff.from_config(
            make_config(tiny_sd_path, tiny_clip_path, None, refine=refine)
        )
        result = pipe(path, classes=classes)
        check_consistent(result, photos["coffee"])
        label_maps[backend] = result.label_map
    assert (label_maps["pydensecrf"] > 0).any()
    assert (label_maps["pydensecrf"] == label_maps["torch"]).mean() >= 0.98


def test_user_errors_are_explained(pipe, tiny_sd_path, tiny_clip_path, photos):
    with pytest.raises(EmptyVocabularyError, match="class list is empty"):
        pipe(photos["chelsea"], classes=[])
    with pytest.raises(EmptyVocabularyError, match="empty name"):
        pipe(photos["chelsea"], classes=["cat", " "])
    with pytest.raises(ConfigError, match="not one string"):
        pipe(photos["chelsea"], classes="cat,dog")
    no_captioner = FreeSegDiff.from_config(make_config(tiny_sd_path, tiny_clip_path, None))
    with pytest.raises(ConfigError, match="open vocabulary needs a captioner"):
        no_captioner(photos["chelsea"])
    with pytest.raises(ImageReadError):
        pipe("/no/such/image.png")


def test_a_caption_without_objects_gives_background_and_a_warning(pipe, photos, monkeypatch):
    monkeypatch.setattr(
        pipe.captioner, "caption", lambda images: ["it is what it is"] * len(images)
    )
    result = pipe(photos["chelsea"])
    assert result.entities == [] and result.segments == []
    assert not result.label_map.any()
    assert "names no object" in result.warnings[0]
    closed = pipe(photos["chelsea"], classes=["cat", "dog"])
    assert (
        closed.candidates == ["cat", "dog"]
        and "every class stays a candidate" in (closed.warnings[0])
    )


def test_folder_runs_skip_bad_images_and_keep_the_rest(pipe, photos, tmp_path):
    Image.fromarray(photos["chelsea"]).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    gray16 = photos["coffee"][..., 0].astype(np.uint16) * 257
    Image.fromarray(gray16).save(tmp_path / "c.png")
    rgba = np.dstack([photos["rocket"], np.full(photos["rocket"].shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "d.png")
    outcomes = dict(pipe.iter_segment(sorted(tmp_path.iterdir())))
    assert sorted(outcomes) == [str(tmp_path / n) for n in ("a.png", "b.jpg", "c.png", "d.png")]
    assert isinstance(outcomes[str(tmp_path / "b.jpg")], ImageReadError)
    for name in ("a.png", "c.png", "d.png"):
        assert not isinstance(outcomes[str(tmp_path / name)], Exception)


def test_a_failing_image_in_a_batch_loses_only_itself(pipe, photos, monkeypatch):
    original = pipe.segment_arrays

    def flaky(images, sources, classes=None, timer=None):
        if any(image.shape == photos["coffee"].shape for image in images):
            raise RuntimeError("simulated out-of-memory")
        return original(images, sources, classes, timer)

    monkeypatch.setattr(pipe, "segment_arrays", flaky)
    monkeypatch.setattr(pipe, "config", dataclasses.replace(pipe.config, batch_size=3))
    outcomes = list(pipe.iter_segment([photos["chelsea"], photos["coffee"], photos["rocket"]]))
    assert [name for name, _ in outcomes] == ["image-0", "image-1", "image-2"]
    assert "simulated out-of-memory" in str(outcomes[1][1])
    assert not isinstance(outcomes[0][1], Exception) and not isinstance(outcomes[2][1], Exception)


def test_releasing_the_text_encoder_keeps_open_vocabulary_results(
    pipe, tiny_sd_path, tiny_clip_path, tiny_blip_path, photos
):
    lean = FreeSegDiff.from_config(make_config(tiny_sd_path, tiny_clip_path, tiny_blip_path))
    lean.release_text_encoder()
    assert all(p.device.type == "meta" for p in lean.features.text_encoder.parameters())
    result = lean(photos["chelsea"])
    expected = pipe(photos["chelsea"])
    assert result.caption == expected.caption
    assert np.array_equal(result.label_map, expected.label_map)
    with pytest.raises(ConfigError, match="freed its text encoder"):
        lean(photos["chelsea"], classes=["cat", "sofa"])
    config = make_config(tiny_sd_path, tiny_clip_path, tiny_blip_path)
    unpruned = FreeSegDiff.from_config(set_by_path(config, "vocabulary.prune_with_caption", False))
    unpruned.release_text_encoder()
    assert unpruned(photos["chelsea"], classes=["cat", "sofa"]).candidates == ["cat", "sofa"]


def test_a_reader_error_of_any_kind_is_reported_and_never_hangs(pipe, photos, monkeypatch):
    """Regression: an exception other than ours (Pillow's DecompressionBombError, say) killed the
    reader thread and the run waited for it forever."""
    import freesegdiff.pipeline as pipeline_module

    real = pipeline_module.load_image

    def load(item, **limits):
        if isinstance(item, str) and item == "bomb.png":
            from PIL import Image as PILImage

            raise PILImage.DecompressionBombError("Image size (200000000 pixels) exceeds limit")
        return real(item, **limits)

    monkeypatch.setattr(pipeline_module, "load_image", load)
    outcomes = list(pipe.iter_segment_with_images([photos["chelsea"], "bomb.png"]))
    assert [name for name, _, _ in outcomes] == ["image-0", "bomb.png"]
    assert isinstance(outcomes[1][1], ImageReadError) and outcomes[1][2] is None
    assert "DecompressionBombError" in str(outcomes[1][1])
    assert outcomes[0][2] is not None and outcomes[0][2].shape == photos["chelsea"].shape


def test_an_image_above_the_working_size_is_worked_on_smaller_and_mapped_back(
    pipe, photos, tmp_path
):
    """limits.working_size: steps 8-13 at a longest side of 200, the label map at 451 x 300."""
    config = set_by_path(pipe.config, "limits.working_size", 200)
    small = FreeSegDiff(
        config, features=pipe.features, classifier=pipe.classifier, captioner=pipe.captioner
    )
    image = photos["chelsea"]  # 451 x 300
    result = small(image)
    assert result.label_map.shape == (300, 451) and result.image_size == (451, 300)
    assert result.cluster_map.shape == (133, 200) and result.refined_masks.shape[1:] == (133, 200)
    # By hand: paint the refined masks of the kept clusters at 200 x 133, then give each of the
    # 451 x 300 pixels the label under its centre.
    work = np.zeros((133, 200), np.int32)
    for k, label in enumerate(result.cluster_labels):
        if label >= 0:
            work[result.refined_masks[k] & (work == 0)] = label + 1
    rows = np.floor((np.arange(300) + 0.5) * 133 / 300).astype(int)
    cols = np.floor((np.arange(451) + 0.5) * 200 / 451).astype(int)
    assert np.array_equal(result.label_map, work[rows][:, cols])
    assert sum(s.area for s in result.segments) + result.background_area == 300 * 451
    from freesegdiff.io.outputs import write_outputs

    explain = importlib.util.find_spec("matplotlib") is not None  # the [viz] extra
    written = write_outputs(result, image, tmp_path, explain=explain)  # masks at 200 x 133
    assert Image.open(written["overlay"]).height == 300  # the overlay at the image's size
    if explain:
        assert Image.open(written["explain"]).width > 1000  # drawn, masks and all
    # Within the bound nothing changes: the same image with the default bound (2048).
    assert np.array_equal(
        pipe(image).label_map,
        FreeSegDiff(
            set_by_path(pipe.config, "limits.working_size", 451),
            features=pipe.features,
            classifier=pipe.classifier,
            captioner=pipe.captioner,
        )(image).label_map,
    )


def _failing_at(pipe: FreeSegDiff, shape: tuple[int, ...]) -> FreeSegDiff:
    """``pipe`` with its naming step failing for every batch that holds an image of ``shape``."""
    naming = pipe._name

    def failing(batch):
        if any(image.shape == shape for image in batch.images):
            raise RuntimeError("naming failed on purpose")
        return naming(batch)

    pipe._name = failing
    return pipe


def _released_crf_batches_of_two(sd, clip, blip) -> PipelineConfig:
    """The tiny models with the released CRF (pydensecrf), two images per batch."""
    pytest.importorskip("pydensecrf")
    refine = {"method": "crf", "backend": "pydensecrf"}
    return dataclasses.replace(make_config(sd, clip, blip, refine=refine), batch_size=2)


@pytest.fixture(scope="module")
def stream_case(tiny_sd_path, tiny_clip_path, tiny_blip_path, photos, tmp_path_factory):
    """Batches of two with the released CRF, an unreadable file among the inputs and an image
    whose naming fails: the config, the inputs, the failing shape and the serial outcomes."""
    from freesegdiff.infra.tuning import RuntimeOptions

    config = _released_crf_batches_of_two(tiny_sd_path, tiny_clip_path, tiny_blip_path)
    broken = tmp_path_factory.mktemp("stream") / "broken.png"
    broken.write_bytes(b"not a png")
    small = {name: np.ascontiguousarray(photo[::2, ::2]) for name, photo in photos.items()}
    inputs: list = [small["chelsea"], small["coffee"], str(broken)]
    inputs += [small["rocket"], small["astronaut"][::2, ::2], small["coffee"][::2, ::3]]
    fails = small["rocket"].shape
    serial_pipe = _failing_at(FreeSegDiff.from_config(config, runtime=RuntimeOptions.off()), fails)
    return config, inputs, fails, list(serial_pipe.iter_segment_with_images(inputs))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "one-compute-thread"])
def test_a_streamed_run_gives_the_serial_results_in_input_order(stream_case, overlap):
    """The streaming executor (both ways: every compute group its own thread and images refined
    side by side in two CRF worker processes, as on a GPU machine; or one compute thread, as on
    the CPU) against the serial path: batches of two, an unreadable file among the inputs and an
    image whose naming fails. The same outcomes, equal array for array, in input order."""
    from freesegdiff.infra.tuning import RuntimeOptions

    config, inputs, fails, serial = stream_case
    runtime = RuntimeOptions(stream=True, overlap=overlap, crf_processes=2)
    pipe = _failing_at(FreeSegDiff.from_config(config, runtime=runtime), fails)
    streamed = list(pipe.iter_segment_with_images(inputs))
    assert set(pipe.last_stream.stats.busy) == (
        {"caption", "features", "naming", "refinement", "composition"}
        if overlap
        else {"compute", "composition"}
    )
    assert [name for name, _, _ in streamed] == [name for name, _, _ in serial]
    assert [name for name, _, _ in streamed][2] == inputs[2]
    for (name, first, _), (_, second, _) in zip(serial, streamed, strict=True):
        if isinstance(first, Exception):
            assert type(second) is type(first) and str(second) == str(first), name
            continue
        assert first.caption == second.caption and first.vocabulary == second.vocabulary
        for field in ("label_map", "cluster_map", "coarse_masks", "refined_masks", "scores"):
            assert np.array_equal(getattr(first, field), getattr(second, field)), (name, field)
    failed = [name for name, outcome, _ in streamed if isinstance(outcome, Exception)]
    assert failed == [inputs[2], "image-3"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_default_stream_gives_the_serial_results(
    tiny_sd_path, tiny_clip_path, tiny_blip_path, photos
):
    """On CUDA the default runtime streams with every compute group in its own thread and the
    released CRF in worker processes beside them: the serial path's results, array for array,
    and captions as the CPU's (float32)."""
    from freesegdiff.infra.tuning import RuntimeOptions

    config = _released_crf_batches_of_two(tiny_sd_path, tiny_clip_path, tiny_blip_path)
    config = dataclasses.replace(config, device="cuda")
    small = [np.ascontiguousarray(photo[::2, ::2]) for photo in photos.values()]
    assert RuntimeOptions().streams("cuda") and RuntimeOptions().overlaps("cuda")
    serial_pipe = FreeSegDiff.from_config(config, runtime=RuntimeOptions.off())
    serial = list(serial_pipe.iter_segment_with_images(small))
    pipe = FreeSegDiff.from_config(config, runtime=RuntimeOptions())
    streamed = list(pipe.iter_segment_with_images(small))
    assert set(pipe.last_stream.stats.busy) >= {"caption", "features", "naming", "refinement"}
    on_cpu = FreeSegDiff.from_config(dataclasses.replace(config, device="cpu"))
    for (name, first, _), (_, second, _) in zip(serial, streamed, strict=True):
        assert first.caption == second.caption and first.vocabulary == second.vocabulary
        for field in ("label_map", "cluster_map", "coarse_masks", "refined_masks", "scores"):
            assert np.array_equal(getattr(first, field), getattr(second, field)), (name, field)
    assert [r.caption for _, r, _ in serial] == [on_cpu(image).caption for image in small]
