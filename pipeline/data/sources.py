"""Where raw files come from: ``dataset.source.kind`` = ``local`` | ``url`` | ``hf``.

- ``local``: a file on disk (``source.path``; .json array, .jsonl or .parquet).
- ``url``: a file at a pinned address, downloaded with urllib into
  ``paths.raw_dir/<host>/<url path>`` (written to a temporary name, checked, then renamed), and
  reused from there afterwards.
- ``hf``: ``huggingface_hub.hf_hub_download(repo_type="dataset", revision=<pinned>)`` with
  ``cache_dir=paths.raw_dir/hf``.

Offline (``HF_HUB_OFFLINE=1``) the network is never touched: a cached file is used, otherwise
:class:`SourceError` says where to put the file (or to use ``kind=local``).
``source.sha256`` is verified when set (downloads and cached files alike); the sha256 of the raw
file actually used is always returned and recorded in the processed dataset's meta.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.data.records import sha256_file

DOWNLOAD_TIMEOUT_S = 60


class SourceError(RuntimeError):
    """A raw file cannot be obtained (offline and not cached, download failed, checksum mismatch)."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class RawFile:
    path: Path
    sha256: str
    origin: str  # the path, url or hf://repo@revision/filename it came from
    downloaded: bool = False  # fetched during this call (False: local file or cache)


def _verify(path: Path, expected: Optional[str], origin: str, cached: bool) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        what = "cached file" if cached else "file"
        hint = f" Delete {path} to download it again." if cached else ""
        raise SourceError(
            f"sha256 mismatch for {what} {path} (from {origin}): expected {expected}, "
            f"got {digest} (dataset.source.sha256).{hint}"
        )
    return digest


def url_cache_path(url: str, raw_dir: Path) -> Path:
    """Where a url's file lives in the raw cache: ``raw_dir/<host>/<path of the url>``."""
    u = urllib.parse.urlparse(url)
    parts = [p for p in urllib.parse.unquote(u.path).split("/") if p not in ("", ".", "..")]
    if not parts:
        raise SourceError(f"url '{url}' names no file")
    host = (u.netloc or u.scheme or "local").replace(":", "_")
    return Path(raw_dir, host, *parts)


def fetch_url(url: str, raw_dir: Path, sha256: Optional[str] = None) -> RawFile:
    dest = url_cache_path(url, raw_dir)
    if dest.is_file():
        return RawFile(dest, _verify(dest, sha256, url, cached=True), url)
    if offline():
        raise SourceError(
            f"HF_HUB_OFFLINE=1 and {url} is not in the download cache. Put the file at {dest}"
            + (f" (sha256 {sha256})" if sha256 else "")
            + ", or use a local copy: dataset.source.kind=local dataset.source.path=/path/to/file"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "plw-pipeline"})
            with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, out)
        digest = _verify(Path(tmp), sha256, url, cached=False)
        os.replace(tmp, dest)
    except SourceError:
        raise
    except Exception as e:  # URLError, HTTPError, timeouts, ...
        raise SourceError(
            f"download of {url} failed: {e}. Without internet, put the file at {dest} or use dataset.source.kind=local"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return RawFile(dest, digest, url, downloaded=True)


def fetch_hf(repo_id: str, filename: str, revision: str, raw_dir: Path, sha256: Optional[str] = None) -> RawFile:
    from huggingface_hub import hf_hub_download

    cache_dir = Path(raw_dir) / "hf"
    origin = f"hf://datasets/{repo_id}@{revision}/{filename}"
    try:
        path = hf_hub_download(
            repo_id=repo_id,
            filename=filename,
            revision=revision,
            repo_type="dataset",
            cache_dir=str(cache_dir),
            local_files_only=offline(),
        )
    except Exception as e:  # LocalEntryNotFoundError, HfHubHTTPError, connection errors
        where = cache_dir / f"datasets--{repo_id.replace('/', '--')}" / "snapshots" / revision / filename
        if offline():
            msg = (
                f"HF_HUB_OFFLINE=1 and {origin} is not in the cache ({where}). Download it once online "
                f"(python -m pipeline.data.build dataset=...), copy it there, or use a local copy: "
                f"dataset.source.kind=local dataset.source.path=/path/to/{Path(filename).name}"
            )
        else:
            msg = f"cannot download {origin}: {type(e).__name__}: {e}"
        raise SourceError(msg) from e
    p = Path(path)
    return RawFile(p, _verify(p, sha256, origin, cached=True), origin)


def resolve_source(source, raw_dir) -> RawFile:
    """The raw file of a ``SourceConfig`` (typed config object or DictConfig), fetched if needed."""
    kind = source.kind
    if kind == "local":
        p = Path(source.path).expanduser().resolve()
        if not p.is_file():
            raise SourceError(f"dataset.source.path: file not found: {p}")
        return RawFile(p, _verify(p, source.sha256, str(p), cached=False), str(p))
    if kind == "url":
        return fetch_url(source.url, Path(raw_dir), source.sha256)
    if kind == "hf":
        return fetch_hf(source.repo_id, source.filename, source.revision, Path(raw_dir), source.sha256)
    raise SourceError(f"dataset.source.kind: unknown kind {kind!r}")
