"""Execute runs of a sweep: ``python -m pipeline.sweep.worker [--report FILE] RUN [RUN ...]``.

The launchers (local subprocesses, SLURM array tasks) start this process; it is a thin driver. For
each run folder given, in order:

1. takes the run's execution lock (``<run>/.lock``, :func:`pipeline.lifecycle.acquire`); if another
   process holds it, the run is skipped (:data:`EXIT_BUSY`) without touching anything (two sweeps
   never train one run twice);
2. rewrites ``<run>/heartbeat.json`` every ``launcher.heartbeat_s`` seconds from a thread;
3. loads the resolved config the sweep wrote (``<run>/launch.yaml``, :meth:`RunDir.load_config`;
   Hydra does not run here) and calls :func:`pipeline.train.run` ``(cfg, variant)``, which resumes
   from the latest checkpoint, executes the attempt under the lock this worker holds (status
   running, done, failed with the error: :func:`pipeline.lifecycle.execute`) and checkpoints on
   SIGTERM/SIGUSR1;
4. maps the ending onto :data:`EXIT_DONE` (status done), :data:`EXIT_INTERRUPTED` (checkpointed on a
   signal and stopped: resumable) or :data:`EXIT_FAILED` (status failed, the error recorded). A
   failure before the attempt starts (an invalid ``launch.yaml``) is recorded through
   :func:`pipeline.lifecycle.mark_failed`.

One run (how the SLURM launcher and ``launcher.runs_per_worker=1`` use it): the process's exit code
is that run's code, and its output goes wherever the caller sent it (the supervisor's
``<run>/logs/attempt-<n>.log``).

Several runs (``launcher.runs_per_worker`` > 1, so the start-up cost -- torch, transformers --
is paid once per worker, not per run): the runs execute one after another in this process. While a
run executes, file descriptors 1 and 2 (and so Python's stdout/stderr, logging, tqdm and any child
process) point at that run's own ``<run>/logs/attempt-<n>.log`` (``n`` = its attempts + 1, as the
supervisor numbers them), with the same header line as a one-run attempt; between runs they point
back at the worker's own output. A failed run is recorded failed and the next one starts. A
SIGTERM/SIGUSR1 stops the worker: the current run checkpoints and stops as it would alone
(resumable), the runs not started yet are left untouched, and the worker exits
:data:`EXIT_INTERRUPTED`. Otherwise the exit code is :data:`EXIT_DONE` when every run is done, else
:data:`EXIT_FAILED`; callers must read each run's status (or the report) rather than the code alone.

``--report FILE`` (JSON lines, appended and flushed as they happen) tells the supervisor what
happened to each run: ``{"event": "start", "run": <folder>, "log": <attempt log>}`` when the run's
lock is taken, and ``{"event": "end", "run": <folder>, "code": <exit code of that run>}`` when it
ends (code :data:`EXIT_BUSY` without a start line for a busy run). A run with a start and no end
line was executing when the worker died; a run with neither was not started.

Stop signals: SIGTERM/SIGUSR1 are caught for the whole life of the worker (not only while the
trainer's step loop runs): a signal that arrives while a run loads its model or data makes the
trainer stop at its first step boundary (:class:`StopOnRequest`; single-process runs) instead of
killing the process mid-load; one that arrives between runs stops the worker before the next run.
The supervisor starts the worker with both signals blocked (:mod:`pipeline.sweep.supervise`), so one
sent while Python imports torch stays pending until :meth:`StopFlag.install` unblocks it.

Multi-GPU runs: :func:`pipeline.train.run` itself starts ``train.nproc`` training processes
(torchrun/accelerate) and forwards SIGTERM/SIGUSR1 to them; this worker is one process.
(Should it ever run under torchrun, only global rank 0 takes the lock and writes the heartbeat.)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pipeline import lifecycle
from pipeline.lifecycle import EXIT_BUSY, EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED
from pipeline.runs import RunDir, slurm_job_id_from_env
from pipeline.sweep.supervise import STOP_SIGNALS, log_header, next_attempt_log
from pipeline.train import resolve_nproc
from pipeline.train import run as train_run
from pipeline.trainer.loop import TrainerCallback

__all__ = [
    "EXIT_BUSY",
    "EXIT_DONE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "StopFlag",
    "StopOnRequest",
    "execute",
    "execute_many",
    "main",
]

log = logging.getLogger("pipeline.sweep.worker")


def load_launch(rd: RunDir) -> Dict[str, Any]:
    try:
        return json.loads(rd.launch_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{rd.launch_json}: missing (the sweep writes it before launching a run)")


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


class StopFlag:
    """SIGTERM/SIGUSR1 for the whole worker: remembers the request (the trainer installs its own
    handlers while its step loop runs, and restores these afterwards)."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:  # os.write: a buffered print could re-enter one in progress
            try:
                os.write(
                    2, f"[worker] {name} received: stopping (a running run checkpoints at its next step)\n".encode()
                )
            except OSError:
                pass
        self.reason = name

    def install(self) -> "StopFlag":
        """Catch the stop signals, then unblock them (the supervisor starts the worker with them
        blocked: one sent earlier is delivered now)."""
        if threading.current_thread() is threading.main_thread():
            sigs = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
            for sig in sigs:
                self._old[sig] = signal.signal(sig, self._on_signal)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
        return self

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.reason is not None


