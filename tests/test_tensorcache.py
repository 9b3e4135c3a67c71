"""The shared uint8 tensor cache: the PIL path's pixels, keyed by root folder and content, atomic, clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrstudy import tensorcache
from cxrstudy.images import ImageDecodeError, load_xray
from cxrstudy.models import get_spec, normalize_batch, resize_to_uint8

SIZE = 24


def _write_images(root: Path, n: int = 5, seed: int = 0) -> pd.DataFrame:
    """``n`` grey films of different sizes and formats under ``root``, with a manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = 40 + 7 * i, 50 - 3 * i
        arr = (rng.random((h, w)) * 255).astype(np.uint8)
        rel = f"images/src/film_{i}.{'jpg' if i % 2 else 'png'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        mode = "RGB" if i == 3 else "L"  # a colour file: the decoder makes it grey
        Image.fromarray(arr).convert(mode).save(root / rel)
        rows.append({"image": rel, "sha256": f"{seed}{i:02d}"})
    return pd.DataFrame(rows)


def _pil_path(rows: pd.DataFrame, root: Path, interpolation: str = "bicubic") -> torch.Tensor:
    return torch.stack([resize_to_uint8(load_xray(root / p), SIZE, interpolation) for p in rows["image"]])


@pytest.fixture
def films(tmp_path) -> tuple[pd.DataFrame, Path]:
    root = tmp_path / "root_a"
    return _write_images(root), root


@pytest.fixture
def decodes(monkeypatch) -> list[Path]:
    """Paths decoded by the cache during the test (the cache's own memory of open entries is reset)."""
    seen: list[Path] = []
    real = tensorcache.decode_one

    def counting(path, *a, **k):
        seen.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(tensorcache, "decode_one", counting)
    tensorcache.clear_open_entries()
    yield seen
    tensorcache.clear_open_entries()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_same_pixels_as_the_pil_path_and_read_back_without_decoding(films, tmp_path, decodes, interpolation):
    rows, root = films
    cache = tmp_path / "cache"
    x = tensorcache.load_uint8_batch(rows, root, SIZE, interpolation, cache_dir=cache)
    assert x.dtype == torch.uint8 and x.shape == (5, 1, SIZE, SIZE)
    assert torch.equal(x, _pil_path(rows, root, interpolation)) and len(decodes) == 5
    tensorcache.clear_open_entries()
    again = tensorcache.load_uint8_batch(rows, root, SIZE, interpolation, cache_dir=cache)
    sub = tensorcache.load_uint8_batch(rows.iloc[[3, 1]], root, SIZE, interpolation, cache_dir=cache)
    assert torch.equal(again, x) and torch.equal(sub, x[[3, 1]])
    assert len(decodes) == 5  # a subset is served by the entry that holds it
    assert len(list(cache.glob("*.npy"))) == len(list(cache.glob("*.json"))) == 1
    spec = get_spec("efficientnet_lite0")
    assert torch.equal(tensorcache.to_model_input(x, spec), normalize_batch(x, spec))


def test_keyed_by_root_folder_and_file_content(films, tmp_path, decodes):
    rows, root_a = films
    root_b = tmp_path / "root_b"  # same file names, other pixels (e.g. lung-cropped renderings)
    _write_images(root_b, seed=1)
    cache = tmp_path / "cache"
    a = tensorcache.load_uint8_batch(rows, root_a, SIZE, cache_dir=cache)
    b = tensorcache.load_uint8_batch(rows, root_b, SIZE, cache_dir=cache)
    assert not torch.equal(a, b) and torch.equal(b, _pil_path(rows, root_b))
    # a file rewritten in place is decoded again (its size and mtime are part of the key)
    Image.new("L", (30, 30), 7).save(root_a / rows["image"][0])
    a2 = tensorcache.load_uint8_batch(rows, root_a, SIZE, cache_dir=cache)
    assert (a2[0] == 7).all() and torch.equal(a2[1:], a[1:])
    # the size, the interpolation and a transform's tag are part of the key too
    assert tensorcache.load_uint8_batch(rows, root_a, SIZE + 8, cache_dir=cache).shape[-1] == SIZE + 8
    assert tensorcache.group_key(root_a, SIZE, "bicubic") != tensorcache.group_key(root_a, SIZE, "bilinear")
    assert tensorcache.group_key(root_a, SIZE, "bicubic") != tensorcache.group_key(root_b, SIZE, "bicubic")
    assert tensorcache.group_key(root_a, SIZE, "bicubic", "masked") != tensorcache.group_key(
        root_a, SIZE, "bicubic"
    )
    with pytest.raises(ValueError, match="tag"):
        tensorcache.load_uint8_batch(rows, root_a, SIZE, transform=lambda im: im, cache_dir=cache)


