"""The sweep's view of the run store: each run's effective state, what to do with it, the table.

Pure parts (unit-tested without processes): :func:`classify` turns a run's status.json plus liveness
facts into its effective state; :func:`decide` turns that into an action; :func:`format_table`.
:func:`liveness` gathers the facts (lock, pid, heartbeat; SLURM job states are passed in).

Effective states:

- ``done``: status done.
- ``running``: status running and the process is alive (lock held or pid alive on this host, the
  SLURM job running, or a fresh heartbeat where nothing else can be checked).
- ``queued``: status pending with a submitted SLURM job that is still pending or running.
- ``stale``: status running but the process is gone (crash, node failure, killed job): relaunched,
  counted as a failed attempt.
- ``interrupted``: the run checkpointed on a signal and stopped (preemption, time limit, Ctrl-C):
  resumed, not counted as a failure.
- ``failed``: status failed (the error is kept): retried while failures <= launcher.max_retries.
- ``pending``: never started.
- ``corrupt``: status.json is not valid JSON (:data:`pipeline.runs.CORRUPT`): its state is
  unknown, so the sweep reports it (with the file's path) and leaves it alone; the other runs go on.

Sweep manifests (``<runs_dir>/_sweeps/<experiment>.json``) list the run ids of a grid so that
``make status`` shows the grid (also its runs not started yet) from the store alone, without
composing configs.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from pipeline.runs import CORRUPT, RunDir, atomic_write_json, list_runs

SWEEPS_SUBDIR = "_sweeps"
EFFECTIVE_STATES = ("done", "running", "queued", "interrupted", "stale", "failed", "pending", CORRUPT)
# sacct/squeue states in which a job may still run (anything else: it ended).
SLURM_ALIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "COMPLETING",
    "CONFIGURING",
    "STAGE_OUT",
    "SIGNALING",
    "RESV_DEL_HOLD",
}


@dataclass(frozen=True)
class Liveness:
    """What can be known about the process of a run (None: cannot be checked from here)."""

    lock_held: Optional[bool] = None  # the worker's flock (same host / shared lock-capable FS)
    pid_alive: Optional[bool] = None  # status.json's pid, when it ran on this host
    slurm_alive: Optional[bool] = None  # the run's SLURM job (sacct), when it has one
    heartbeat_age: Optional[float] = None  # seconds since heartbeat.json was written


def classify(status: Mapping[str, Any], live: Liveness, stale_after_s: float) -> str:
    """The effective state of a run (see the module docstring)."""
    state = status.get("state", "pending")
    if state == "done":
        return "done"
    if state == "failed":
        return "failed"
    if state == CORRUPT:
        return CORRUPT
    if state == "pending":
        if status.get("slurm_job_id") and live.slurm_alive:
            return "queued"
        if live.lock_held:  # a worker took the run but the trainer has not started yet
            return "running"
        return "interrupted" if status.get("interrupted") else "pending"
    if state == "running":
        if live.lock_held or live.pid_alive or live.slurm_alive:
            return "running"
        if live.lock_held is False and live.pid_alive is False:
            return "stale"  # checked on the host it ran on: nothing holds it
        if live.slurm_alive is False:
            return "stale"  # its job ended (sacct)
        if live.heartbeat_age is not None:
            return "stale" if live.heartbeat_age > stale_after_s else "running"
        return "running"  # nothing to go on: assume alive (never start a second copy blindly)
    raise ValueError(f"unknown run state {state!r} in status.json")


def decide(effective: str, failures: int, max_retries: int) -> str:
    """What the sweep does with a run: ``skip`` (done), ``wait`` (running/queued), ``launch``
    (never started), ``resume`` (interrupted, or stale with retries left), ``retry`` (failed,
    ``failures <= max_retries``), ``give_up`` (no retries left: ``max_retries`` relaunches after
    the first failure have been used) or ``report`` (corrupt status: reported, never launched).
    A stale run is about to be recorded as one more failure."""
    if effective == "done":
        return "skip"
    if effective == CORRUPT:
        return "report"
    if effective in ("running", "queued"):
        return "wait"
    if effective == "pending":
        return "launch"
    if effective == "interrupted":
        return "resume"
    if effective == "stale":
        # marked failed first (a failed attempt), then relaunched if retries remain
        return "resume" if failures + 1 <= max_retries else "give_up"
    if effective == "failed":
        return "retry" if failures <= max_retries else "give_up"
    raise ValueError(f"unknown effective state {effective!r}")


def liveness(
    rd: RunDir, status: Mapping[str, Any], slurm_states: Optional[Mapping[str, str]] = None, now: Optional[float] = None
) -> Liveness:
    """Gather the liveness facts of a run (cheap: a flock probe, a kill(pid, 0), a small file)."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    hb = rd.heartbeat()
    ran_here = status.get("host") == host or (hb is not None and hb.get("host") == host)
    lock_held = rd.lock_held() if (ran_here or status.get("state") == "pending") else None
    pid_alive = None
    if status.get("host") == host and status.get("pid"):
        pid_alive = _pid_alive(int(status["pid"]))
    slurm_alive = None
    job = status.get("slurm_job_id")
    if job and slurm_states is not None and str(job) in slurm_states:
        slurm_alive = slurm_states[str(job)].split()[0].rstrip("+") in SLURM_ALIVE
    age = None
    if hb is not None and "time" in hb:
        age = max(0.0, now - float(hb["time"]))
    return Liveness(lock_held, pid_alive, slurm_alive, age)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------
