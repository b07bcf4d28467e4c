"""Property-based tests (hypothesis): whatever comes in, a valid result or one of our errors.

- ``load_image`` on random arrays (sizes 1..64 a side, six dtypes, 1..4 channels, channel
  first) and on random image files (every format and mode Pillow writes, intact or with bytes
  cut, flipped or zeroed): an ``(H, W, 3)`` uint8 C-contiguous array, of the expected size when
  the input is intact, or :class:`~freesegdiff.errors.ImageReadError`; nothing else.
- The tiny pipeline on random small images of odd sizes: a label map of the image's size whose
  ids are keys of ``labels`` and whose segment areas and background add up to every pixel, or a
  :class:`~freesegdiff.errors.FreeSegDiffError`.

Examples are bounded (``max_examples``) so that the file runs in well under a minute on one core.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from PIL import Image  # noqa: E402

from freesegdiff.errors import FreeSegDiffError, ImageReadError  # noqa: E402
from freesegdiff.io.images import load_image  # noqa: E402

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------ arrays

DTYPES = ["uint8", "uint16", "int32", "float32", "float64", "bool"]
CHANNEL_MARKERS = (1, 3, 4)  # the loader takes (C, H, W) when C is one of these


def check_rgb(image: object, size: tuple[int, int] | None) -> None:
    """``image`` is an (H, W, 3) C-contiguous uint8 array, of ``size`` (H, W) when given."""
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.flags.c_contiguous and min(image.shape[:2]) >= 1
    if size is not None:
        assert image.shape[:2] == size


def refusal(array: np.ndarray) -> str | None:
    """What the loader must say about an array it refuses (None: it must read it), written
    from the rule itself: numbers only; integers 0..65535; floats finite and in [0, 1] (up to
    rounding); (H, W, 2) is ambiguous unless it reads as channel first."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            return "NaN or infinite"
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            return "must hold values in [0, 1]"
    if array.dtype.kind in "iu" and array.size and array.min() < 0:
        return "must hold values 0 to 255"
    if array.dtype.kind in "iu" and array.size and array.max() > 65535:
        return "must hold values up to 65535"
    channel_first = array.ndim == 3 and array.shape[0] in CHANNEL_MARKERS
    if array.ndim == 3 and array.shape[2] == 2 and not channel_first:
        return "got shape"
    return None


@st.composite
def image_arrays(draw: st.DrawFn) -> tuple[np.ndarray, tuple[int, int] | None]:
    """A random image array and the (H, W) the loader must read it as (None: ambiguous)."""
    height, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    layout = draw(st.sampled_from(["hw", "hwc", "chw"]))
    if layout == "hw":
        shape: tuple[int, ...] = (height, width)
    elif layout == "hwc":
        shape = (height, width, draw(st.integers(1, 4)))
    else:
        shape = (draw(st.sampled_from(CHANNEL_MARKERS)), height, width)
    array = draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype)))
    expected: tuple[int, int] | None = (height, width)
    # Inherently ambiguous layouts: (H, W, 2) with H in 1, 3, 4 reads as channel first, and
    # (C, H, W) with W in 1, 3, 4 reads as channel last. Only the invariants hold there.
    if layout == "hwc" and shape[2] == 2 and height in CHANNEL_MARKERS:
        expected = None
    if layout == "chw" and width in CHANNEL_MARKERS:
        expected = None
    return array, expected


@QUICK
@given(image_arrays())
@example((np.zeros((1, 1), dtype=np.uint8), (1, 1)))
@example((np.full((2, 3, 4), np.nan, dtype=np.float32), (2, 3)))
@example((np.ones((3, 5, 7), dtype=bool), (5, 7)))
def test_load_image_on_random_arrays(drawn: tuple[np.ndarray, tuple[int, int] | None]) -> None:
    array, expected = drawn
    try:
        image = load_image(array)
    except ImageReadError as error:
        # refused exactly when the README's rule for arrays is broken, and told why
        assert refusal(array) is not None, f"refused {array.dtype} {array.shape}: {error}"
        assert refusal(array) in str(error)
        return
    assert refusal(array) is None, f"accepted: {refusal(array)}"
    check_rgb(image, expected)
    if array.dtype == np.uint8 and array.ndim == 2:
        assert np.array_equal(image[..., 0], array)  # grey is repeated, untouched


# ------------------------------------------------------------------------------ files

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = ["PNG", "JPEG", "TIFF", "GIF", "WEBP", "BMP"]


def make_image(mode: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A ``mode`` image of random pixels (values within what the mode's files can hold)."""
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) > 0.5)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())  # L -> P
        return image
    if mode == "I;16":
        values: np.ndarray = rng.integers(0, 65536, (height, width), dtype=np.uint16)
    elif mode == "I":
        values = rng.integers(0, 65536, (height, width), dtype=np.int32)
    elif mode == "F":
        values = (rng.random((height, width)) * 2).astype(np.float32)
    else:
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        values = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), values.tobytes())


def _writable() -> list[tuple[str, str]]:
    """The (format, mode) pairs this Pillow writes."""
    rng = np.random.default_rng(0)
    pairs = []
    for file_format in FORMATS:
        for mode in MODES:
            try:
                make_image(mode, 3, 2, rng).save(io.BytesIO(), format=file_format)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            pairs.append((file_format, mode))
    return pairs


WRITABLE = _writable()

