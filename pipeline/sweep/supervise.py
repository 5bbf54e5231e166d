"""Start and watch one worker process (:mod:`pipeline.sweep.worker`); used by both launchers.

:class:`Supervisor` watches a worker executing one run (the SLURM launcher, and the local one with
``launcher.runs_per_worker=1``): its output goes to ``<run>/logs/attempt-<n>.log`` and its exit code
says how the run ended. :class:`GroupSupervisor` watches a worker executing several runs one after
another (the local launcher with ``launcher.runs_per_worker`` > 1): the worker writes each run's
output to that run's attempt log itself, its own output (between runs) to
``<runs_dir>/_workers/worker-<time>-<id>.log``, and a report beside it (one JSON line when a run
starts and one when it ends, with that run's exit code), from which the supervisor learns each
run's outcome while the worker lives -- never from the process's exit code alone.

The worker runs in its own session (so a terminal's Ctrl-C reaches only the sweep, which stops its
runs cleanly), logs to ``<run>/logs/attempt-<n>.log``, ignores SIGUSR2 (submitit's warning signal,
which SLURM sends to every process of the job: the task process handles it and forwards SIGUSR1)
and gets SIGTERM if the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so an orphaned
run checkpoints and stops instead of training on unwatched. It starts with SIGTERM/SIGUSR1 blocked
(until it catches them): a stop sent while it imports torch is kept, not fatal. Run status changes
made here (a worker that died before recording anything) go through :mod:`pipeline.lifecycle`.

Waiting uses ``os.waitpid`` directly, never ``Popen.wait``: a signal handler (submitit's
checkpoint) may wait for the same child while the main loop is polling it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pipeline import lifecycle
from pipeline.lifecycle import EXIT_BUSY, EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED
from pipeline.runs import RunDir

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # ask a worker to checkpoint and stop


def next_attempt_log(rd: RunDir) -> Path:
    """``<run>/logs/attempt-<n>.log`` of the attempt about to start (n = attempts so far + 1)."""
    st = rd.status() if rd.status_file.exists() else {}
    return rd.logs / f"attempt-{int(st.get('attempts', 0)) + 1}.log"


def log_header(cmd: Sequence[str]) -> str:
    """The first line of an attempt log (the same for one-run and several-run workers)."""
    return f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n"


def worker_command(run_dir: Path, python: Optional[str] = None) -> List[str]:
    """The worker's command line (one process per run: for several GPUs, pipeline.train.run starts
    the training processes itself, ``train.nproc``)."""
    return [python or sys.executable, "-m", "pipeline.sweep.worker", str(run_dir)]


def group_command(run_dirs: Sequence[Path], report: Path, python: Optional[str] = None) -> List[str]:
    """The command line of a worker executing several runs one after another."""
    return [
        python or sys.executable,
        "-m",
        "pipeline.sweep.worker",
        "--report",
        str(report),
        *[str(p) for p in run_dirs],
    ]


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # blocked until the worker catches them (StopFlag.install): a stop sent during its imports waits
    signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, name) for name in STOP_SIGNALS])
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


class _WorkerProcess:
    """A worker subprocess: environment, start, poll, signals (shared by the two supervisors)."""

    def __init__(self, cmd: List[str], env: Optional[Dict[str, str]] = None, threads: Optional[int] = None) -> None:
        self.cmd = cmd
        self.env = dict(os.environ if env is None else env)
        if threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.env.setdefault(k, str(threads))
        # the child must import this checkout of `pipeline` whatever its cwd
        root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = root + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.proc: Optional[subprocess.Popen] = None
        self.rc: Optional[int] = None
        self.log_path: Optional[Path] = None
        self.started = 0.0

    def _spawn(self, log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        log.write(log_header(self.cmd).encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=str(cwd),
                start_new_session=True,
                preexec_fn=_child_setup,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.started = time.time()

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


def _how(rc: int) -> str:
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"


def run_outcome(rd: RunDir, code: int, log_path: Optional[Path]) -> str:
    """How a run ended, from its exit code (the worker's, or the run's in a several-run worker) and
    the status it left: ``done``, ``failed``, ``interrupted`` or ``busy``. A run left in no
    consistent state (its worker killed before it could record anything: OOM killer, segfault) is
    marked failed with the end of its log."""
    if code == EXIT_BUSY:
        return "busy"
    st = rd.status() if rd.status_file.exists() else {}
    state = st.get("state")
    if state == "done":
        return "done"
    if code == EXIT_INTERRUPTED and state == "pending":
        return "interrupted"
    if state == "failed" and code == EXIT_FAILED:
        return "failed"
    lifecycle.mark_failed(
        rd, f"worker {_how(code)}; log {log_path}: {_tail(log_path) if log_path else ''}", keep_first=False
    )
    return "failed"


class Supervisor(_WorkerProcess):
    """A worker executing one run (``python -m pipeline.sweep.worker <run>``); its output goes to
    ``<run>/logs/attempt-<n>.log``."""

    def __init__(
        self,
        rd: RunDir,
        python: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        threads: Optional[int] = None,
    ) -> None:
        super().__init__(worker_command(rd.path, python), env, threads)
        self.rd = rd

    def start(self) -> "Supervisor":
        self._spawn(next_attempt_log(self.rd), self.rd.path)
        return self

    def finalize(self) -> str:
        """Bookkeeping after the worker ended: ``done``, ``failed``, ``interrupted`` or ``busy``.
        A worker killed before it could record anything (OOM killer, segfault) is marked failed."""
        rc = self.poll()
        assert rc is not None, "finalize() before the worker ended"
        return run_outcome(self.rd, rc, self.log_path)


NOT_STARTED = "not started"


class GroupSupervisor(_WorkerProcess):
    """A worker executing several runs one after another
    (``python -m pipeline.sweep.worker --report <file> RUN [RUN ...]``).

    :meth:`events` (while the worker lives, and after) returns what happened since the last call:
    ``("start", rd, attempt log)`` and ``("end", rd, outcome)``; :meth:`finalize` (after it ended)
    the runs it did not end itself: the one it was executing when it died (failed with the end of
    its log, or done if it finished) and those it never started (``not started``: left untouched;
    when the worker died before starting any run, the first of them is charged with the failure as a
    one-run worker would be, with the end of the worker's log).
    """

    def __init__(
        self,
        rds: Sequence[RunDir],
        python: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        threads: Optional[int] = None,
        log_dir: Optional[Path] = None,
    ) -> None:
        self.rds = list(rds)
        if not self.rds:
            raise ValueError("GroupSupervisor: no runs")
        log_dir = Path(log_dir) if log_dir is not None else self.rds[0].path.resolve().parent / "_workers"
        stem = f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.report_path = log_dir / f"{stem}.jsonl"
        self.worker_log = log_dir / f"{stem}.log"
        super().__init__(group_command([rd.path.resolve() for rd in self.rds], self.report_path, python), env, threads)
        self._by_path = {str(rd.path.resolve()): rd for rd in self.rds}
        self._offset = 0
        self._partial = b""
        self.run_logs: Dict[str, Path] = {}  # run_id -> attempt log, for the runs it started
        self.outcomes: Dict[str, str] = {}  # run_id -> outcome, for the runs that ended
        self.current: Optional[RunDir] = None  # the run executing now (as far as the report says)

    def start(self) -> "GroupSupervisor":
        self.report_path.parent.mkdir(parents=True, exist_ok=True)
        self.report_path.touch()
        self._spawn(self.worker_log, self.report_path.parent)
        return self

    def _read_report(self) -> List[dict]:
        try:
            with open(self.report_path, "rb") as f:
                f.seek(self._offset)
                blob = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(blob)
        blob = self._partial + blob
        lines = blob.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line: read again next time
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def events(self) -> List[Tuple[str, RunDir, object]]:
        """What happened since the last call: ``("start", rd, log path)``, ``("end", rd, outcome)``."""
        out: List[Tuple[str, RunDir, object]] = []
        for ev in self._read_report():
            rd = self._by_path.get(str(ev.get("run")))
            if rd is None:
                continue
            if ev.get("event") == "start":
                self.run_logs[rd.run_id] = Path(ev.get("log", ""))
                self.current = rd
                out.append(("start", rd, self.run_logs[rd.run_id]))
            elif ev.get("event") == "end" and rd.run_id not in self.outcomes:
                outcome = run_outcome(rd, int(ev.get("code", EXIT_FAILED)), self.run_logs.get(rd.run_id))
                self.outcomes[rd.run_id] = outcome
                if self.current is not None and self.current.run_id == rd.run_id:
                    self.current = None
                out.append(("end", rd, outcome))
        return out

    @property
    def started_any(self) -> bool:
        return bool(self.run_logs) or any(o == "busy" for o in self.outcomes.values())

    def finalize(self) -> List[Tuple[str, RunDir, object]]:
        """After the worker ended: the remaining events, then an ``end`` for every run that has no
        outcome yet (see the class docstring). Every run of the group has an outcome afterwards."""
        rc = self.poll()
        assert rc is not None, "finalize() before the worker ended"
        out = self.events()
        broken = not self.started_any and rc != EXIT_INTERRUPTED
        for rd in self.rds:
            if rd.run_id in self.outcomes:
                continue
            if rd.run_id in self.run_logs:  # executing when the worker died
                outcome = run_outcome(rd, rc if rc != EXIT_DONE else EXIT_FAILED, self.run_logs[rd.run_id])
            elif broken:  # the worker died before its first run: charge that run, as a one-run worker
                lifecycle.mark_failed(
                    rd,
                    f"worker {_how(rc)} before starting its first run; log {self.worker_log}: {_tail(self.worker_log)}",
                    keep_first=False,
                )
                outcome, broken = "failed", False
            else:
                outcome = NOT_STARTED
            self.outcomes[rd.run_id] = outcome
            out.append(("end", rd, outcome))
        self.current = None
        return out


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
    if outcome == NOT_STARTED:
        return "not started (its worker stopped first): left as it was; the next sweep launches it"
    return "interrupted: checkpointed; resumes on the next sweep"


def outcome_counts(outcomes: Sequence[str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for o in outcomes:
        out[o] = out.get(o, 0) + 1
    return out