class StopOnRequest(TrainerCallback):
    """Turns a stop request received outside the step loop (while the model or data load) into the
    trainer's own stop at its next step boundary."""

    def __init__(self, stop: StopFlag) -> None:
        self.stop = stop

    def on_train_begin(self, trainer, start_step):
        if self.stop.requested:
            trainer.request_stop(str(self.stop.reason))

    def on_step_end(self, trainer, step, row):
        return self.stop.requested


def stop_callbacks(cfg: Any, stop: StopFlag) -> List[TrainerCallback]:
    """:class:`StopOnRequest` for a run trained in this process (``train.nproc`` = 1: callbacks need
    it); none for a multi-process run (pipeline.train forwards the signals to its ranks)."""
    try:
        if resolve_nproc(cfg.train) != 1:
            return []
    except Exception:  # noqa: BLE001 - train.run reports the bad setting itself
        return []
    return [StopOnRequest(stop)]


def _execute_one(rd: RunDir, stop: Optional[StopFlag] = None, on_locked=None) -> int:
    """One run (steps 1-4 of the module docstring); returns its exit code. ``on_locked(rd)`` is
    called once the lock is held, before anything else (the multi-run worker redirects its output)."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and not lifecycle.acquire(rd):
        print(f"[worker] {rd.path}: another process holds {rd.lock_file}; not starting", flush=True)
        return EXIT_BUSY
    hb = None
    try:
        if on_locked is not None:
            on_locked(rd)
        launch = load_launch(rd)
        if rank0:
            hb = Heartbeat(
                rd, float(launch.get("heartbeat_s", 30.0)), run_id=rd.run_id, slurm_job_id=slurm_job_id_from_env()
            ).start()
        try:
            cfg = rd.load_config()
        except Exception as e:  # noqa: BLE001 - recorded in status.json, then re-raised
            if rank0:
                lifecycle.mark_failed(rd, f"{type(e).__name__}: {e}")
            raise
        variant = launch.get("variant", "none")
        try:
            train_run(cfg, variant, callbacks=stop_callbacks(cfg, stop) if stop is not None else [])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            return _outcome(rd, code, rank0)
        except BaseException as e:  # noqa: BLE001
            if rank0:
                lifecycle.mark_failed(rd, f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return EXIT_FAILED
        return _outcome(rd, 0, rank0)
    finally:
        if hb is not None:
            hb.stop()
        if rank0:
            lifecycle.release(rd)


def execute(run_dir: Path, stop: Optional[StopFlag] = None) -> int:
    """Execute one run in this process; its exit code (output goes to the caller's stdout/stderr)."""
    own = stop is None
    stop = StopFlag().install() if own else stop
    try:
        if stop.requested:
            print(f"[worker] {stop.reason} before the run started: not starting {run_dir}", flush=True)
            return EXIT_INTERRUPTED
        return _execute_one(RunDir(Path(run_dir)), stop)
    finally:
        if own:
            stop.restore()


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
    if rank0:
        lifecycle.mark_interrupted(rd, f"trainer ended with code {code} in state {state}")
    return EXIT_INTERRUPTED


class _Output:
    """Points fds 1 and 2 at a run's attempt log, and back at the worker's own output."""

    def __init__(self) -> None:
        self._saved = (os.dup(1), os.dup(2))

    @staticmethod
    def _flush() -> None:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass

    def to_file(self, path: Path, header: str) -> None:
        self._flush()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, header.encode())
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    def restore(self) -> None:
        self._flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)

    def close(self) -> None:
        for fd in self._saved:
            os.close(fd)


