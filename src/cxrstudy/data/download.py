"""Parallel, resumable, verified fetching of upstream files from a raw-file base (local mirror or HTTP).

The base is a local folder, a ``file://`` URL or an ``http(s)://`` URL laid out like
raw.githubusercontent.com: ``{base}/{owner}/{repo}/{commit}/{path}``. Files land in
``raw_dir/{owner}/{repo}/{commit}/{path}``; each is written to ``<name>.part`` then renamed, and its
SHA-256 and size are recorded in ``raw_dir/lock.json`` (plus an append-only ``lock.journal`` so that a
killed run loses nothing). A later run re-hashes a present file against the lock and fetches it again
only when it is missing, unrecorded or different. A missing upstream file (404 or absent from the
mirror) is an outcome, never an exception; transient errors are retried with exponential back-off;
paths escaping the raw folder, non-image responses and oversized responses are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit
from urllib.request import url2pathname

import requests
from tqdm import tqdm

from cxrstudy.config import DEFAULT_BASE_URL, github_api, mirror_base
from cxrstudy.fileio import atomic_write_text, sha256_file
from cxrstudy.images import sniff_format

log = logging.getLogger(__name__)

#: Largest file accepted by default (upstream radiographs are at most a few tens of MB).
MAX_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 16
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_ABSENT_STATUS = {404, 410}


class MirrorError(RuntimeError):
    """The configured base (CXR_MIRROR) is unusable: no such folder, host does not answer, wrong layout."""


class UnsafePathError(ValueError):
    """A path from metadata that would escape the data folder."""


class _Refused(Exception):
    """A response that is not acceptable (not an image, too large)."""


class _Absent(Exception):
    """The upstream file does not exist (HTTP 404/410, or not in the local mirror)."""


class _Transient(Exception):
    """A failure worth retrying (timeout, connection reset, 5xx, truncated body)."""


@dataclass(frozen=True)
class FetchItem:
    """One file to fetch: a path inside a pinned repository; ``kind`` 'image' is content-checked."""

    repo: str
    commit: str
    path: str
    kind: str = "image"

    @property
    def rel(self) -> str:
        """Path relative to the base and to the raw folder."""
        return f"{self.repo}/{self.commit}/{self.path}"


@dataclass
class FetchResult:
    """Outcome of one fetch: status is downloaded, cached, absent, failed or refused."""

    item: FetchItem
    status: str
    local: Path | None = None
    sha256: str = ""
    size: int = 0
    reason: str = ""
    attempts: int = 0

    @property
    def ok(self) -> bool:
        """True when the file is on disk and verified."""
        return self.status in ("downloaded", "cached")


# --------------------------------------------------------------------------------------------------------
# base locations
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A parsed base: ``local`` folder or ``http`` URL (``raw`` tells raw.githubusercontent.com)."""

    value: str
    local: Path | None = None
    url: str = ""

    @property
    def is_github_raw(self) -> bool:
        """True when the base is GitHub's raw host (folders are then listed through GitHub's API)."""
        return urlsplit(self.url).netloc.lower() == urlsplit(DEFAULT_BASE_URL).netloc

    def url_for(self, rel: str) -> str:
        """URL of a base-relative path, each segment percent-encoded."""
        return self.url.rstrip("/") + "/" + "/".join(quote(s, safe="") for s in rel.split("/"))


def resolve_base(base: str | None = None) -> Base:
    """Parse a base (default ``$CXR_MIRROR`` / GitHub raw); a local one must be an existing folder."""
    value = (base if base is not None else mirror_base()).strip()
    if not value:
        raise MirrorError("CXR_MIRROR is empty: give a folder, a file:// URL or an http(s):// URL")
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.netloc:
            raise MirrorError(f"CXR_MIRROR={value!r} is not a valid URL (no host)")
        return Base(value, url=value.rstrip("/"))
    if parts.scheme == "file":
        path = Path(url2pathname(parts.path))
    elif parts.scheme and len(parts.scheme) > 1:
        raise MirrorError(
            f"CXR_MIRROR={value!r}: unsupported scheme {parts.scheme!r} (use a path, file:// or http(s)://)"
        )
    else:
        path = Path(value).expanduser()
    if not path.is_dir():
        raise MirrorError(f"CXR_MIRROR={value!r}: no such folder ({path.resolve()})")
    return Base(value, local=path.resolve())


