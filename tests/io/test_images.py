"""Every image kind users have, read into RGB uint8 the documented way."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from freesegdiff.errors import ImageReadError
from freesegdiff.io.images import iter_image_files, load_image


def test_rgb_file_round_trips(tmp_path, photos):
    path = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(path)
    assert np.array_equal(load_image(path), photos["chelsea"])
    assert np.array_equal(load_image(str(path)), photos["chelsea"])


def test_grayscale_is_repeated_to_three_channels(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.shape == (3, 4, 3)
    assert np.array_equal(image[..., 0], gray) and np.array_equal(image[..., 2], gray)


def test_sixteen_bit_is_scaled_by_1_over_257(tmp_path):
    values = np.array([[0, 257, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # saved as mode I;16
    assert load_image(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 1, 255]


def test_alpha_is_composited_over_white():
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    image = load_image(Image.fromarray(rgba, mode="RGBA"))
    # opaque red stays red; transparent black becomes white; half black -> 255 * 127/255
    assert image[0].tolist() == [[255, 0, 0], [255, 255, 255], [127, 127, 127]]


def test_exif_rotation_is_applied(tmp_path):
    wide = np.zeros((2, 6, 3), np.uint8)
    wide[:, 0] = 255  # white left column
    picture = Image.fromarray(wide)
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    picture.save(tmp_path / "r.jpg", exif=exif, quality=100)
    image = load_image(tmp_path / "r.jpg")
    assert image.shape == (6, 2, 3)  # shown upright: tall


def test_palette_cmyk_float_and_channel_first_arrays():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert load_image(palette)[0].tolist() == [[10, 20, 30], [200, 100, 0]]
    assert load_image(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
    assert load_image(np.array([[0.0, 0.5, 1.0]]))[0, :, 0].tolist() == [0, 128, 255]
    chw = np.zeros((3, 5, 7), np.uint8)
    assert load_image(chw).shape == (5, 7, 3)


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=r"cannot read .*broken\.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match=r"got shape \(2, 2, 5\)"):
        load_image(np.zeros((2, 2, 5)))
    with pytest.raises(ImageReadError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ImageReadError, match="cannot use a int"):
        load_image(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("https://example.com/cat.jpg", "'https://example.com/cat.jpg' is a URL: freesegdiff"),
        ("", "'' is empty: give an image file's path"),
        ("   ", "is empty"),
        (".", "'.' is a folder, not an image file"),
        ("/dev/zero", "'/dev/zero' is a character device, not a regular file"),
    ],
)
def test_paths_that_are_no_image_file_say_what_they_are(source, message):
    with pytest.raises(ImageReadError, match=re.escape(message)):
        load_image(source)


def test_fifos_and_broken_links_say_what_they_are(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageReadError, match=r"pipe\.png' is a FIFO \(named pipe\), not a regular"):
        load_image(tmp_path / "pipe.png")  # (never opened: reading a FIFO would wait forever)
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(ImageReadError, match=r"gone\.png' is a broken symbolic link \(to '"):
        load_image(tmp_path / "gone.png")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([[object()]]), "must hold numbers (bool, integers or floats); got dtype object"),
        (np.zeros((2, 2), np.complex64), "got dtype complex64"),
        (np.array([["a", "b"]]), "must hold numbers"),
        (np.full((2, 2), -3, np.int16), "must hold values 0 to 255 (or 65535); it holds -3"),
        (np.full((2, 2), 70000, np.int32), "up to 65535; it holds 70000"),
        (np.full((2, 2), 254.0), "in [0, 1]; it holds 254 to 254: divide by 255"),
        (np.full((2, 2), -0.5), "in [0, 1]; it holds -0.5 to -0.5: rescale it to [0, 1]"),
        (np.zeros((5, 6, 2), np.uint8), "(H, W), (H, W, 1|3|4) or (1|3|4, H, W)"),
        (np.full((2, 2), np.inf), "NaN or infinite"),
    ],
)
def test_arrays_the_readme_does_not_allow_are_refused_with_what_to_pass(array, message):
    with pytest.raises(ImageReadError, match=re.escape(message)):
        load_image(array)


def test_arrays_within_the_rules_are_read_exactly():
    floats = np.array([[0.0, 0.5, 1.0, 1.0004]])  # rounding above 1 is clipped
    assert load_image(floats)[0, :, 0].tolist() == [0, 128, 255, 255]
    assert load_image(np.array([[0, 65535]], np.int32))[0, :, 0].tolist() == [0, 255]
    assert load_image(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
    assert load_image(np.zeros((3, 5, 2), np.uint8)).shape == (5, 2, 3)  # channel first
    # A PIL "LA" image is unambiguous: gray and alpha, composited over white
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), mode="LA")
    assert load_image(la)[0, :, 0].tolist() == [255, 0]


def test_folders_are_expanded_sorted_and_recursively(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/z.png", "a.jpg", "notes.txt", "b/c.JPEG"):
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files([tmp_path])]
    assert found == ["a.jpg", "b/c.JPEG", "b/z.png"]
    with pytest.raises(ImageReadError, match="does not exist"):
        list(iter_image_files([tmp_path / "nope"]))


# ---------------------------------------------------------------------------- size limits
def fake_png_header(path, width: int, height: int) -> None:
    """A valid 8x8 PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb's header)."""
    import struct
    import zlib

    Image.new("L", (8, 8), 128).save(path)
    data = bytearray(path.read_bytes())
    start = 8 + 4 + 4  # signature, IHDR length, "IHDR"
    data[start : start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : start + 13]))  # over "IHDR" and its 13 bytes
    data[start + 13 : start + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_a_bomb_header_is_refused_before_decoding(tmp_path):
    from freesegdiff.errors import ImageTooLargeError

    path = tmp_path / "bomb.png"
    fake_png_header(path, 30000, 30000)  # 900 Mpx claimed: Pillow itself would refuse to open it
    with pytest.raises(ImageTooLargeError, match=r"30000x30000 = 900\.0 Mpx.*100\.0 Mpx"):
        load_image(path)
    # Downscaling does not decode it either: above 4 x the limit for a format without drafts.
    with pytest.raises(ImageTooLargeError, match="too large to decode"):
        load_image(path, oversize="downscale")
    # Within a raised limit it is decoded, and its missing data is a read error, not a crash.
    fake_png_header(path, 3000, 3000)
    with pytest.raises(ImageReadError):
        load_image(path, max_pixels=None)


def test_a_real_image_above_the_limit_is_refused_or_downscaled(tmp_path, photos):
    from freesegdiff.errors import ImageTooLargeError

    image = photos["coffee"]  # 600 x 400
    for name in ("coffee.png", "coffee.jpg"):
        path = tmp_path / name
        Image.fromarray(image).save(path, quality=95)
        with pytest.raises(ImageTooLargeError, match=r"600x400 = 0\.2 Mpx"):
            load_image(path, max_pixels=60_000)
        small = load_image(path, max_pixels=60_000, oversize="downscale")
        assert small.shape == (200, 300, 3)  # 300 x 200 = 60,000 pixels, aspect ratio kept
        assert small.dtype == np.uint8 and small.flags.c_contiguous
        # Close to an independent downscale of the whole picture (JPEG draft mode decodes at
        # half size first, so the two differ by the JPEG's rounding only).
        reference = np.asarray(Image.fromarray(image).resize((300, 200), Image.Resampling.BOX))
        assert np.abs(small.astype(int) - reference).mean() < 4
    assert load_image(image, max_pixels=60_000, oversize="downscale").shape == (200, 300, 3)
    with pytest.raises(ImageTooLargeError, match="the array"):
        load_image(image, max_pixels=60_000)
    assert load_image(image, max_pixels=None).shape == image.shape


def test_pillow_own_bomb_limit_is_replaced_by_ours(tmp_path, photos, monkeypatch):
    """Pillow raises from inside Image.open above twice its MAX_IMAGE_PIXELS: our limit rules."""
    path = tmp_path / "cat.png"
    Image.fromarray(photos["chelsea"]).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 135,300 pixels > 2 x 1000
    assert np.array_equal(load_image(path), photos["chelsea"])
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted only while opening


def test_fit_longest_side():
    from freesegdiff.infra.arrays import fit_longest_side

    image = np.zeros((2000, 3000, 3), np.uint8)
    assert fit_longest_side(image, 2048).shape == (1365, 2048, 3)
    assert fit_longest_side(image, 3000) is image
    assert fit_longest_side(image, None) is image
    assert fit_longest_side(np.zeros((1, 5000, 3), np.uint8), 100).shape == (1, 100, 3)


def test_encoded_bytes_decode_and_fail_exactly_as_their_files(tmp_path, photos):
    """A Ray run reads files in CPU tasks and decodes their bytes in the actors: the pixels and
    every error message must be the local run's."""
    from freesegdiff.errors import ImageTooLargeError
    from freesegdiff.io.images import EncodedImage, read_encoded

    wide = np.zeros((2, 6, 3), np.uint8)
    wide[:, 0] = 255
    turned = Image.fromarray(wide)
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.jpg", quality=90)
    Image.fromarray(photos["chelsea"]).save(tmp_path / "cat.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    fake_png_header(tmp_path / "bomb.png", 30000, 30000)
    settings = [{}, {"max_pixels": 60_000, "oversize": "downscale"}]
    for name in ("turned.jpg", "coffee.jpg", "cat.png"):
        encoded = read_encoded(tmp_path / name)
        assert encoded == EncodedImage(str(tmp_path / name), (tmp_path / name).read_bytes())
        for kwargs in settings:
            assert np.array_equal(
                load_image(encoded, **kwargs), load_image(tmp_path / name, **kwargs)
            )
    assert load_image(read_encoded(tmp_path / "turned.jpg")).shape == (6, 2, 3)
    for name, error in (("broken.jpg", ImageReadError), ("bomb.png", ImageTooLargeError)):
        with pytest.raises(error) as from_file:
            load_image(tmp_path / name)
        with pytest.raises(error) as from_bytes:
            load_image(read_encoded(tmp_path / name))
        assert str(from_bytes.value) == str(from_file.value), name
        if name == "broken.jpg":  # Pillow's own message names a path but not bytes: ours both
            broken = repr(str(tmp_path / name))
            assert str(from_bytes.value).endswith(f"cannot identify image file {broken}")
    with pytest.raises(ImageReadError) as missing:
        read_encoded(tmp_path / "missing.png")
    with pytest.raises(ImageReadError) as missing_file:
        load_image(tmp_path / "missing.png")
    assert str(missing.value) == str(missing_file.value)
