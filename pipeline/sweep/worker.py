"""Execute one run of a sweep: ``python -m pipeline.sweep.worker <run folder>``.

The launchers (local subprocesses, SLURM array tasks) start this process; it is a thin driver:

1. takes the run's execution lock (``<run>/.lock``, flock); if another process holds it, exits
   with :data:`EXIT_BUSY` without touching anything (two sweeps never train one run twice);
2. rewrites ``<run>/heartbeat.json`` every ``launcher.heartbeat_s`` seconds from a thread;
3. loads the resolved config the sweep wrote (``<run>/launch.yaml``; Hydra does not run here) and
   calls :func:`pipeline.train.run` ``(cfg, variant)``, which resumes from the latest checkpoint,
   sets the status (running, done, failed with the error) and checkpoints on SIGTERM/SIGUSR1;
4. exits :data:`EXIT_DONE` (status done), :data:`EXIT_INTERRUPTED` (checkpointed on a signal and
   stopped: resumable) or :data:`EXIT_FAILED` (status failed, the error recorded).

Multi-GPU runs: :func:`pipeline.train.run` itself starts ``train.nproc`` training processes
(torchrun/accelerate) and forwards SIGTERM/SIGUSR1 to them; this worker is one process per run.
(Should it ever run under torchrun, only global rank 0 takes the lock and writes the heartbeat.)

``PLW_SWEEP_TRAINER`` (environment) names another module providing ``run(cfg, variant)`` in place of
``pipeline.train`` (a seam for developing the launchers against another trainer; unset = the real one).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

from pipeline.runs import RunDir

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # checkpointed on a signal and stopped (= pipeline.train's PREEMPTED_EXIT_CODE)
EXIT_BUSY = 79  # another process executes this run (its lock is held): nothing was done

log = logging.getLogger("pipeline.sweep.worker")


def load_launch(rd: RunDir) -> Dict[str, Any]:
    try:
        return json.loads(rd.launch_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{rd.launch_json}: missing (the sweep writes it before launching a run)")


def load_run_config(rd: RunDir):
    """The resolved config of the latest launch, validated against the schema (no Hydra)."""
    from omegaconf import OmegaConf

    from pipeline.config import Config, validate

    base = OmegaConf.structured(Config)
    cfg = OmegaConf.merge(base, OmegaConf.load(rd.launch_config))
    validate(cfg)
    return cfg


class Heartbeat:
    """A daemon thread rewriting heartbeat.json until stopped."""

    def __init__(self, rd: RunDir, every_s: float, **info: Any) -> None:
        self.rd, self.every_s, self.info = rd, every_s, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                self.rd.write_heartbeat(**self.info)
            except OSError as e:  # a full or flaky disk must not kill the run
                log.warning("heartbeat: %s", e)
            if self._stop.wait(self.every_s):
                return

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _record_failure(rd: RunDir, message: str) -> None:
    st = rd.status() if rd.status_file.exists() else {}
    if st.get("state") != "failed":
        rd.set_status("failed", error=message)


def execute(run_dir: Path) -> int:
    rd = RunDir(Path(run_dir))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    fd = None
    if rank0:
        fd = rd.try_lock()
        if fd is None:
            print(f"[worker] {rd.path}: another process holds {rd.lock_file}; not starting", flush=True)
            return EXIT_BUSY
    hb = None
    try:
        launch = load_launch(rd)
        if rank0:
            from pipeline.runs import slurm_job_id_from_env

            hb = Heartbeat(rd, float(launch.get("heartbeat_s", 30.0)),
                           slurm_job_id=slurm_job_id_from_env()).start()
        try:
            cfg = load_run_config(rd)
        except Exception as e:  # noqa: BLE001 - recorded in status.json, then re-raised
            if rank0:
                _record_failure(rd, f"config {rd.launch_config}: {type(e).__name__}: {e}")
            raise
        variant = launch.get("variant", "none")
        import importlib

        train = importlib.import_module(os.environ.get("PLW_SWEEP_TRAINER") or "pipeline.train")

        try:
            train.run(cfg, variant)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            return _outcome(rd, code, rank0)
        except BaseException as e:  # noqa: BLE001
            if rank0:
                _record_failure(rd, f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return EXIT_FAILED
        return _outcome(rd, 0, rank0)
    finally:
        if hb is not None:
            hb.stop()
        RunDir.unlock(fd)


def _outcome(rd: RunDir, code: int, rank0: bool) -> int:
    """Map the trainer's ending onto the worker's exit code, from the status it left."""
    st = rd.status() if rd.status_file.exists() else {}
    state = st.get("state")
    if state == "done":
        return EXIT_DONE
    if state == "failed":
        return EXIT_FAILED
    # Not done, not failed: the trainer stopped on a signal after checkpointing (status pending with
    # `interrupted`, SystemExit 75), or ended otherwise. Either way the run resumes next time.
    if rank0 and not (state == "pending" and st.get("interrupted")):
        rd.set_status("pending", interrupted={"reason": f"trainer ended with code {code} in state {state}"})
    return EXIT_INTERRUPTED


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return execute(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
