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
      DONE                    written last (JSON: step, files and sizes)
    .tmp-step-00000008/       being written (or left by a kill): ignored and deleted on start

Protocol: every rank writes its part into ``.tmp-step-N/``; after a barrier rank 0 writes ``DONE``,
fsyncs and renames the folder to ``step-N`` (atomic on POSIX; :func:`pipeline.atomic_dir.publish`,
the helper of every complete-or-absent folder of the pipeline), then deletes the oldest complete
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
]

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
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
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    final = tmp.parent / checkpoint_name(step)
    publish(tmp, final, {"step": int(step), "files": files, **(info or {})}, replace=True)
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
