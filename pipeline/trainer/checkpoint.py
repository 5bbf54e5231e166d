"""Checkpoint folders: written atomically, found by the step they were taken at.

Layout (``<run>/checkpoints/``)::

    step-00000004/            a complete checkpoint (only complete ones carry this name)
      trainer_state.json      step, epoch, counters, world size, the run id; what the loop restores
      model_optim/            model + optimizer state: torch.distributed.checkpoint (DCP) shards,
                              one file per rank plus .metadata (re-shardable: a run may resume with
                              another number of processes); DeepSpeed: engine/ instead
      scheduler.pt            LR scheduler state_dict
      rng/rank<r>.pt          python, numpy, torch (CPU and CUDA) RNG states of rank r
                              (both plain data, read back with torch.load(weights_only=True):
                              resuming a checkpoint never runs code from it)
      DONE                    written last (JSON: step, files with their sizes and checksums)
    .tmp-step-00000008/       being written (or left by a kill): ignored and deleted on start

Protocol: every rank writes its part into ``.tmp-step-N/``; after a barrier rank 0 writes ``DONE``,
fsyncs and renames the folder to ``step-N`` (atomic on POSIX; :func:`pipeline.atomic_dir.publish`,
the helper of every complete-or-absent folder of the pipeline), then deletes the oldest complete
checkpoints beyond ``train.save_total_limit``. A run killed at any moment (SIGKILL, scancel, time
limit) leaves either a complete ``step-N`` or debris under a ``.tmp-`` name, never a partial
``step-N``; it resumes from the highest complete one.

Verification: ``DONE`` records each file's size and a fast checksum (:func:`file_checksum`: sha256
of the size, the first and the last 4 MiB of the file -- the whole file when it is at most 8 MiB,
as in the tests' tiny models; a 7B shard is read for 8 MiB, not gigabytes). Before resuming,
:func:`verify` compares them; a checkpoint that fails is moved aside to ``damaged-step-N`` (never
deleted; ignored by the lookup, the debris cleaner and :func:`prune`) and the loop resumes from the
previous complete one, saying so in the log. A marker written before checksums were recorded is
still accepted (its sizes, where recorded, are checked).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from pipeline.atomic_dir import DONE, is_complete, publish

__all__ = [
    "DONE",
    "PREFIX",
    "TMP_PREFIX",
    "STATE_FILE",
    "checkpoint_name",
    "complete_checkpoints",
    "latest_checkpoint",
    "checkpoint_step",
    "remove_debris",
    "tmp_dir",
    "commit",
    "prune",
    "read_state",
    "file_checksum",
    "verify",
    "move_aside",
    "DAMAGED_PREFIX",
]

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
DAMAGED_PREFIX = "damaged-"
CHECKSUM = "sha256-head-tail-4MiB"
_CHUNK = 4 * 2**20
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{int(step):08d}"


def complete_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete checkpoints (named ``step-N`` and holding DONE), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step-<N>)")
    return int(m.group(1))


def remove_debris(ckpt_dir: Path) -> List[str]:
    """Delete half-written checkpoints (``.tmp-*``) left by a killed attempt; returns their names."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    gone = []
    for p in ckpt_dir.iterdir():
        if p.name.startswith(TMP_PREFIX) or (_NAME.match(p.name) and not is_complete(p)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def tmp_dir(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{TMP_PREFIX}{checkpoint_name(step)}"


def commit(tmp: Path, step: int, info: Optional[Dict[str, Any]] = None) -> Path:
    """Rank 0, after every rank finished writing into ``tmp``: DONE (step, files and sizes), then
    rename to ``step-N``, replacing a complete checkpoint of the same step from an earlier attempt."""
    tmp = Path(tmp)
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
    sums = {str(p.relative_to(tmp)): file_checksum(p) for p in paths}
    final = tmp.parent / checkpoint_name(step)
    marker = {"step": int(step), "files": files, "checksum": CHECKSUM, "checksums": sums, **(info or {})}
    publish(tmp, final, marker, replace=True)
    return final


def prune(ckpt_dir: Path, keep: int) -> List[str]:
    """Delete all but the ``keep`` newest complete checkpoints; returns the deleted names."""
    found = complete_checkpoints(ckpt_dir)
    gone = []
    for p in found[: max(0, len(found) - int(keep))]:
        # rename first so a kill during deletion leaves debris, not a "complete" partial folder
        aside = p.with_name(f"{TMP_PREFIX}deleting-{p.name}")
        os.rename(p, aside)
        shutil.rmtree(aside, ignore_errors=True)
        gone.append(p.name)
    return gone


def read_state(path: Path) -> Dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def file_checksum(path: Path) -> str:
    """sha256 of the file's size and its first and last 4 MiB (the whole file up to 8 MiB): catches
    truncation and damage at either end of a shard while reading a few MiB of a multi-GB file."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _CHUNK:
            h.update(f.read())
        else:
            h.update(f.read(_CHUNK))
            f.seek(size - _CHUNK)
            h.update(f.read(_CHUNK))
    return h.hexdigest()


def verify(path: Path) -> Optional[str]:
    """None when the checkpoint's files match the sizes and checksums its ``DONE`` records, else what
    is wrong (the first problem found). A marker without checksums (written before they were
    recorded) is checked for sizes only; one without a file list is accepted."""
    path = Path(path)
    try:
        marker = json.loads((path / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable {DONE} marker ({type(e).__name__}: {e})"
    if not isinstance(marker, dict):
        return f"{DONE} marker is not a JSON object"
    files = marker.get("files") or {}
    sums = marker.get("checksums") or {}
    if sums and marker.get("checksum") != CHECKSUM:
        return f"unknown checksum kind {marker.get('checksum')!r}"
    for name, size in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        got = f.stat().st_size
        if got != int(size):
            return f"{name} has {got} bytes, {DONE} recorded {int(size)}"
        if name in sums and file_checksum(f) != sums[name]:
            return f"{name} does not match its recorded checksum"
    return None


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-step-N`` (``-2``, ``-3``... if taken); returns the new
    path. Nothing is deleted: the folder stays for inspection, outside every lookup."""
    path = Path(path)
    target = path.with_name(f"{DAMAGED_PREFIX}{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
    os.rename(path, target)
    return target


# --------------------------------------------------------------------------------------------
# a full disk (or an exceeded quota) while writing
# --------------------------------------------------------------------------------------------
class StorageFull(RuntimeError):
    """The device (or the user's quota) filled up while the run wrote a checkpoint or its final model;
    the partial write was removed and the message says how to go on."""


_FULL = {errno.ENOSPC, errno.EDQUOT}


def is_storage_full(exc: BaseException) -> bool:
    """``exc`` (or what caused it, or a failure inside DCP's CheckpointException) is ENOSPC / EDQUOT."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def resume_hint(ckpt_dir: Path) -> str:
    """Where a rerun would start, as a message ends: the latest complete checkpoint, or over."""
    latest = latest_checkpoint(ckpt_dir)
    return f"it resumes from {latest.name}" if latest is not None else "it starts over (no checkpoint yet)"


@contextlib.contextmanager
def storage_full_is_clear(what: str, partial: Path, resume: str) -> Iterator[None]:
    """Writing ``what`` into ``partial``: a full disk or quota becomes :class:`StorageFull` (one line
    naming the folder, the free space once ``partial`` is removed, and ``resume``: where a rerun
    starts); any other error passes unchanged."""
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if not is_storage_full(e):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        where = next((p for p in [Path(partial), *Path(partial).parents] if p.exists()), Path("/"))
        free = shutil.disk_usage(where).free / 1e9
        raise StorageFull(
            f"no space left on the device (or the disk quota is exceeded) while writing {what} in "
            f"{Path(partial).parent} ({free:.1f} GB free there now, the partial write removed); free some "
            f"space (or lower train.save_total_limit) and run it again: {resume}"
        ) from e
