"""Atomic writers give the final file the mode a plain ``open`` gives under the process umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrstudy.data.dedup import ImageFeatures
from cxrstudy.data.download import Downloader, FetchItem
from cxrstudy.data.preprocess import process_one
from cxrstudy.fileio import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_writer,
    current_umask,
    write_json,
)
from cxrstudy.tensorcache import _write_entry


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> int:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _png(path: Path) -> Path:
    Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8), mode="L").save(path)
    return path


def _text(p: Path) -> None:
    with atomic_writer(p, "w") as fh:
        fh.write("a,b\n1,2\n")


def _bytes(p: Path) -> None:
    with atomic_writer(p) as fh:
        fh.write(b"\x00\x01")


def _pil(p: Path) -> None:
    with atomic_path(p) as tmp:
        Image.new("L", (4, 4)).save(tmp, format="PNG")


def _savez(p: Path) -> None:
    with atomic_path(p) as tmp, open(tmp, "wb") as fh:  # np.savez appends ".npz" to a name without it
        np.savez(fh, a=np.zeros(3))


def _torch(p: Path) -> None:
    with atomic_path(p) as tmp:
        torch.save({"w": torch.zeros(2)}, tmp)


def _features(p: Path) -> None:
    ImageFeatures(np.zeros(4, np.float32), np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8),
                  np.zeros((2, 2), np.uint8)).save(p)  # fmt: skip


WRITERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "atomic_writer text": ("t.csv", _text),
    "atomic_writer bytes": ("b.bin", _bytes),
    "atomic_path PIL": ("i.png", _pil),
    "atomic_path np.savez": ("a.npz", _savez),
    "atomic_path torch.save": ("m.pth", _torch),
    "atomic_write_text": ("x.txt", lambda p: atomic_write_text(p, "x")),
    "atomic_write_bytes": ("y.bin", lambda p: atomic_write_bytes(p, b"y")),
    "write_json": ("r.json", lambda p: write_json(p, {"a": float("nan")})),
    "dedup features": ("f.npz", _features),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_atomic_writers_follow_the_umask(umask: int, tmp_path: Path, name: str):
    assert current_umask() == umask
    filename, write = WRITERS[name]
    path = tmp_path / "sub" / filename
    write(path)
    write(path)  # replacing an existing file too
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == [filename]  # no temporary file left


def test_data_and_cache_writers_follow_the_umask(umask: int, tmp_path: Path):
    want = 0o666 & ~umask
    src = _png(tmp_path / "src.png")
    process_one(src, tmp_path / "processed" / "images" / "a.png", short_side=32)
    npy = _write_entry(tmp_path / "tensors", "g", ["a", "b"], np.zeros((2, 4, 4), np.uint8), {"size": 4})
    mirror = tmp_path / "mirror"
    item = FetchItem("owner/repo", "c0ffee", "images/x.png")
    (mirror / item.rel).parent.mkdir(parents=True)
    _png(mirror / item.rel)
    res = Downloader(str(mirror), tmp_path / "raw", workers=1, progress=False).fetch_many([item])
    assert res[0].ok
    written = [p for p in tmp_path.rglob("*") if p.is_file() and mirror not in p.parents and p != src]
    assert {p.name for p in written} >= {"a.png", npy.name, npy.with_suffix(".json").name, "x.png", "lock.json"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(want) for p in written}


def test_reading_the_umask_leaves_it_unchanged(umask: int):
    assert current_umask() == umask
    assert current_umask() == umask
    assert os.umask(umask) == umask
