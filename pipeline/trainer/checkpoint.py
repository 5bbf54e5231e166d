"""Checkpoint folders: written atomically, found by the step they were taken at.

Layout (``<run>/checkpoints/``)::

    step-00000004/            a complete checkpoint (only complete ones carry this name)
      trainer_state.json      step, epoch, counters, world size, the run id; what the loop restores
      model_optim/            model + optimizer state: torch.distributed.checkpoint (DCP) shards,
                              one file per rank plus .metadata (re-shardable: a run may resume with
                              another number of processes); DeepSpeed: engine/ instead
      scheduler.pt            LR scheduler state_dict
      rng/rank<r>.pt          python, numpy, torch (CPU and CUDA) RNG states of rank r
      DONE                    written last (JSON: step, files and sizes)
    .tmp-step-00000008/       being written (or left by a kill): ignored and deleted on start

Protocol: every rank writes its part into ``.tmp-step-N/``; after a barrier rank 0 writes ``DONE``,
fsyncs and renames the folder to ``step-N`` (atomic on POSIX), then deletes the oldest complete
checkpoints beyond ``train.save_total_limit``. A run killed at any moment (SIGKILL, scancel, time
limit) leaves either a complete ``step-N`` or debris under a ``.tmp-`` name, never a partial
``step-N``; it resumes from the highest complete one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
DONE = "DONE"
STATE_FILE = "trainer_state.json"
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
        if m and p.is_dir() and (p / DONE).is_file():
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
        if p.name.startswith(TMP_PREFIX) or (_NAME.match(p.name) and not (p / DONE).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def tmp_dir(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{TMP_PREFIX}{checkpoint_name(step)}"


def _fsync_dir(path: Path) -> None:
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


def commit(tmp: Path, step: int, info: Optional[Dict[str, Any]] = None) -> Path:
    """Rank 0, after every rank finished writing into ``tmp``: DONE, then rename to ``step-N``."""
    tmp = Path(tmp)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    done = {"step": int(step), "files": files, **(info or {})}
    with open(tmp / DONE, "w", encoding="utf-8") as f:
        f.write(json.dumps(done, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = tmp.parent / checkpoint_name(step)
    if final.exists():  # a complete checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
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
