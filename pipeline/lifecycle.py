"""A run's lifecycle: the one module that writes a run's ``status.json``.

States (``status.json``'s ``state``, :data:`pipeline.runs.STATES`) and who asks for each change::

    (no status) --prepared---------------------> pending      sweep planner: mark_prepared
    pending     --queued (SLURM job id)--------> pending      SLURM launcher: mark_queued
    pending     --execute: running-------------> running      the process holding the run's lock
    running     --execute: training returned---> done         (execute; mark_done for a run whose
    running     --execute: Preempted-----------> pending        training had finished but whose
                  (+ interrupted: signal, step, checkpoint)     status was never set)
    running     --execute: any other error-----> failed       (+ error: message and traceback)
    running     --process gone, no lock--------> failed       sweep planner: mark_stale
    any         --worker died silently---------> failed       supervisor / sweep worker: mark_failed
    any         --ended without a state--------> pending      sweep worker: mark_interrupted
    corrupt     (status.json not valid JSON)     never changed: readers report it (pipeline.runs.CORRUPT),
                                                 execute refuses it (CorruptStatus), watchers leave it

Only the process that holds the run's execution lock (``<run>/.lock``, :func:`hold`) executes it,
and :func:`execute` -- mark running, call the training function (which returns the training
summary or raises), mark done / pending / failed -- is the one place where an attempt's status is
set. The other transitions come from processes that watch runs (planner, supervisor, SLURM
launcher) and never train; they happen only when no process executes the run (queued, stale, or
its worker dead).

Which process owns a run is decided by the lock, not by the environment: :func:`hold` is reentrant
within a process (the sweep worker takes the lock, then :func:`pipeline.train.run` executes under
it), and a training rank started by :func:`pipeline.train.run` (which holds the lock) finds it
taken and leaves the status to its parent (:mod:`pipeline.trainer.rank`).

Also here, because every layer needs them without importing the trainer (torch): the exit codes
(:data:`EXIT_DONE`, :data:`EXIT_FAILED`, :data:`EXIT_INTERRUPTED` = :data:`PREEMPTED_EXIT_CODE`,
:data:`EXIT_BUSY`), :class:`Preempted` and :func:`error_text`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

from pipeline.runs import CORRUPT, RunDir, now_iso

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" (a checkpoint was saved; requeue and resume)

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = PREEMPTED_EXIT_CODE  # checkpointed on a signal and stopped: resumable
EXIT_BUSY = 79  # another process executes this run (its lock is held): nothing was done


class Preempted(SystemExit):
    """Training stopped at a step boundary on request (signal or callback), after a checkpoint."""

    def __init__(self, step: int, reason: str, checkpoint: Optional[str]):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.reason, self.checkpoint = step, reason, checkpoint

    def __str__(self) -> str:
        return (
            f"training stopped by {self.reason} at step {self.step} (checkpoint {self.checkpoint}); "
            f"exit code {PREEMPTED_EXIT_CODE}: requeue to resume"
        )

    def info(self) -> Dict[str, Any]:
        """What ``status.json``'s ``interrupted`` records (also rank 0's ``logs/preempted.json``)."""
        return {
            "reason": self.reason,
            "step": self.step,
            "checkpoint": self.checkpoint,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


class RunBusy(RuntimeError):
    """Another process holds the run's execution lock (it is executing the run)."""


def error_text(exc: BaseException, lines: int = 25) -> str:
    """The error as ``status.json`` records it: the message, then the end of the traceback."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).rstrip().splitlines()[-lines:]
    return f"{type(exc).__name__}: {exc}\n" + "\n".join(tail)


# ------------------------------------------------------------------------------------------------
# the execution lock (reentrant within a process)
# ------------------------------------------------------------------------------------------------
_HELD: Dict[str, int] = {}  # run folder -> lock file descriptor, for the runs this process holds
_DEPTH: Dict[str, int] = {}  # run folder -> how many acquire() calls are not released yet


def _key(rd: RunDir) -> str:
    return str(Path(rd.path).resolve())


def acquire(rd: RunDir) -> bool:
    """Take the run's lock for this process (again, if it holds it already); False when another
    process holds it. Every True must be matched by one :func:`release`."""
    key = _key(rd)
    if key not in _HELD:
        fd = rd.try_lock()
        if fd is None:
            return False
        _HELD[key] = fd
    _DEPTH[key] = _DEPTH.get(key, 0) + 1
    return True


def release(rd: RunDir) -> None:
    key = _key(rd)
    if key not in _HELD:
        return
    _DEPTH[key] -= 1
    if _DEPTH[key] <= 0:
        _DEPTH.pop(key)
        RunDir.unlock(_HELD.pop(key))


def holds(rd: RunDir) -> bool:
    """Whether this process holds the run's lock."""
    return _key(rd) in _HELD