CORRUPTIONS = st.one_of(
    st.just(("intact",)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), min_size=1, max_size=8),
    ),
    st.tuples(st.just("zero"), st.floats(0.0, 0.999), st.integers(1, 64)),
    # the header claims another size (PNG, BMP): up to 70000 a side, decompression bombs too
    st.tuples(st.just("claim"), st.integers(1, 70000), st.integers(1, 70000)),
)


def corrupt(data: bytes, how: tuple) -> bytes:
    """``data`` cut short, with bytes XOR-flipped, a run zeroed (positions: fractions), or
    with a header that claims another size."""
    kind = how[0]
    if kind == "truncate":
        return data[: int(how[1] * len(data))]
    damaged = bytearray(data)
    if kind == "claim" and data[12:16] == b"IHDR":  # PNG: width, height, then the chunk's CRC
        damaged[16:24] = struct.pack(">II", how[1], how[2])
        damaged[29:33] = struct.pack(">I", zlib.crc32(bytes(damaged[12:29])))
    elif kind == "claim" and data[:2] == b"BM":  # BMP: little-endian width, height
        damaged[18:26] = struct.pack("<ii", how[1], how[2])
    if kind == "flip":
        for where, mask in how[1]:
            damaged[int(where * len(data))] ^= mask
    elif kind == "zero":
        start = int(how[1] * len(data))
        damaged[start : start + how[2]] = bytes(len(damaged[start : start + how[2]]))
    return bytes(damaged)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file that every example overwrites."""
    return tmp_path_factory.mktemp("property-files") / "image.bin"


def test_every_format_writes_some_mode() -> None:
    assert {file_format for file_format, _ in WRITABLE} == set(FORMATS)
    assert {mode for _, mode in WRITABLE} == set(MODES)


@QUICK
@given(
    st.sampled_from(WRITABLE),
    st.integers(1, 64),
    st.integers(1, 64),
    st.integers(0, 2**32 - 1),
    CORRUPTIONS,
)
@example(("PNG", "L"), 8, 8, 0, ("claim", 20000, 20000))  # a decompression bomb: 400 Mpx
@example(("BMP", "RGB"), 8, 8, 0, ("claim", 65535, 65535))
@example(("PNG", "1"), 8, 8, 0, ("claim", 9000, 9000))  # 81 Mpx: under Pillow's limits
def test_load_image_on_random_files(
    scratch: Path, pair: tuple[str, str], width: int, height: int, seed: int, how: tuple
) -> None:
    file_format, mode = pair
    buffer = io.BytesIO()
    make_image(mode, width, height, np.random.default_rng(seed)).save(buffer, format=file_format)
    scratch.write_bytes(corrupt(buffer.getvalue(), how))
    intact = how[0] == "intact"
    try:
        image = load_image(scratch)
    except ImageReadError:
        assert not intact, f"an intact {mode} {file_format} file was refused"
        return
    check_rgb(image, (height, width) if intact else None)  # every intact file keeps its size


# Regression (found by the property above): PIL's (H, W, 2) LA pixels went through the array
# channel-first guess, so an LA image 1, 3 or 4 pixels high came out (W, 2, 3).
@pytest.mark.parametrize("height", CHANNEL_MARKERS)
def test_la_images_of_any_height_keep_their_size(scratch: Path, height: int) -> None:
    Image.frombytes("LA", (5, height), bytes(10 * height)).save(scratch, format="PNG")
    assert load_image(scratch).shape == (height, 5, 3)


# ------------------------------------------------------------------------------ pipeline

ODD_SIZES = [(1, 1), (1, 40), (40, 1), (80, 80), (2, 79), (79, 3)]


@pytest.fixture(scope="module")
def tiny_pipe() -> object:
    """The tiny preset (random tiny models, built once into the test cache), once per module."""
    pytest.importorskip("diffusers")
    from freesegdiff.pipeline import FreeSegDiff

    return FreeSegDiff.from_preset("tiny")


@st.composite
def small_images(draw: st.DrawFn) -> np.ndarray:
    """Noise, a flat colour or stripes, of an odd or a random size up to 80x80."""
    height, width = draw(
        st.one_of(st.sampled_from(ODD_SIZES), st.tuples(st.integers(1, 80), st.integers(1, 80)))
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "flat", "stripes"]))
    if kind == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "flat":  # every feature equal: k-means finds fewer clusters than K
        return np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    stripes = rng.integers(0, 256, (1, width, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(stripes, (height, width, 3)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    small_images(),
    st.one_of(
        st.none(), st.lists(st.sampled_from(["cat", "dog", "sky", "road"]), min_size=1, max_size=3)
    ),
)
@example(np.zeros((1, 1, 3), dtype=np.uint8), None)
@example(np.full((1, 40, 3), 200, dtype=np.uint8), ["cat"])
@example(np.full((40, 1, 3), 10, dtype=np.uint8), None)
@example(np.zeros((80, 80, 3), dtype=np.uint8), ["cat", "dog"])
def test_tiny_pipeline_on_random_images(
    tiny_pipe: object, image: np.ndarray, classes: list[str] | None
) -> None:
    height, width = image.shape[:2]
    try:
        result = tiny_pipe(image, classes=classes)  # type: ignore[operator]
    except FreeSegDiffError:
        return  # an error of ours, with its message, is an allowed outcome
    assert result.label_map.shape == (height, width)
    ids = set(np.unique(result.label_map).tolist())
    assert ids <= set(result.labels), (ids, result.labels)
    assert 0 in result.labels
    for segment in result.segments:
        assert segment.area == int((result.label_map == segment.id).sum()) > 0
    assert sum(s.area for s in result.segments) + result.background_area == height * width