def test_a_failed_write_leaves_nothing_that_is_read_back(films, tmp_path, decodes, monkeypatch):
    rows, root = films
    cache = tmp_path / "cache"
    real_save = np.save

    def half_then_fail(fh, arr, **kw):
        fh.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(tensorcache.np, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tensorcache.load_uint8_batch(rows, root, SIZE, cache_dir=cache)
    assert not list(cache.iterdir())  # the temporary file is gone, no entry
    monkeypatch.setattr(tensorcache.np, "save", real_save)
    # the array written but not its identities (killed in between): not an entry
    monkeypatch.setattr(tensorcache, "write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        tensorcache.load_uint8_batch(rows, root, SIZE, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 1 and not list(cache.glob("*.json"))
    monkeypatch.undo()
    tensorcache.clear_open_entries()
    decodes.clear()
    monkeypatch.setattr(tensorcache, "decode_one", lambda p, *a, **k: decodes.append(p) or _one(p, *a, **k))
    x = tensorcache.load_uint8_batch(rows, root, SIZE, cache_dir=cache)
    assert len(decodes) == 5 and torch.equal(x, _pil_path(rows, root))
    # a truncated array under a complete record is ignored and rewritten
    npy = next(cache.glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])
    tensorcache.clear_open_entries()
    assert (
        torch.equal(tensorcache.load_uint8_batch(rows, root, SIZE, cache_dir=cache), x) and len(decodes) == 10
    )


def _one(path, size, interpolation, transform=None):
    return resize_to_uint8(load_xray(path), size, interpolation)


def test_a_killed_writer_leaves_no_entry(films, tmp_path, decodes):
    rows, root = films
    cache = tmp_path / "cache"
    rows.to_csv(tmp_path / "rows.csv", index=False)
    script = textwrap.dedent(
        f"""
        import sys, time
        import numpy as np
        import pandas as pd
        from cxrstudy import tensorcache

        def slow_save(fh, arr, **kw):
            fh.write(b"\\x93NUMPY" + bytes(100)); fh.flush()
            print("writing", flush=True)
            time.sleep(60)

        np.save = slow_save
        tensorcache.load_uint8_batch(pd.read_csv({str(tmp_path / "rows.csv")!r}), {str(root)!r}, {SIZE},
                                     cache_dir={str(cache)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=30)
    assert list(cache.glob(".*.tmp")) and not list(cache.glob("*.npy")) and not list(cache.glob("*.json"))
    x = tensorcache.load_uint8_batch(rows, root, SIZE, cache_dir=cache)
    assert len(decodes) == 5 and torch.equal(x, _pil_path(rows, root))


def test_corrupt_and_missing_images_are_clear_errors(films, tmp_path):
    rows, root = films
    bad = root / rows["image"][2]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(ImageDecodeError, match=r"film_2\.png"):
        tensorcache.load_uint8_batch(rows, root, SIZE, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy"))
    gone = rows.assign(image=rows["image"].str.replace("film_4", "nothere"))
    with pytest.raises(FileNotFoundError, match="nothere"):
        tensorcache.load_uint8_batch(gone, root, SIZE, cache_dir=tmp_path / "cache")
    with pytest.raises(ImageDecodeError, match=r"film_2\.png"):
        tensorcache.load_uint8_batch(rows, root, SIZE, persist=False)
