"""The one chest X-ray decoder of the project: any real-world file in, an 8-bit grayscale PIL image out.

`load_xray` sniffs the real container format from the file's first bytes (extensions lie), applies the
EXIF orientation, composites alpha onto black, expands palettes, windows 16-bit / 32-bit / float data
between percentiles and converts CMYK and colour to luma. Anything it cannot turn into a sensible image
raises `ImageDecodeError` naming the file and the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Container formats recognised from their magic bytes, as (prefix test, Pillow format name).
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"WEBP", 8, "WEBP"),  # after b"RIFF" + 4-byte size
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG2000"),
)

#: Default largest image accepted, in pixels (a full-size radiograph is under 20 MP).
MAX_PIXELS = 64_000_000

#: Percentiles used to window high-bit-depth data into 8 bits.
WINDOW_PERCENTILES = (0.5, 99.5)


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as a chest X-ray; carries the path and a short reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def sniff_format(head: bytes) -> str | None:
    """Pillow format name of an image from its first bytes, or None when it is no known image format."""
    for magic, offset, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic and (name != "WEBP" or head[:4] == b"RIFF"):
            return name
    return None


def window_to_uint8(values: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> np.ndarray:
    """Map any numeric array linearly to 0..255 between two percentiles (clipping outside them)."""
    data = np.asarray(values, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, percentiles)
    if hi <= lo:  # nearly constant image: fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(data, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_grayscale(im: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to mode ``L`` (alpha composited onto black)."""
    mode = im.mode
    if mode == "L":
        return im
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F", "I;32", "I;32L", "I;32B"):
        return Image.fromarray(window_to_uint8(np.asarray(im)), mode="L")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    if mode == "1":
        return im.convert("L")
    # RGB, CMYK, YCbCr, LAB, HSV, RGBX ...: through RGB to ITU-R 601 luma.
    return im.convert("RGB").convert("L")


def load_xray(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file into a fully loaded 8-bit grayscale (mode ``L``) PIL image, or raise ImageDecodeError."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not head:
        raise ImageDecodeError(path, "zero-size file")
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageDecodeError(path, f"not an image (content starts with {head[:12]!r})")
    try:
        with Image.open(path, formats=[fmt]) as im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(path, f"empty image {width}x{height}")
            if width * height > max_pixels:
                raise ImageDecodeError(
                    path, f"{width}x{height} pixels exceeds the limit of {max_pixels} (decompression bomb?)"
                )
            im.seek(0)
            im.load()
            oriented = ImageOps.exif_transpose(im)
            gray = to_grayscale(oriented)
            gray.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, f"{fmt} content that Pillow cannot identify") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeError(path, f"corrupt {fmt}: {exc}") from exc
    return gray


def resize_short_side(im: Image.Image, short_side: int) -> Image.Image:
    """Resize so the shorter side is ``short_side`` (Lanczos, aspect kept); never upscales."""
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    width, height = im.size
    shorter = min(width, height)
    if shorter <= short_side:
        return im
    scale = short_side / shorter
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if width <= height:
        size = (short_side, size[1])
    else:
        size = (size[0], short_side)
    return im.resize(size, Image.Resampling.LANCZOS)
