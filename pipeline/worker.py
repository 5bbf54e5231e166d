"""One training process of a multi-process run: ``python -m pipeline.worker <run folder>``.

Started ``train.nproc`` times by ``torchrun``/``accelerate launch`` (``pipeline.train`` does it, or
a user or cluster script does; ``pipeline.train.launch_command`` prints the command)::

    torchrun --standalone --nproc_per_node 4 -m pipeline.worker runs/<run id>
    accelerate launch --config_file conf/distributed/fsdp.yaml --num_processes 4 -m pipeline.worker runs/<run id>

It reads the run folder's config (``worker.yaml``, written by ``pipeline.train`` for the current
attempt, else ``config.yaml``) and the variant (``run.json``), and runs :func:`pipeline.train.train`.
No Hydra composition happens here (the config is already resolved).

Status: when started by ``pipeline.train`` (``PLW_STATUS_OWNER=parent``) the parent keeps
``status.json``; otherwise rank 0 sets ``running`` / ``done`` / ``failed`` / ``pending`` (stopped)
itself. Every rank writes its traceback to ``<run>/logs/worker-rank<r>.err`` when it fails; rank 0
of a stopped run writes ``<run>/logs/preempted.json``. Exit codes: 0 done, 75 stopped after a
checkpoint (requeue), 1 failed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional


def load_run_config(run_dir: Path):
    """The run's config as a validated, structured DictConfig (schema of pipeline.config)."""
    from omegaconf import OmegaConf

    from pipeline.config import Config, validate

    run_dir = Path(run_dir)
    path = run_dir / "worker.yaml"
    if not path.is_file():
        path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no worker.yaml or config.yaml (not a run folder?)")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    validate(cfg)
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from pipeline.runs import RunDir, atomic_write_json
    from pipeline.train import PREEMPTED_MARKER, Preempted, error_text, setup_logging, train

    rd = RunDir(Path(argv[0]).resolve())
    rank = int(os.environ.get("RANK", "0"))
    owner = os.environ.get("PLW_STATUS_OWNER") != "parent" and rank == 0
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        variant = json.loads(rd.run_json.read_text(encoding="utf-8")).get("variant", "none")
        cfg = load_run_config(rd.path)
        if owner:
            rd.set_status("running")
        summary = train(cfg, rd, variant)
        if owner:
            rd.set_status("done", final=str(rd.final), steps=summary.get("steps"), final_loss=summary.get("final_loss"))
        return 0
    except Preempted as e:
        if rank == 0:
            info = {"reason": e.reason, "step": e.step, "checkpoint": e.checkpoint,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_json(rd.logs / PREEMPTED_MARKER, info)
            if owner:
                rd.set_status("pending", interrupted=info)
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    except BaseException as e:
        rd.logs.mkdir(parents=True, exist_ok=True)
        text = f"[rank {rank}] {error_text(e)}"
        (rd.logs / f"worker-rank{rank}.err").write_text(text + "\n", encoding="utf-8")
        if owner:
            rd.set_status("failed", error=text)
        print(text, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