@contextlib.contextmanager
def hold(rd: RunDir) -> Iterator[RunDir]:
    """Hold the run's lock for the block (reentrant); :class:`RunBusy` when another process has it."""
    if not acquire(rd):
        try:
            who = rd.lock_file.read_text(encoding="utf-8").strip()
        except OSError:
            who = "?"
        raise RunBusy(
            f"run {rd.run_id} is being executed by another process ({who}, holding "
            f"{rd.lock_file}); not starting it twice"
        )
    try:
        yield rd
    finally:
        release(rd)


# ------------------------------------------------------------------------------------------------
# executing an attempt (the lock holder)
# ------------------------------------------------------------------------------------------------
def execute(rd: RunDir, work: Callable[[], Mapping[str, Any]]) -> Mapping[str, Any]:
    """One attempt: hold the lock, mark ``running``, call ``work()`` (trains; returns the training
    summary or raises), then mark ``done``; on :class:`Preempted` mark ``pending`` with
    ``interrupted``, on any other exception ``failed`` with the error; exceptions are re-raised."""
    with hold(rd):
        rd.set_status("running")
        try:
            summary = work()
        except Preempted as e:
            rd.set_status("pending", interrupted=e.info())
            raise
        except BaseException as e:
            rd.set_status("failed", error=error_text(e))
            raise
        mark_done(rd, summary)
        return summary


def mark_done(rd: RunDir, summary: Mapping[str, Any]) -> None:
    """Training finished: ``done`` with the final model's folder, steps and final loss."""
    rd.set_status("done", final=str(rd.final), steps=summary.get("steps"), final_loss=summary.get("final_loss"))


# ------------------------------------------------------------------------------------------------
# transitions asked for by the processes that watch runs (no process executes the run)
# ------------------------------------------------------------------------------------------------
def mark_prepared(rd: RunDir) -> None:
    """A run folder the sweep just prepared gets ``pending`` (only when it has no status yet)."""
    if not rd.status_file.exists():
        rd.set_status("pending")


def mark_queued(rd: RunDir, slurm_job_id: str, submitit_folder: str) -> None:
    """Submitted to SLURM: ``pending`` with its job (a later sweep sees it queued)."""
    rd.set_status("pending", slurm_job_id=str(slurm_job_id), submitted=now_iso(), submitit_folder=str(submitit_folder))


def mark_stale(rd: RunDir, status: Mapping[str, Any]) -> None:
    """Status ``running`` but the process is gone (no lock, no live pid or job): a failed attempt."""
    hb = rd.heartbeat() or {}
    where = f"host {status.get('host')}, pid {status.get('pid')}" + (
        f", SLURM job {status['slurm_job_id']}" if status.get("slurm_job_id") else ""
    )
    rd.set_status(
        "failed",
        error=f"stale: status was running ({where}) but the process is gone; last heartbeat {hb.get('iso', 'never')}",
        stale=True,
    )


def mark_failed(rd: RunDir, error: str, keep_first: bool = True) -> None:
    """Failed outside :func:`execute` (bad launch config, a worker killed before it recorded
    anything). With ``keep_first`` a run already ``failed`` keeps its error (the attempt is counted
    once); the supervisor passes False for a worker that died after the run's status was written."""
    st = rd.status() if rd.status_file.exists() else {}
    if st.get("state") == CORRUPT:  # its state is unknown: reported by readers, never overwritten
        log.warning("%s; not marking it failed (%s)", st["error"], error.splitlines()[0] if error else "")
    elif not keep_first or st.get("state") != "failed":
        rd.set_status("failed", error=error)


def mark_interrupted(rd: RunDir, reason: str) -> None:
    """An attempt that ended neither done, failed nor checkpointed-and-pending: ``pending`` (it
    resumes next time), with ``reason``; a run already pending with ``interrupted`` is left as is."""
    st = rd.status() if rd.status_file.exists() else {}
    if st.get("state") == CORRUPT:
        log.warning("%s; not marking it interrupted (%s)", st["error"], reason)
    elif not (st.get("state") == "pending" and st.get("interrupted")):
        rd.set_status("pending", interrupted={"reason": reason})