# rows and the table
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    run_id: str
    model: str = "?"
    dataset: str = "?"
    plw: Optional[float] = None
    variant: str = "none"
    seed: Optional[int] = None
    state: str = "pending"
    attempts: int = 0
    failures: int = 0
    step: Optional[int] = None
    total: Optional[int] = None
    loss: Optional[float] = None
    error: str = ""
    job: str = ""
    gpu_hours: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def row_of(
    rd: RunDir, effective: str, info: Optional[Mapping[str, Any]] = None, status: Optional[Mapping[str, Any]] = None
) -> Row:
    info = rd.info() if info is None else info
    status = (rd.status() if rd.status_file.exists() else {}) if status is None else status
    prog = rd.progress() if rd.metrics.exists() or status else {"step": None, "total": None, "loss": None}
    return Row(
        run_id=rd.run_id,
        model=info.get("model", "?"),
        dataset=info.get("dataset", "?"),
        plw=info.get("plw"),
        variant=info.get("variant", "none"),
        seed=info.get("seed"),
        state=effective,
        attempts=int(status.get("attempts", 0)),
        failures=int(status.get("failures", 0)),
        step=prog["step"],
        total=prog["total"],
        loss=prog["loss"],
        error=str(status.get("error") or ""),
        job=str(status.get("slurm_job_id") or ""),
    )


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def format_table(rows: Sequence[Row], show_cost: bool = False, error_width: int = 100) -> str:
    """The grid as a text table, one row per run, then the counts per state."""
    from tabulate import tabulate

    headers = ["model", "dataset", "plw", "variant", "seed", "state", "progress", "loss", "tries", "job"]
    if show_cost:
        headers.append("GPU-h")
    headers += ["run_id", "last error"]
    body = []
    for r in rows:
        prog = ""
        if r.step is not None:
            prog = f"{r.step}/{r.total}" if r.total else f"{r.step}"
        elif r.state == "done":
            prog = "100%"
        line = [
            r.model,
            r.dataset,
            "" if r.plw is None else f"{r.plw:g}",
            r.variant,
            "" if r.seed is None else r.seed,
            r.state,
            prog,
            "" if r.loss is None else f"{r.loss:.4f}",
            f"{r.attempts}" + (f" ({r.failures} failed)" if r.failures else ""),
            r.job,
        ]
        if show_cost:
            line.append("?" if r.gpu_hours is None else f"{r.gpu_hours:.3g}")
        line += [r.run_id, _short(r.error, error_width)]
        body.append(line)
    table = tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)
    return table + "\n" + counts_line(rows)


def counts_line(rows: Iterable[Row]) -> str:
    rows = list(rows)
    counts = {s: sum(1 for r in rows if r.state == s) for s in EFFECTIVE_STATES}
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return f"{len(rows)} runs: " + (", ".join(parts) if parts else "none")


# ------------------------------------------------------------------------------------------------
# manifests (the runs of a grid, for `make status`)
# ------------------------------------------------------------------------------------------------
def manifest_path(runs_dir: Path, experiment: str) -> Path:
    return Path(runs_dir) / SWEEPS_SUBDIR / f"{experiment}.json"


def write_manifest(
    runs_dir: Path, experiment: str, runs: Sequence[Mapping[str, Any]], overrides: Sequence[str]
) -> Path:
    """``runs``: ``{run_id, model, dataset, plw, variant, seed, gpu_hours}`` per grid point."""
    path = manifest_path(runs_dir, experiment)
    atomic_write_json(
        path,
        {
            "experiment": experiment,
            "overrides": list(overrides),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "runs": list(runs),
        },
    )
    return path


def read_manifest(runs_dir: Path, experiment: str) -> Optional[Dict[str, Any]]:
    path = manifest_path(runs_dir, experiment)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it and re-run `make sweep`") from e


def store_rows(
    runs_dir: Path,
    experiment: Optional[str] = None,
    slurm_states: Optional[Mapping[str, str]] = None,
    stale_after_s: float = 600.0,
) -> List[Row]:
    """Rows for ``make status``: the runs of the experiment's manifest (all runs in the store when
    ``experiment`` is None), with effective states. Reads only the store."""
    runs_dir = Path(runs_dir)
    if experiment is not None:
        man = read_manifest(runs_dir, experiment)
        if man is None:
            raise FileNotFoundError(
                f"no sweep manifest {manifest_path(runs_dir, experiment)}: run `make sweep EXPERIMENT="
                f"{experiment}` first, or check paths.runs_dir / PLW_RUNS_DIR"
            )
        entries = man["runs"]
        dirs = [RunDir(runs_dir / e["run_id"]) for e in entries]
    else:
        dirs = list_runs(runs_dir)
        entries = [None] * len(dirs)
    rows = []
    for rd, entry in zip(dirs, entries):
        status = rd.status() if rd.status_file.exists() else {"state": "pending", "attempts": 0}
        eff = classify(status, liveness(rd, status, slurm_states), stale_after_s)
        info = rd.info() or ({k: entry.get(k) for k in ("model", "dataset", "plw", "variant", "seed")} if entry else {})
        row = row_of(rd, eff, info, status if rd.status_file.exists() else {})
        if entry and entry.get("gpu_hours") is not None:
            row.gpu_hours = entry["gpu_hours"]
        rows.append(row)
    return rows