class _Report:
    """The JSON-lines report (``--report``); nothing when no file was given."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path

    def write(self, **event: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({**event, "time": time.time()}, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def execute_many(
    run_dirs: Sequence[Path],
    report: Optional[Path] = None,
    cmd: Optional[Sequence[str]] = None,
    stop: Optional[StopFlag] = None,
) -> int:
    """Execute several runs one after another in this process (see the module docstring); returns
    :data:`EXIT_INTERRUPTED` when stopped by a signal, else :data:`EXIT_DONE` if every run is done,
    else :data:`EXIT_FAILED`."""
    own = stop is None
    stop = StopFlag().install() if own else stop
    out = _Output()
    rep = _Report(report)
    cmd = list(cmd or [sys.executable, "-m", "pipeline.sweep.worker", *map(str, run_dirs)])
    codes: List[int] = []
    cwd = os.getcwd()
    try:
        for i, run_dir in enumerate(run_dirs):
            rd = RunDir(Path(run_dir))
            if stop.requested:
                print(
                    f"[worker] stopped ({stop.reason}): {len(run_dirs) - i} run(s) not started, left as they were",
                    flush=True,
                )
                return EXIT_INTERRUPTED
            print(f"[worker] run {i + 1}/{len(run_dirs)}: {rd.path}", flush=True)

            def on_locked(rd: RunDir) -> None:
                path = next_attempt_log(rd)
                rep.write(event="start", run=str(rd.path), log=str(path))
                out.to_file(path, log_header(cmd))
                os.chdir(rd.path)  # as a one-run worker, which starts in its run folder

            try:
                code = _execute_one(rd, stop, on_locked)
            except BaseException as e:  # noqa: BLE001 - e.g. launch.yaml unreadable: recorded, go on
                traceback.print_exc()
                if isinstance(e, KeyboardInterrupt):
                    raise
                code = EXIT_FAILED
                lifecycle.mark_failed(rd, f"{type(e).__name__}: {e}")
            finally:
                out.restore()
                os.chdir(cwd)
            gc.collect()  # the run's model and data go before the next run loads its own
            rep.write(event="end", run=str(rd.path), code=code)
            codes.append(code)
            print(f"[worker] {rd.path.name}: exit code {code}", flush=True)
            if code == EXIT_INTERRUPTED:  # the trainer stopped on a signal it caught itself
                stop.reason = stop.reason or "the run was interrupted"
        if stop.requested and len(codes) < len(run_dirs):
            return EXIT_INTERRUPTED
        if codes and codes[-1] == EXIT_INTERRUPTED:
            return EXIT_INTERRUPTED
        return EXIT_DONE if all(c == EXIT_DONE for c in codes) else EXIT_FAILED
    finally:
        out.close()
        if own:
            stop.restore()


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    stop = StopFlag().install()  # before the heavy imports: a stop signal is never lost
    try:
        ap = argparse.ArgumentParser(prog="python -m pipeline.sweep.worker", add_help=False)
        ap.add_argument("--report", type=Path, default=None)
        ap.add_argument("runs", nargs="+", type=Path)
        args = ap.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if len(args.runs) == 1 and args.report is None:
            return execute(args.runs[0], stop)
        return execute_many(args.runs, args.report, [sys.executable, "-m", "pipeline.sweep.worker", *argv], stop)
    finally:
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