def safe_destination(root: Path, rel: str) -> Path:
    """``root/rel`` after refusing absolute paths, ``..``, backslashes and anything resolving outside root."""
    if not rel or "\x00" in rel or "\\" in rel:
        raise UnsafePathError(f"refused path {rel!r}: empty, NUL or backslash")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", "") for part in rel.split("/")) or rel.startswith("~"):
        raise UnsafePathError(f"refused path {rel!r}: it would escape the data folder")
    root = Path(root).resolve()
    dest = (root / rel).resolve()
    if not dest.is_relative_to(root):
        raise UnsafePathError(f"refused path {rel!r}: resolves to {dest}, outside {root}")
    return dest


# --------------------------------------------------------------------------------------------------------
# the lock file
# --------------------------------------------------------------------------------------------------------


class LockFile:
    """``lock.json`` (path -> sha256, size) plus an append-only journal replayed on load; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.journal = self.path.with_suffix(".journal")
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, object]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = dict(data["files"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{self.path}: corrupt lock file ({exc}); delete it to re-verify by re-fetching"
                ) from exc
        if self.journal.exists():
            for line in self.journal.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    if rec.get("sha256"):
                        self.entries[rec["path"]] = {"sha256": rec["sha256"], "size": rec["size"]}
                    else:
                        self.entries.pop(rec["path"], None)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue  # a torn last line of a killed run: that file is simply fetched again

    def get(self, rel: str) -> dict[str, object] | None:
        """The recorded entry of a path, if any."""
        with self._lock:
            return self.entries.get(rel)

    def record(self, rel: str, sha256: str, size: int) -> None:
        """Record a verified file (journalled at once)."""
        self._append({"path": rel, "sha256": sha256, "size": size})

    def forget(self, rel: str) -> None:
        """Drop a path whose file turned out missing or corrupt."""
        self._append({"path": rel, "sha256": "", "size": 0})

    def _append(self, rec: dict[str, object]) -> None:
        with self._lock:
            if rec["sha256"]:
                self.entries[rec["path"]] = {"sha256": rec["sha256"], "size": rec["size"]}  # type: ignore[index]
            else:
                self.entries.pop(rec["path"], None)  # type: ignore[arg-type]
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    def save(self) -> None:
        """Write lock.json atomically and drop the journal."""
        with self._lock:
            text = json.dumps({"version": 1, "files": dict(sorted(self.entries.items()))}, indent=1)
            atomic_write_text(self.path, text)
            self.journal.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# folder listings
# --------------------------------------------------------------------------------------------------------


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.hrefs.append(href)


def parse_autoindex(html: str, folder: str) -> list[str]:
    """File paths (``folder/name``) linked from an HTML auto-index page; sub-folders and parents skipped."""
    parser = _LinkParser()
    parser.feed(html)
    names = set()
    for href in parser.hrefs:
        parts = urlsplit(href)
        if parts.scheme or parts.netloc or parts.query or not parts.path or parts.path.endswith("/"):
            continue
        name = unquote(parts.path)
        if "/" in name or name in (".", ".."):
            continue
        names.add(f"{folder}/{name}")
    return sorted(names)


# --------------------------------------------------------------------------------------------------------
# the downloader
# --------------------------------------------------------------------------------------------------------


class Downloader:
    """Fetch files from a base into ``raw_dir`` in parallel, with retries, resume and a SHA-256 lock."""

    def __init__(
        self,
        base: str | Base | None,
        raw_dir: Path,
        workers: int = 8,
        timeout: tuple[float, float] = (5.0, 30.0),
        retries: int = 3,
        backoff: float = 0.5,
        max_bytes: int = MAX_BYTES,
        progress: bool = True,
    ) -> None:
        self.base = base if isinstance(base, Base) else resolve_base(base)
        self.raw_dir = Path(raw_dir)
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.workers = max(1, int(workers))
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_bytes = max_bytes
        self.progress = progress
        self.lock = LockFile(self.raw_dir / "lock.json")
        self._local = threading.local()
        self.requests_made = 0
        self._count_lock = threading.Lock()
        self._trees: dict[tuple[str, str], dict] = {}

    # -- HTTP plumbing ------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = "cxrstudy-downloader"
            self._local.session = s
        return s

    def _get(self, url: str, timeout: tuple[float, float] | None = None) -> requests.Response:
        with self._count_lock:
            self.requests_made += 1
        return self._session().get(url, stream=True, timeout=timeout or self.timeout)

    def probe(self, rel: str, timeout: tuple[float, float] = (3.0, 10.0)) -> None:
        """Fail fast, naming the base, when it does not hold ``rel`` or its host does not answer."""
        if self.base.local is not None:
            if not (self.base.local / rel).is_file():
                raise MirrorError(
                    f"CXR_MIRROR={self.base.value!r} does not hold {rel}: not a mirror laid out as {{owner}}/{{repo}}/{{commit}}/{{path}}"
                )
            return
        url = self.base.url_for(rel)
        try:
            with self._get(url, timeout=timeout) as r:
                status = r.status_code
        except requests.RequestException as exc:
            raise MirrorError(
                f"CXR_MIRROR={self.base.value!r} does not answer ({type(exc).__name__}: {exc})"
            ) from exc
        if status != 200:
            raise MirrorError(
                f"CXR_MIRROR={self.base.value!r} answered HTTP {status} for {url}: not a usable mirror"
            )

    # -- one file -----------------------------------------------------------------------------------------

    def fetch(self, item: FetchItem) -> FetchResult:
        """Fetch one file unless it is present and matches the lock; never raises for per-file problems."""
        try:
            dest = safe_destination(self.raw_dir, item.rel)
        except UnsafePathError as exc:
            return FetchResult(item, "refused", reason=str(exc))
        entry = self.lock.get(item.rel)
        if dest.is_file() and entry is not None:
            digest = sha256_file(dest)
            if digest == entry["sha256"] and dest.stat().st_size == entry["size"]:
                return FetchResult(item, "cached", dest, digest, int(entry["size"]))
            log.warning("%s does not match lock.json (corrupt or changed); fetching it again", dest)
            self.lock.forget(item.rel)
        part = dest.with_name(dest.name + ".part")
        attempts = 0
        while True:
            attempts += 1
            try:
                digest, size = self._fetch_to(item, part)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, dest)
                self.lock.record(item.rel, digest, size)
                return FetchResult(item, "downloaded", dest, digest, size, attempts=attempts)
            except _Absent as exc:
                return FetchResult(item, "absent", reason=str(exc), attempts=attempts)
            except _Refused as exc:
                return FetchResult(item, "refused", reason=str(exc), attempts=attempts)
            except (_Transient, requests.RequestException, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _Transient) else str(exc)
                if attempts > self.retries:
                    return FetchResult(
                        item, "failed", reason=f"after {attempts} attempts: {reason}", attempts=attempts
                    )
                time.sleep(self.backoff * 2 ** (attempts - 1))
            finally:
                part.unlink(missing_ok=True)

    def _fetch_to(self, item: FetchItem, part: Path) -> tuple[str, int]:
        """Stream one file into ``part``; returns (sha256, size); raises _Absent / _Refused / _Transient."""
        part.parent.mkdir(parents=True, exist_ok=True)
        if self.base.local is not None:
            src = self.base.local / item.rel
            if not src.is_file():
                raise _Absent("not in the mirror")
            size = src.stat().st_size
            if size > self.max_bytes:
                raise _Refused(f"larger than the limit ({size} > {self.max_bytes} bytes)")
            with open(src, "rb") as fh:
                return self._write_stream(item, iter(lambda: fh.read(_CHUNK), b""), part, size)
        url = self.base.url_for(item.rel)
        with self._get(url) as r:
            if r.status_code in _ABSENT_STATUS:
                raise _Absent(f"HTTP {r.status_code}")
            if r.status_code in _TRANSIENT_STATUS:
                raise _Transient(f"HTTP {r.status_code}")
            if r.status_code != 200:
                raise _Refused(f"HTTP {r.status_code}")
            ctype = r.headers.get("Content-Type", "").lower()
            if item.kind == "image" and ctype.startswith("text/html"):
                raise _Refused(f"not an image (Content-Type {ctype})")
            length = r.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if expected is not None and expected > self.max_bytes:
                raise _Refused(f"larger than the limit ({expected} > {self.max_bytes} bytes)")
            try:
                return self._write_stream(item, r.iter_content(_CHUNK), part, expected)
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                raise _Transient(f"truncated or broken response ({type(exc).__name__})") from exc

    def _write_stream(
        self, item: FetchItem, chunks: Iterable[bytes], part: Path, expected: int | None
    ) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        head = b""
        with open(part, "wb") as fh:
            for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > self.max_bytes:
                    raise _Refused(f"larger than the limit (over {self.max_bytes} bytes)")
                if len(head) < 32:
                    head += chunk[: 32 - len(head)]
                h.update(chunk)
                fh.write(chunk)
        if expected is not None and size != expected:
            raise _Transient(f"truncated response ({size} of {expected} bytes)")
        if item.kind == "image":
            if size == 0:
                raise _Refused("not an image (empty response)")
            if sniff_format(head) is None:
                raise _Refused(f"not an image (content starts with {head[:12]!r})")
        return h.hexdigest(), size

    # -- many files ---------------------------------------------------------------------------------------

    def fetch_many(self, items: Sequence[FetchItem], desc: str = "download") -> list[FetchResult]:
        """Fetch many files in parallel with a progress bar; results in input order; the lock is saved."""
        unique = list(dict.fromkeys(items))
        results: dict[FetchItem, FetchResult] = {}
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                futures = {pool.submit(self.fetch, it): it for it in unique}
                bar = tqdm(total=len(futures), desc=desc, unit="file", disable=not self.progress, leave=False)
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
                bar.close()
        finally:
            self.lock.save()
        return [results[it] for it in items]

    # -- listings -----------------------------------------------------------------------------------------

    def list_folder(self, repo: str, commit: str, folder: str) -> list[str]:
        """Repository paths of the files directly in ``folder``; cached under ``raw_dir/.listings``."""
        rel = f"{repo}/{commit}/{folder}"
        safe_destination(self.raw_dir, rel)
        cache = self.raw_dir / ".listings" / repo / commit / (folder.replace("/", "__") + ".json")
        if cache.is_file():
            try:
                data = json.loads(cache.read_text(encoding="utf-8"))
                if data.get("base") == self.base.value:
                    return list(data["files"])
            except (json.JSONDecodeError, KeyError):
                pass
        files = self._list_uncached(repo, commit, folder)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"base": self.base.value, "files": files}, indent=0))
        return files

    def _list_uncached(self, repo: str, commit: str, folder: str) -> list[str]:
        rel = f"{repo}/{commit}/{folder}"
        if self.base.local is not None:
            d = self.base.local / rel
            if not d.is_dir():
                raise MirrorError(f"CXR_MIRROR={self.base.value!r} has no folder {rel}")
            return sorted(f"{folder}/{e.name}" for e in os.scandir(d) if e.is_file())
        if self.base.is_github_raw:
            key = (repo, commit)
            if key not in self._trees:  # one API call per repository, however many folders are listed
                url = f"{github_api().rstrip('/')}/repos/{repo}/git/trees/{commit}?recursive=1"
                self._trees[key] = self._get_listing(url).json()
            data = self._trees[key]
            if data.get("truncated"):
                raise MirrorError(
                    f"GitHub tree listing of {repo}@{commit} is truncated; cannot list {folder}"
                )
            prefix = folder.rstrip("/") + "/"
            return sorted(
                e["path"]
                for e in data.get("tree", [])
                if e.get("type") == "blob"
                and e["path"].startswith(prefix)
                and "/" not in e["path"][len(prefix) :]
            )
        r = self._get_listing(self.base.url_for(rel) + "/")
        return parse_autoindex(r.text, folder)

    def _get_listing(self, url: str) -> requests.Response:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = self._get(url)
                r.content  # noqa: B018 - read the whole body inside the retry loop
                if r.status_code == 200:
                    return r
                if r.status_code not in _TRANSIENT_STATUS:
                    raise MirrorError(f"listing {url} failed: HTTP {r.status_code}")
                last = MirrorError(f"listing {url} failed: HTTP {r.status_code}")
            except requests.RequestException as exc:
                last = exc
            time.sleep(self.backoff * 2**attempt)
        raise MirrorError(f"listing {url} failed after {self.retries + 1} attempts: {last}")
