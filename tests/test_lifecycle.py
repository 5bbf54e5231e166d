"""pipeline.lifecycle: the one writer of a run's status; the lock decides who executes a run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import lifecycle
from pipeline.lifecycle import Preempted, RunBusy
from pipeline.runs import RunDir

REPO = Path(__file__).resolve().parent.parent


def _hold_in_child(rd: RunDir) -> subprocess.Popen:
    code = (
        f"import pathlib, sys, time; from pipeline.runs import RunDir\n"
        f"fd = RunDir(pathlib.Path({str(rd.path)!r})).try_lock(); print('held' if fd else 'busy', flush=True)\n"
        f"time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_module_writes_run_status():
    """The acceptance check of the issue: ``set_status`` is called in pipeline/lifecycle.py only
    (and defined in pipeline/runs.py)."""
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bset_status\(", line):
                found.append((path.relative_to(REPO).as_posix(), line.strip()))
    assert {p for p, _ in found} == {"pipeline/lifecycle.py", "pipeline/runs.py"}, found
    assert [line for p, line in found if p == "pipeline/runs.py"][0].startswith("def set_status(")
    assert "PLW_STATUS_OWNER" not in "".join(p.read_text() for p in (REPO / "pipeline").rglob("*.py"))


def test_execute_marks_running_then_done(tmp_path):
    rd = RunDir(tmp_path / "r")
    seen = {}

    def work():
        seen["state"] = rd.status()["state"]
        seen["locked"] = lifecycle.holds(rd)
        return {"steps": 3, "final_loss": 1.25}

    assert lifecycle.execute(rd, work) == {"steps": 3, "final_loss": 1.25}
    assert seen == {"state": "running", "locked": True}
    st = rd.status()
    assert st["state"] == "done" and st["attempts"] == 1 and st["steps"] == 3 and st["final_loss"] == 1.25
    assert st["final"] == str(rd.final) and not lifecycle.holds(rd) and not rd.lock_held()


def test_execute_records_a_preemption_as_pending_and_an_error_as_failed(tmp_path):
    rd = RunDir(tmp_path / "r")

    def stopped():
        raise Preempted(4, "SIGTERM", "/ckpt/step-4")

    with pytest.raises(Preempted):
        lifecycle.execute(rd, stopped)
    st = rd.status()
    assert st["state"] == "pending" and st["attempts"] == 1
    assert {k: st["interrupted"][k] for k in ("reason", "step", "checkpoint")} == {
        "reason": "SIGTERM",
        "step": 4,
        "checkpoint": "/ckpt/step-4",
    }

    def broken():
        raise ValueError("bad shape")

    with pytest.raises(ValueError):
        lifecycle.execute(rd, broken)
    st = rd.status()
    assert st["state"] == "failed" and st["attempts"] == 2 and st["failures"] == 1
    assert st["error"].startswith("ValueError: bad shape") and "Traceback" in st["error"]
    assert "interrupted" not in st and not rd.lock_held()


def test_the_lock_is_reentrant_in_a_process_and_exclusive_between_processes(tmp_path):
    rd = RunDir(tmp_path / "r")
    with lifecycle.hold(rd):
        with lifecycle.hold(rd):  # the sweep worker holds it, then pipeline.train.run executes under it
            assert lifecycle.holds(rd)
        assert lifecycle.holds(rd) and rd.lock_held()
    assert not lifecycle.holds(rd) and not rd.lock_held()
    rd2 = RunDir(tmp_path / "r2")
    proc = _hold_in_child(rd2)
    try:
        assert lifecycle.acquire(rd2) is False
        with pytest.raises(RunBusy, match="another process"):
            lifecycle.execute(rd2, lambda: {})
        assert not rd2.status_file.exists()  # nothing written for a run another process executes
    finally:
        proc.kill()
        proc.wait()
    assert lifecycle.acquire(rd2) is True  # the lock died with its process
    lifecycle.release(rd2)


def test_watcher_transitions(tmp_path):
    rd = RunDir(tmp_path / "r")
    lifecycle.mark_prepared(rd)
    assert rd.status()["state"] == "pending"
    lifecycle.mark_queued(rd, "12_3", "/sub/x")
    st = rd.status()
    assert st["state"] == "pending" and st["slurm_job_id"] == "12_3" and st["submitit_folder"] == "/sub/x"
    lifecycle.mark_prepared(rd)  # an existing status is kept
    assert rd.status()["slurm_job_id"] == "12_3"
    rd.write_heartbeat()
    lifecycle.mark_stale(rd, {"host": "h1", "pid": 7, "slurm_job_id": "12_3"})
    st = rd.status()
    assert st["state"] == "failed" and st["stale"] and st["failures"] == 1
    assert "host h1, pid 7, SLURM job 12_3" in st["error"]
    lifecycle.mark_failed(rd, "second")  # keeps the first error, counts no second failure
    assert rd.status()["failures"] == 1 and rd.status()["error"].startswith("stale")
    lifecycle.mark_failed(rd, "worker killed", keep_first=False)
    assert rd.status()["failures"] == 2 and rd.status()["error"] == "worker killed"
    lifecycle.mark_interrupted(rd, "ended with code 3")
    assert rd.status()["state"] == "pending" and rd.status()["interrupted"] == {"reason": "ended with code 3"}
    lifecycle.mark_interrupted(rd, "again")  # already pending with `interrupted`: left as is
    assert rd.status()["interrupted"] == {"reason": "ended with code 3"}


def test_a_corrupt_status_is_never_executed_nor_overwritten(tmp_path):
    from pipeline.runs import CorruptStatus

    rd = RunDir(tmp_path / "run")
    lifecycle.mark_prepared(rd)
    rd.status_file.write_text("{not json")
    called = []
    with pytest.raises(CorruptStatus, match=re.escape(str(rd.status_file))):
        lifecycle.execute(rd, lambda: called.append(1) or {})
    assert not called and not lifecycle.holds(rd)
    lifecycle.mark_failed(rd, "worker died", keep_first=False)  # watchers leave it alone
    lifecycle.mark_interrupted(rd, "ended")
    assert rd.status_file.read_text() == "{not json"
