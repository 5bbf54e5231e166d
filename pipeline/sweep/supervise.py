"""Start and watch one worker process (:mod:`pipeline.sweep.worker`); used by both launchers.

The worker runs in its own session (so a terminal's Ctrl-C reaches only the sweep, which stops its
runs cleanly), logs to ``<run>/logs/attempt-<n>.log``, ignores SIGUSR2 (submitit's warning signal,
which SLURM sends to every process of the job: the task process handles it and forwards SIGUSR1)
and gets SIGTERM if the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so an orphaned
run checkpoints and stops instead of training on unwatched.

Waiting uses ``os.waitpid`` directly, never ``Popen.wait``: a signal handler (submitit's
checkpoint) may wait for the same child while the main loop is polling it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pipeline.runs import RunDir
from pipeline.sweep.worker import EXIT_BUSY, EXIT_FAILED, EXIT_INTERRUPTED

_PR_SET_PDEATHSIG = 1


def worker_command(run_dir: Path, python: Optional[str] = None) -> List[str]:
    """The worker's command line (one process per run: for several GPUs, pipeline.train.run starts
    the training processes itself, ``train.nproc``)."""
    return [python or sys.executable, "-m", "pipeline.sweep.worker", str(run_dir)]


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux: no parent-death signal
        pass


def _tail(path: Path, n: int = 3, width: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-width:]


class Supervisor:
    def __init__(self, rd: RunDir, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, threads: Optional[int] = None) -> None:
        self.rd = rd
        self.cmd = worker_command(rd.path, python)
        self.env = dict(os.environ if env is None else env)
        if threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.env.setdefault(k, str(threads))
        # the child must import this checkout of `pipeline` whatever its cwd
        root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = root + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.proc: Optional[subprocess.Popen] = None
        self.rc: Optional[int] = None
        self.log_path: Optional[Path] = None
        self.started = 0.0

    def start(self) -> "Supervisor":
        st = self.rd.status() if self.rd.status_file.exists() else {}
        self.rd.logs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.rd.logs / f"attempt-{int(st.get('attempts', 0)) + 1}.log"
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log = open(self.log_path, "ab")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=str(self.rd.path), start_new_session=True,
                                         preexec_fn=_child_setup, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self.started = time.time()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> Optional[int]:
        """The exit code (negative: killed by that signal), or None while it runs."""
        if self.rc is not None or self.proc is None:
            return self.rc
        try:
            pid, sts = os.waitpid(self.proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere
            self.rc = self.proc.returncode if self.proc.returncode is not None else EXIT_FAILED
            return self.rc
        if pid == 0:
            return None
        self.rc = os.waitstatus_to_exitcode(sts)
        self.proc.returncode = self.rc
        return self.rc

    def wait(self, timeout: Optional[float] = None, step: float = 0.2) -> Optional[int]:
        end = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if end is not None and time.time() >= end:
                return None
            time.sleep(step)
        return self.rc

    def send(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (the worker and, under torchrun, its ranks)."""
        if self.proc is None or self.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 120.0) -> Optional[int]:
        """Ask the run to checkpoint and stop; SIGKILL after ``grace_s``."""
        self.send(sig)
        rc = self.wait(grace_s)
        if rc is None:
            self.send(signal.SIGKILL)
            rc = self.wait(10)
        return rc

    def finalize(self) -> str:
        """Bookkeeping after the worker ended: ``done``, ``failed``, ``interrupted`` or ``busy``.
        A worker killed before it could record anything (OOM killer, segfault) is marked failed."""
        rc = self.poll()
        assert rc is not None, "finalize() before the worker ended"
        if rc == EXIT_BUSY:
            return "busy"
        st = self.rd.status() if self.rd.status_file.exists() else {}
        state = st.get("state")
        if state == "done":
            return "done"
        if rc == EXIT_INTERRUPTED and state == "pending":
            return "interrupted"
        if state == "failed" and rc == EXIT_FAILED:
            return "failed"
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        self.rd.set_status("failed", error=f"worker {how}; log {self.log_path}: {_tail(self.log_path)}")
        return "failed"


def describe(outcome: str, rd: RunDir) -> str:
    st = rd.status() if rd.status_file.exists() else {}
    if outcome == "failed":
        return f"failed: {' '.join(str(st.get('error', '')).split())[:300]}"
    if outcome == "done":
        prog = rd.progress()
        loss = f", loss {prog['loss']:.4f}" if prog.get("loss") is not None else ""
        return f"done ({prog.get('step')} steps{loss})"
    if outcome == "busy":
        return "skipped: another process is executing it"
    return "interrupted: checkpointed; resumes on the next sweep"


def outcome_counts(outcomes: Sequence[str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for o in outcomes:
        out[o] = out.get(o, 0) + 1
    return out
