"""``fast_captioner`` (freesegdiff.infra.fast_captioner): the same caption tokens as
transformers' own ``generate``, on real photos, with the tiny and the real-architecture BLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freesegdiff.config import CaptionConfig
from freesegdiff.infra import fast_captioner
from freesegdiff.infra.tuning import RuntimeOptions
from freesegdiff.stages.captioner import Captioner

RELEASED = RuntimeOptions.off()
FAST = RuntimeOptions(fast_captioner=True)


def _pair(model, processor, config):
    """The same loaded model, captioning as released and with the trick."""
    return (
        Captioner(model, processor, config=config, runtime=RELEASED),
        Captioner(model, processor, config=config, runtime=FAST),
    )


@pytest.fixture(scope="module")
def tiny_blip(tiny_blip_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_path)
    return model, BlipProcessor.from_pretrained(tiny_blip_path)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the paper's: 3 beams, lengths 10 to 30, the prompt
        {"num_beams": 1},  # greedy
        {"num_beams": 5, "min_length": 0, "max_length": 20},
        {"prompt": None, "max_new_tokens": 12, "min_new_tokens": 3},
    ],
    ids=["paper", "greedy", "five-beams", "no-prompt"],
)
def test_the_tokens_are_transformers_generate_ones(tiny_blip, photos, settings):
    """Four real photos in one batch: beams never cross images, each image's tokens are the ones
    transformers' beam search picks with its own decoder forward."""
    config = CaptionConfig(**settings)
    released, fast = _pair(*tiny_blip, config)
    batch = [photos[name] for name in ("chelsea", "astronaut", "coffee", "rocket")]
    inputs = released.inputs(batch)
    expected = released.generate(inputs)
    got = fast.generate(inputs)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert fast.caption(batch) == released.caption(batch)


def test_beams_that_end_at_every_step_end_as_in_transformers(tiny_blip, photos):
    """The end-of-caption token made likelier step by step (its output bias raised): beams
    finish early, at different steps per image, and the chosen captions and their padding are
    transformers' own. The lengths seen prove the early endings happened."""
    model, processor = tiny_blip
    config = CaptionConfig(num_beams=3, min_length=5, max_length=24)
    bias = model.text_decoder.cls.predictions.bias
    eos = model.config.text_config.sep_token_id
    original = float(bias[eos])
    batch = [photos[name] for name in ("chelsea", "astronaut", "coffee", "rocket")]
    lengths: set[int] = set()
    try:
        for raised in np.linspace(0.0, 6.0, 13):
            with torch.no_grad():
                bias[eos] = original + float(raised)
            released, fast = _pair(model, processor, config)
            inputs = released.inputs(batch)
            expected = released.generate(inputs)
            got = fast.generate(inputs)
            assert torch.equal(got, expected), raised
            ended = (expected == eos).int().argmax(dim=1)
            lengths |= {
                int(n) for n, row in zip(ended, expected, strict=True) if (row == eos).any()
            }
    finally:
        with torch.no_grad():
            bias[eos] = original
    assert len(lengths) >= 4, lengths  # captions ended at several different steps


