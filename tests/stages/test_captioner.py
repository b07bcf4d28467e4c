"""Tests of the captioner stage, on tiny random BLIP and BLIP-2 built here (no download)."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freesegdiff.config import CaptionConfig
from freesegdiff.errors import ConfigError, ImageReadError, ModelUnavailableError
from freesegdiff.infra.hub import LoadOptions
from freesegdiff.infra.tiny.captioner import build_blip, build_blip2
from freesegdiff.infra.tiny.clip import build_clip
from freesegdiff.infra.tiny.vocab import WORDS
from freesegdiff.stages.captioner import Captioner, _strip

BUILDERS = {"blip": build_blip, "blip2": build_blip2}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Three real photos of different sizes: a cat, an astronaut, a coffee cup."""
    data = pytest.importorskip("skimage.data", reason='the photos need scikit-image (".[test]")')
    return [data.chelsea(), data.astronaut(), data.coffee()]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def kind(request: pytest.FixtureRequest) -> str:
    """Each captioner kind in turn."""
    return str(request.param)


@pytest.fixture(scope="module")
def folder(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny captioner of that kind, saved once per module."""
    path = tmp_path_factory.mktemp(kind)
    BUILDERS[kind](path)
    return path


def load(folder: Path, **settings: object) -> Captioner:
    """Greedy, no prompt, unless ``settings`` say otherwise (the paper's decoding is tested
    on its own below)."""
    plain: dict[str, object] = {"num_beams": 1, "prompt": None, "max_length": 30, "min_length": 0}
    config = CaptionConfig(**{**plain, **settings})  # type: ignore[arg-type]
    return Captioner.from_pretrained(str(folder), config=config)


def words_of(caption: str) -> list[str]:
    return [word.strip(string.punctuation) for word in caption.split()]


def test_kind_device_dtype(kind: str, folder: Path) -> None:
    captioner = load(folder)
    assert captioner.kind == kind
    assert captioner.device == torch.device("cpu")
    assert captioner.dtype == torch.float32


def test_batch_of_three_photos_gives_three_captions(folder: Path, photos: list[np.ndarray]) -> None:
    captions = load(folder, max_new_tokens=6).caption(photos)
    assert len(captions) == 3
    assert all(isinstance(c, str) and c == c.strip() and c for c in captions)


def test_batch_equals_one_by_one(folder: Path, photos: list[np.ndarray]) -> None:
    captioner = load(folder, max_new_tokens=6)
    batched = captioner.caption(photos)
    assert batched == [captioner.caption([photo])[0] for photo in photos]
    assert len(set(batched)) > 1  # the image matters even to a random captioner


def test_tiny_captions_are_vocabulary_words(folder: Path, photos: list[np.ndarray]) -> None:
    for caption in load(folder, max_new_tokens=8).caption(photos):
        assert set(words_of(caption)) <= {*WORDS, ""}, caption


def test_min_new_tokens_is_honoured(folder: Path, photos: list[np.ndarray]) -> None:
    captions = load(folder, min_new_tokens=5, max_new_tokens=5).caption(photos)
    # each new token of a tiny captioner is one word or one punctuation mark
    assert all(len(words_of(caption)) == 5 for caption in captions), captions


def test_prompt_starts_the_caption(folder: Path, photos: list[np.ndarray]) -> None:
    settings = {"prompt": "a dog on", "min_new_tokens": 2, "max_new_tokens": 2}
    captions = load(folder, strip_prompt=False, **settings).caption(photos)
    assert all(caption.startswith("a dog on ") for caption in captions), captions
    assert all(len(words_of(caption)) == 5 for caption in captions), captions
    # stripped, as LAVIS returns captions: the same captions without the prompt
    stripped = load(folder, **settings).caption(photos)
    assert stripped == [caption[len("a dog on ") :] for caption in captions]


def test_paper_decoding_is_lavis_generate(folder: Path, photos: list[np.ndarray]) -> None:
    """The defaults are LAVIS's: 3 beams, lengths 10..30 counting the start token and the
    prompt, "a picture of " given to the decoder and cut off the caption."""
    captioner = Captioner.from_pretrained(str(folder), config=CaptionConfig())
    assert captioner.config.num_beams == 3 and captioner.config.prompt == "a picture of "
    captions = captioner.caption(photos)
    inputs = captioner.processor(
        images=[Image.fromarray(p) for p in photos],
        text=["a picture of "] * 3,
        return_tensors="pt",
    )
    # BLIP counts the start token and the prompt in the lengths (transformers' BLIP generate
    # does, as LAVIS); BLIP-2 counts new tokens, as LAVIS's OPT captioner
    lengths = (
        {"max_length": 30, "min_length": 10}
        if captioner.kind == "blip"
        else {"max_new_tokens": 30, "min_new_tokens": 10}
    )
    expected_ids = captioner.model.generate(**inputs, num_beams=3, **lengths)
    texts = captioner.processor.batch_decode(expected_ids, skip_special_tokens=True)
    assert all(text.startswith("a picture of ") for text in texts), texts
    assert captions == [text[len("a picture of ") :].strip() for text in texts]
    if captioner.kind == "blip":
        # [DEC] + 3 prompt tokens + at least 6 new tokens (one word or mark each when tiny)
        assert all(10 - 4 <= len(words_of(c)) <= 30 - 4 for c in captions), captions


def test_beam_search_runs(folder: Path, photos: list[np.ndarray]) -> None:
    captions = load(folder, num_beams=2, max_new_tokens=4).caption(photos[:2])
    assert len(captions) == 2


def test_empty_batch(folder: Path) -> None:
    assert load(folder).caption([]) == []


def test_bad_image_is_refused(folder: Path) -> None:
    data = pytest.importorskip("skimage.data", reason='the photos need scikit-image (".[test]")')
    with pytest.raises(ImageReadError, match="image 1 must be an \\(H, W, 3\\) uint8"):
        load(folder).caption([data.chelsea(), data.camera()])  # camera() is grayscale


def test_bad_settings_are_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"caption\.min_new_tokens"):
        Captioner.from_pretrained(
            str(tmp_path), config=CaptionConfig(min_new_tokens=9, max_new_tokens=3)
        )
    with pytest.raises(ConfigError, match=r"caption\.min_length"):
        Captioner.from_pretrained(str(tmp_path), config=CaptionConfig(min_length=31))


def test_missing_folder_is_model_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        Captioner.from_pretrained(str(tmp_path / "nowhere"), config=CaptionConfig())


def test_offline_hub_id_is_model_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "Salesforce/blip-image-captioning-base"
    with pytest.raises(ModelUnavailableError) as caught:
        load = LoadOptions(cache_dir=str(tmp_path))
        Captioner.from_pretrained(name, config=CaptionConfig(), load=load)
    assert name in str(caught.value)
    assert "--preset tiny" in str(caught.value)
    assert "--captioner-model" in str(caught.value)


def test_clip_is_not_a_captioner(tmp_path: Path) -> None:
    build_clip(tmp_path)
    with pytest.raises(ConfigError, match=r"'clip' model, not a captioner.*BLIP-2"):
        Captioner.from_pretrained(str(tmp_path), config=CaptionConfig())


def test_prompt_is_cut_as_lavis_cuts_it() -> None:
    assert _strip("a picture of a cat on a sofa", "a picture of ") == "a cat on a sofa"
    assert _strip(" A Picture of two dogs ", "a picture of ") == "two dogs"
    assert _strip("a cat on a sofa", None) == "a cat on a sofa"
    assert _strip("something else", "a picture of ") == "something else"  # nothing to cut


def test_beam_search_shares_the_image_and_batches_the_beams(
    folder: Path, photos: list[np.ndarray]
) -> None:
    """3 beams do not cost 3 decodes: the vision encoder runs once per batch, one decoder call
    per step advances all 3 x 3 beams, and after the first step each call feeds one new token
    per beam (the key/value cache holds the rest)."""
    captioner = load(folder, num_beams=3, max_new_tokens=6, min_new_tokens=6)
    model = captioner.model
    vision_calls: list[int] = []
    decoder_calls: list[tuple[int, int]] = []
    decoder = model.text_decoder if captioner.kind == "blip" else model.language_model

    def on_vision(_module: object, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        vision_calls.append(int(pixels.shape[0]))

    def on_decoder(_module: object, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # BLIP-2's first step gives the prompt as embeddings
            embeds = kwargs["inputs_embeds"]
            decoder_calls.append((int(embeds.shape[0]), int(embeds.shape[1])))
        else:
            decoder_calls.append((int(ids.shape[0]), int(ids.shape[1])))

    handles = [
        model.vision_model.register_forward_pre_hook(on_vision, with_kwargs=True),
        decoder.register_forward_pre_hook(on_decoder, with_kwargs=True),
    ]
    try:
        token_ids = captioner.generate(captioner.inputs(photos))
    finally:
        for handle in handles:
            handle.remove()
    assert vision_calls == [3]  # once, for the three images, not per beam
    assert len(decoder_calls) == 6  # one call per generated token
    assert all(batch == 9 for batch, _ in decoder_calls)  # 3 images x 3 beams per call
    assert all(length == 1 for _, length in decoder_calls[1:])  # cached keys and values
    assert token_ids.shape[0] == 3
