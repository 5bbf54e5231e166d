"""One training process (rank) of a multi-process run: ``python -m pipeline.trainer.rank <run folder>``.

Started ``train.nproc`` times by ``torchrun``/``accelerate launch`` (``pipeline.train`` does it, or
a user or cluster script does; ``pipeline.train.launch_command`` prints the command)::

    torchrun --standalone --nproc_per_node 4 -m pipeline.trainer.rank runs/<run id>
    accelerate launch --config_file conf/distributed/fsdp.yaml --num_processes 4 -m pipeline.trainer.rank runs/<run id>

It reads the run folder's config (:meth:`pipeline.runs.RunDir.load_config`: ``launch.yaml``,
written by ``pipeline.train`` for the current attempt, else ``config.yaml``) and the variant
(``run.json``), and runs :func:`pipeline.train.train`. No Hydra composition happens here (the config
is already resolved).

Status: the process holding the run's lock owns it (:mod:`pipeline.lifecycle`). Started by
``pipeline.train`` (which holds the lock), the ranks leave ``status.json`` to it; started on their
own, rank 0 takes the lock and executes the attempt through :func:`pipeline.lifecycle.execute`
(``running`` / ``done`` / ``failed`` / ``pending`` when stopped). Every rank writes its traceback to
``<run>/logs/worker-rank<r>.err`` when it fails; rank 0 of a stopped run writes
``<run>/logs/preempted.json``. Exit codes: 0 done, 75 stopped after a checkpoint (requeue), 1 failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from pipeline import lifecycle
from pipeline.lifecycle import Preempted, error_text
from pipeline.runs import RunDir, atomic_write_json
from pipeline.train import PREEMPTED_MARKER, setup_logging, train


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    rd = RunDir(Path(argv[0]).resolve())
    rank = int(os.environ.get("RANK", "0"))
    # rank 0 owns the status when no launching process holds the run's lock
    owner = rank == 0 and lifecycle.acquire(rd)
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        variant = rd.info().get("variant", "none")
        cfg = rd.load_config()
        if owner:
            lifecycle.execute(rd, lambda: train(cfg, rd, variant))
        else:
            train(cfg, rd, variant)
        return 0
    except Preempted as e:
        if rank == 0:
            atomic_write_json(rd.logs / PREEMPTED_MARKER, e.info())
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    except BaseException as e:
        rd.logs.mkdir(parents=True, exist_ok=True)
        text = f"[rank {rank}] {error_text(e)}"
        (rd.logs / f"worker-rank{rank}.err").write_text(text + "\n", encoding="utf-8")
        if owner:
            lifecycle.mark_failed(rd, text)
        print(text, file=sys.stderr)
        return 1
    finally:
        if owner:
            lifecycle.release(rd)


if __name__ == "__main__":
    sys.exit(main())