def test_the_logits_are_the_released_forwards_to_float32_rounding(tiny_blip, photos):
    """Step by step, the decoder's logits with the fast forward and with the released one (its
    own cache), through the prompt, a beam reorder and three more tokens: equal to 1e-5."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model, processor = tiny_blip
    beams = 3
    inputs = processor(images=[photos["chelsea"], photos["rocket"]], return_tensors="pt")
    with torch.no_grad():
        image = model.vision_model(pixel_values=inputs["pixel_values"])[0]
    image = image.repeat_interleave(beams, dim=0)
    rows = image.shape[0]
    fast_captioner.install(model.text_decoder)
    keyword = fast_captioner.cache_keyword(model.text_decoder)
    caches = {
        "released": EncoderDecoderCache(DynamicCache(), DynamicCache()),
        "fast": fast_captioner.DecoderCache(beams=beams, capacity=4),
    }
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 90, (rows, 4), generator=generator)
    steps = [prompt] + [torch.randint(1, 90, (rows, 1), generator=generator) for _ in range(3)]
    parents = torch.tensor([2, 0, 0, 4, 4, 5])  # beams of the same image only
    done = 0
    for step, ids in enumerate(steps):
        logits = {}
        for name, cache in caches.items():
            if step == 2:
                cache.reorder_cache(parents)
            with torch.no_grad():
                out = model.text_decoder(
                    input_ids=ids,
                    position_ids=torch.arange(done, done + ids.shape[1])[None].expand(rows, -1),
                    encoder_hidden_states=image,
                    **{keyword: cache},  # "cache", or "past_key_values" before 5.2x
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits[name] = out.logits[:, -1]
        done += ids.shape[1]
        torch.testing.assert_close(logits["fast"], logits["released"], rtol=1e-5, atol=1e-5)
    assert caches["fast"].get_seq_length() == done == 7


def test_other_calls_run_the_released_forward(tiny_blip, photos):
    """Installed once, the decoder keeps its own forward for any call without the cache (a
    training-style call with labels, here): the same loss as before installing."""
    model, processor = tiny_blip
    inputs = processor(images=[photos["coffee"]], text=["a picture of a cup"], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs, labels=inputs["input_ids"]).loss
        fast_captioner.install(model.text_decoder)
        fast_captioner.install(model.text_decoder)  # idempotent
        after = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.equal(before, after)


def test_the_cache_grows_past_its_planned_length_and_reorders_rows():
    """The static cache keeps every token when a call runs past its plan, and reorders rows as
    beam search asks (numbers checked by hand)."""
    cache = fast_captioner.DecoderCache(beams=2, capacity=2)
    first = torch.arange(2 * 1 * 2 * 1, dtype=torch.float32).view(2, 1, 2, 1)  # rows 0,1
    keys, _ = cache.append(0, first, -first)
    cache.length = 2
    assert keys.squeeze().tolist() == [[0.0, 1.0], [2.0, 3.0]]
    cache.reorder_cache(torch.tensor([1, 1]))
    grown, _ = cache.append(0, torch.tensor([[[[7.0]]], [[[8.0]]]]), torch.zeros(2, 1, 1, 1))
    cache.length = 3
    assert grown.squeeze().tolist() == [[2.0, 3.0, 7.0], [2.0, 3.0, 8.0]]
    assert cache.get_seq_length() == 3
    cache.crop(-1)
    assert cache.get_seq_length() == 2


def test_real_architecture_blip_gives_the_same_tokens(photos):
    """BLIP base's real shapes (224 M random weights, the bench's builder): the paper's
    decoding on two real photos, released forward against the fast one."""
    from freesegdiff.bench.models import build_captioner

    model, processor = build_captioner(
        "Salesforce/blip-image-captioning-base", torch.float32, torch.device("cpu")
    )
    config = CaptionConfig(max_length=16)
    released, fast = _pair(model, processor, config)
    inputs = released.inputs([photos["chelsea"], photos["rocket"]])
    expected = released.generate(inputs)
    assert expected.shape[1] == 16  # the random decoder runs to the limit
    assert torch.equal(fast.generate(inputs), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_tokens_are_transformers_generate_ones(tiny_blip_path, photos):
    """On CUDA (float32) the decoder's projections take the plain ``F.linear`` path: the same
    tokens as transformers' ``generate`` there, and as on the CPU."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_path).to("cuda")
    released, fast = _pair(model, BlipProcessor.from_pretrained(tiny_blip_path), CaptionConfig())
    batch = [photos[name] for name in ("chelsea", "astronaut", "coffee", "rocket")]
    inputs = released.inputs(batch)
    expected = released.generate(inputs)
    got = fast.generate(inputs)
    assert got.device.type == "cuda" and torch.equal(got, expected)


def test_the_cache_goes_under_the_name_the_installed_transformers_uses():
    """transformers 5.2x calls BLIP's decoder cache ``cache``, earlier releases (5.17 on the GPU
    machines here) ``past_key_values``; generate() rejects a keyword the forward lacks."""

    class Before:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return None

    class Now:
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return None

    assert fast_captioner.cache_keyword(Before()) == "past_key_values"
    assert fast_captioner.cache_keyword(Now()) == "cache"
