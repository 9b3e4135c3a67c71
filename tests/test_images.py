"""load_xray on real mirror files of every mode and on synthetic hard cases (16-bit, CMYK, EXIF, truncated)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrstudy.images import ImageDecodeError, load_xray, resize_short_side, sniff_format, window_to_uint8

IEEE = "images/"
CXNET = "chest_xray_images/covid19/"

# (source, path, real format, real mode) — taken from the mirror inventory in MIRROR.md
REAL_FILES = [
    ("figure1", "images/COVID-00006.jpg", "JPEG", "L"),
    ("figure1", "images/COVID-00004.jpg", "JPEG", "RGB"),
    ("actualmed", "images/CR.1.2.840.113564.192168196.2020031913094890017.1203801020003.png", "PNG", "RGBA"),
    ("ieee8023", "images/tpmd200203f2-a.png", "PNG", "P"),
    ("cxnet", CXNET + "139.webp", "WEBP", "RGB"),
    ("cxnet", CXNET + "766p.jpg", "WEBP", "RGB"),  # WebP named .jpg
    ("cxnet", CXNET + "888.png", "JPEG", "RGB"),  # JPEG named .png
    ("cxnet", CXNET + "871.jpg", "PNG", "RGBA"),  # PNG named .jpg
    ("ieee8023", "images/10.1016-slash-j.healun.2020.04.004.jpg", "PNG", "L"),
    ("mhh", "png/006f3a8a.png", "PNG", "L"),
]


@pytest.mark.parametrize(("source", "path", "fmt", "mode"), REAL_FILES, ids=[p for _, p, _, _ in REAL_FILES])
def test_real_mirror_files_decode_to_gray(mirror_file, source, path, fmt, mode):
    p = mirror_file(source, path)
    with Image.open(p) as raw:
        assert (raw.format, raw.mode) == (fmt, mode)  # the case this row is meant to cover
        size = raw.size
    assert sniff_format(p.read_bytes()[:32]) == fmt
    im = load_xray(p)
    assert im.mode == "L" and im.size == size
    arr = np.asarray(im)
    assert arr.std() > 5, "a real radiograph has contrast"


def test_rgb_conversion_is_luma_and_alpha_goes_to_black(tmp_path):
    rgba = Image.new("RGBA", (8, 4), (200, 100, 50, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))  # fully transparent white -> black
    p = tmp_path / "x.png"
    rgba.save(p)
    arr = np.asarray(load_xray(p))
    assert arr[0, 0] == 0
    assert abs(int(arr[1, 1]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


def test_16bit_is_windowed_by_percentiles(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(1000, 5000, size=(64, 48), dtype=np.uint16)
    data[0, 0] = 65535  # one hot pixel must not crush the contrast
    p = tmp_path / "sixteen.png"
    Image.fromarray(data).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    arr = np.asarray(load_xray(p))
    assert arr.dtype == np.uint8 and arr.shape == (64, 48)
    assert arr.min() == 0 and arr.max() == 255
    assert 100 < arr[1:, 1:].mean() < 155  # mid-grey on average, not a near-black image
    assert np.corrcoef(arr[1:, 1:].ravel(), data[1:, 1:].ravel())[0, 1] > 0.99


def test_float_tiff_and_constant_image(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10)).save(p)
    arr = np.asarray(load_xray(p))
    assert arr[0, 0] == 0 and arr[-1, -1] == 255
    assert window_to_uint8(np.full((3, 3), 7.0)).max() == 0


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(p, quality=95)  # no ink = white
    im = load_xray(p)
    assert im.mode == "L" and np.asarray(im).mean() > 240


def test_exif_orientation_is_applied(tmp_path):
    base = Image.new("L", (40, 20), 0)
    base.paste(255, (0, 0, 10, 20))  # bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    p = tmp_path / "rot.jpg"
    base.save(p, exif=exif, quality=95)
    im = load_xray(p)
    assert im.size == (20, 40)
    arr = np.asarray(im)
    assert arr[:10, :].mean() > 200 and arr[-10:, :].mean() < 50  # left band now on top


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "text", "empty", "missing", "bomb"])
def test_bad_files_raise_with_file_name(tmp_path, mirror_file, kind):
    p = tmp_path / f"bad_{kind}.png"
    if kind == "truncated_jpeg":
        p.write_bytes(mirror_file("figure1", "images/COVID-00004.jpg").read_bytes()[:3000])
    elif kind == "truncated_png":
        p.write_bytes(mirror_file("mhh", "png/006f3a8a.png").read_bytes()[:5000])
    elif kind == "text":
        p.write_text("<html>not found</html>")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "bomb":
        buf = io.BytesIO()
        Image.new("1", (9000, 9000)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())
    with pytest.raises(ImageDecodeError) as err:
        load_xray(p, max_pixels=50_000_000)
    assert p.name in str(err.value) and err.value.reason


def test_resize_short_side_never_upscales():
    assert resize_short_side(Image.new("L", (300, 600)), 256).size == (256, 512)
    assert resize_short_side(Image.new("L", (900, 512)), 256).size == (450, 256)
    assert resize_short_side(Image.new("L", (100, 200)), 256).size == (100, 200)
