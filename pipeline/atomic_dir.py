"""Folders that appear complete or not at all: built under a temporary name, ``DONE`` written last,
then renamed into place (atomic on POSIX).

Every cached, content-addressed folder of the pipeline is made this way -- pre-trained model
checkpoints (:mod:`pipeline.models`), converted and trained tokenizers (:mod:`pipeline.tokenizer`),
training checkpoints (:mod:`pipeline.trainer.checkpoint`) -- so a process killed at any moment
leaves either the complete folder or debris under a temporary ``.``-name, never a partial folder
under the final name, and a reader only needs to check :func:`is_complete`.

::

    with building(final, done=lambda tmp: {"files": ...}) as tmp:
        write everything into tmp
    # final/ now exists with DONE; a folder published meanwhile by another process wins
    # (replace=True: this one replaces it)

:func:`publish` is the last step alone, for a folder filled by several processes (every rank of a
training run writes its part of a checkpoint into one temporary folder, rank 0 publishes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

DONE = "DONE"

Done = Union[str, Mapping[str, Any]]


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` was published (it holds ``DONE``)."""
    return (Path(folder) / DONE).is_file()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _done_text(done: Done) -> str:
    if isinstance(done, str):
        return done
    return json.dumps(dict(done), indent=2, sort_keys=True) + "\n"


def publish(tmp: Path, final: Path, done: Done, replace: bool = False) -> bool:
    """Write ``DONE`` (text, or a mapping as JSON) into the finished folder ``tmp``, flush it, and
    rename ``tmp`` to ``final``. With ``replace`` an existing ``final`` is deleted first (a
    checkpoint of the same step from an earlier attempt, a dataset rebuilt on request). When the
    rename fails because a complete ``final`` is there (another process published the same content
    first, also between the deletion and the rename), ``tmp`` is deleted and False returned; any
    other failure raises. True when this call published ``final``."""
    tmp, final = Path(tmp), Path(final)
    with open(tmp / DONE, "w", encoding="utf-8") as f:
        f.write(_done_text(done))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if is_complete(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    fsync_dir(final.parent)
    return True


def staging(final: Path) -> Path:
    """Where a folder swapped in by :func:`swap_in` is written first: ``.<name>.tmp`` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def swap_in(tmp: Path, final: Path) -> Path:
    """Rename the finished folder ``tmp`` to ``final`` without a ``DONE`` marker (a run's
    ``final/`` model folder): an existing ``final`` is first renamed aside and deleted after, so
    ``final`` is never half-written."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        aside = final.with_name(f".{final.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, final)
    return final


@contextlib.contextmanager
def building(
    final: Path,
    done: Union[Done, Callable[[Path], Done], None] = None,
    replace: bool = False,
    prefix: Optional[str] = None,
) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final`` (``.<name>.tmp-<random>``, or ``prefix`` +
    random) to build into; when the block ends normally, :func:`publish` it as ``final`` with
    ``done`` (a value, or a function of the temporary folder called once it is filled; default
    ``{}``). The temporary folder is deleted whatever happens (on an exception, nothing is
    published and the exception propagates)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        marker = done(tmp) if callable(done) else done
        publish(tmp, final, {} if marker is None else marker, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
