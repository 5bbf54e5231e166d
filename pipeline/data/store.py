"""The processed-dataset store: ``paths.processed_dir/<name>-<hash12>/``.

Each folder is written once and then only read (one exception: :func:`update_meta` adds the
dataset's R_g to the meta.json of a folder built before it was recorded; data.jsonl never changes):

- ``data.jsonl``: one record per line: ``instruction``, ``input``, ``output``, ``inverted`` (bool),
  ``source_index`` (the record's index in the raw file) and, when the transform measured them,
  ``tokens`` = ``{instruction, input, output}`` token counts (tokenizer in meta.json);
- ``meta.json``: the full definition (the hashed part), the source, the raw file's sha256, counts
  (raw, dropped, inverted, ...), R_g before/after the transform, the dataset's R_g (``rg``,
  ``rg_measure``: see :mod:`pipeline.data.build`), tokenizer, versions, time;
- ``DONE``: written last, holding the sha256 of data.jsonl; the folder is built under a temporary
  name and renamed into place with it (:mod:`pipeline.atomic_dir`). A folder without DONE (left by
  an older, interrupted build) is rebuilt; so is one whose data.jsonl no longer matches DONE.

The hash (:func:`content_hash`) covers everything that defines the content and nothing else: the
raw file's sha256, format, empty-output policy, max_records, the transform (kind; for targets also
target, tolerance and seed), :data:`~pipeline.data.inversion.TRANSFORM_VERSION`,
:data:`~pipeline.data.records.RECORDS_VERSION`, :data:`STORE_VERSION` and, only when the transform
uses token lengths, the tokenizer fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pipeline.atomic_dir import building
from pipeline.data import inversion
from pipeline.data import records as records_mod
from pipeline.data.records import sha256_file

STORE_VERSION = 1
DATA_FILE = "data.jsonl"
META_FILE = "meta.json"
DONE_FILE = "DONE"


def definition(
    raw_sha256: str,
    fmt: str,
    empty_output: str,
    max_records: Optional[int],
    transform_kind: str,
    target_rg: Optional[float] = None,
    tolerance: Optional[float] = None,
    seed: Optional[int] = None,
    tokenizer_fingerprint: Optional[str] = None,
    completion_turns: str = "all",
) -> Dict[str, Any]:
    """The canonical description of a processed dataset's content (what the hash covers).

    Settings that cannot change the content are left out (a transform of kind ``none`` ignores
    target/seed/tokenizer; Short ignores tolerance and seed), so they do not split the store.
    """
    if transform_kind == "none":
        tr: Dict[str, Any] = {"kind": "none"}
    elif transform_kind == "invert":
        if tokenizer_fingerprint is None:
            raise ValueError("prompt inversion needs the tokenizer fingerprint in the definition")
        tr = {
            "kind": "invert",
            "version": inversion.TRANSFORM_VERSION,
            "tokenizer": tokenizer_fingerprint,
            "target_rg": None if target_rg is None else float(target_rg),
        }
        if target_rg is not None:
            tr.update(tolerance=float(tolerance), seed=int(seed))
    else:
        raise ValueError(f"unknown transform kind {transform_kind!r}")
    out = {
        "store_version": STORE_VERSION,
        "records_version": records_mod.RECORDS_VERSION,
        "raw_sha256": raw_sha256,
        "format": fmt,
        "empty_output": empty_output,
        "max_records": max_records,
        "transform": tr,
    }
    if fmt == "messages":  # chat data: the counted assistant turns define R_g (and the inversion)
        out["completion_turns"] = completion_turns
    return out


def content_hash(defn: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(defn, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_dir(processed_dir, name: str, digest: str) -> Path:
    return Path(processed_dir) / f"{name}-{digest[:12]}"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_done(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((folder / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_done(folder: Path, verify: bool = True) -> bool:
    """DONE exists (and, with ``verify``, data.jsonl still has the sha256 DONE recorded)."""
    done = _read_done(Path(folder))
    if not done or not (Path(folder) / DATA_FILE).is_file() or not (Path(folder) / META_FILE).is_file():
        return False
    return not verify or sha256_file(Path(folder) / DATA_FILE) == done.get("data_sha256")


def write(folder: Path, records: List[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    """Write data.jsonl and meta.json into a temporary folder, DONE last, then rename it into place
    (:func:`pipeline.atomic_dir.building`); a folder already there (a forced rebuild, a broken one)
    is replaced, one published meanwhile by another process (same content) is kept."""
    folder = Path(folder)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    done = {"data_sha256": hashlib.sha256(data).hexdigest(), "n_records": len(records), "hash": meta.get("hash")}
    with building(folder, done=json.dumps(done) + "\n", replace=folder.exists()) as tmp:
        (tmp / DATA_FILE).write_bytes(data)
        (tmp / META_FILE).write_bytes((json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())


def update_meta(folder: Path, meta: Dict[str, Any]) -> None:
    """Rewrite meta.json of a finished folder (atomically); the hashed definition must not change."""
    folder = Path(folder)
    old = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    if old.get("hash") != meta.get("hash") or old.get("definition") != meta.get("definition"):
        raise ValueError(f"{folder / META_FILE}: update_meta may not change the dataset's definition or hash")
    meta = {k: v for k, v in meta.items() if k != "dir"}
    _atomic_write(folder / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())


def read(folder: Path) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    folder = Path(folder)
    with open(folder / DATA_FILE, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return records, meta
