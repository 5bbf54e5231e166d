"""Several runs per worker process (``launcher.runs_per_worker``), on the real trainer: the tiny model,
real AlpacaData rows from ../shared, real checkpoints, real worker processes.

Behaviours: a chunk of 3 runs in one worker ends with the losses of the same runs trained one per
worker (bit-identical on CPU), each run with its own attempt log; a run that fails in the middle of a
chunk is recorded failed and the worker goes on; SIGTERM stops a several-run worker with the current
run resumable and the later runs untouched; a worker killed mid-chunk charges only the run it was
executing; the chunking rule keeps every slot busy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sweep_launch import env_base, grid, sweep, train_rows, wait_for  # noqa: E402,F401

from pipeline.runs import RunDir, list_runs  # noqa: E402
from pipeline.sweep.local import chunk_size  # noqa: E402

PLWS = "[0.0,0.1,1.0]"


def _by_plw(runs_dir: Path):
    return {json.loads(rd.run_json.read_text())["plw"]: rd for rd in list_runs(runs_dir)}


def _prepared(base, runs_dir: Path, plw: str, *extra: str) -> List[RunDir]:
    """The runs of a small grid, prepared for launching (launch.yaml/json) as the sweep does, in
    grid order."""
    from pipeline.sweep.plan import make_plan, prepare_launch

    plan = make_plan(grid(base, runs_dir, plw, *extra))
    for pr in plan.runs:
        prepare_launch(pr, plan.root.launcher)
    return [pr.rd for pr in plan.runs]


def _group(rds: List[RunDir]):
    from pipeline.sweep.supervise import GroupSupervisor

    return GroupSupervisor(rds, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), threads=1).start()


def _outcomes(sup) -> dict:
    """run_id -> outcome of every run of the (ended) worker."""
    sup.finalize()
    return dict(sup.outcomes)


# ------------------------------------------------------------------------------------------------
# pure: the chunking rule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "remaining,per_worker,max_parallel,expected",
    [
        (60, 10, 2, 10),
        (60, 60, 2, 30),
        (7, 10, 2, 4),
        (1, 10, 2, 1),
        (3, 3, 1, 3),
        (5, 1, 2, 1),
        (2, 6, 4, 1),
    ],
)
def test_chunk_size(remaining, per_worker, max_parallel, expected):
    assert chunk_size(remaining, per_worker, max_parallel) == expected


def test_chunks_keep_every_slot_busy_to_the_end():
    """Simulated: runs of equal length, workers take chunks as slots free up; the last chunks
    shrink so that no slot idles while another has a long tail (makespan = the ideal)."""
    for n, per_worker, slots in [(60, 60, 2), (60, 10, 2), (13, 5, 3), (6, 6, 2)]:
        free = [0.0] * slots  # when each slot is free
        left = n
        while left:
            i = min(range(slots), key=lambda k: free[k])
            c = chunk_size(left, per_worker, slots)
            free[i] += c
            left -= c
        assert max(free) <= -(-n // slots) + 1, (n, per_worker, slots, free)


def test_runs_per_worker_is_checked():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="launcher.runs_per_worker"):
        load_config(["launcher.runs_per_worker=0"])
    assert load_config([]).launcher.runs_per_worker == 1  # default: one process per run


# ------------------------------------------------------------------------------------------------
# the sweep: 3 runs in one worker vs one worker per run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_per_worker(env_base, module_tmp):
    runs = module_tmp("one_per_worker")
    out = sweep(grid(env_base, runs, PLWS))
    return {"runs": runs, "out": out}


@pytest.fixture(scope="module")
def three_in_one(env_base, module_tmp):
    runs = module_tmp("three_in_one")
    out = sweep(grid(env_base, runs, PLWS, "launcher.runs_per_worker=3"))
    return {"runs": runs, "out": out}


def test_three_runs_in_one_worker_match_one_run_per_worker(three_in_one, one_per_worker):
    multi, single = three_in_one["out"], one_per_worker["out"]
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert single.returncode == 0, single.stdout + single.stderr
    got, want = _by_plw(three_in_one["runs"]), _by_plw(one_per_worker["runs"])
    assert sorted(got) == sorted(want) == [0.0, 0.1, 1.0]
    for plw in got:
        a, b = got[plw].status(), want[plw].status()
        assert a["state"] == b["state"] == "done" and a["attempts"] == 1
        assert a["final_loss"] == b["final_loss"]  # exactly: the same computation in either process
        assert [r["loss"] for r in train_rows(got[plw])] == [r["loss"] for r in train_rows(want[plw])]
    # one process executed the three runs (its pid in each status), three processes the reference
    assert len({rd.status()["pid"] for rd in got.values()}) == 1
    assert len({rd.status()["pid"] for rd in want.values()}) == 3
    text = multi.stdout + multi.stderr
    assert "[worker] 3 runs in one process" in text and "[worker]" not in single.stdout + single.stderr
    assert len(re.findall(r"\[done\] tiny shared_alpaca52k", text)) == 3


def test_each_run_of_a_worker_has_its_own_attempt_log(three_in_one):
    rds = list(_by_plw(three_in_one["runs"]).values())
    for rd in rds:
        logs = sorted(p.name for p in rd.logs.glob("attempt-*.log"))
        assert logs == ["attempt-1.log"]
        text = (rd.logs / "attempt-1.log").read_text()
        assert text.lstrip().startswith("=== ") and "pipeline.sweep.worker" in text.splitlines()[1]
        assert f"training {rd.run_id}:" in text and "step 6/6" in text
        assert not any(f"training {o.run_id}:" in text for o in rds if o is not rd)
        hb = rd.heartbeat()
        assert hb is not None and hb["run_id"] == rd.run_id
    workers = list((three_in_one["runs"] / "_workers").glob("worker-*.log"))
    assert len(workers) == 1 and "training" not in workers[0].read_text()


# ------------------------------------------------------------------------------------------------
# the worker: failures, signals, a killed worker (GroupSupervisor over prepared runs)
# ------------------------------------------------------------------------------------------------
def test_a_failing_middle_run_is_recorded_and_the_worker_goes_on(env_base, tmp_path):
    rds = _prepared(env_base, tmp_path / "runs", "[0.2,0.3,0.4]")
    bad = rds[1]
    text = bad.launch_config.read_text()
    assert re.search(r"^plw: 0\.3$", text, flags=re.M)
    bad.launch_config.write_text(re.sub(r"^plw: 0\.3$", "plw: -1.0", text, flags=re.M))
    sup = _group(rds)
    assert sup.wait(300) is not None
    out = _outcomes(sup)
    assert [out[rd.run_id] for rd in rds] == ["done", "failed", "done"]
    assert sup.rc == 1  # not every run is done
    st = bad.status()
    assert st["state"] == "failed" and str(bad.launch_config) in st["error"] and "plw" in st["error"]
    assert "PLW must be >= 0" in (bad.logs / "attempt-1.log").read_text()  # its own log has the traceback
    for rd in (rds[0], rds[2]):
        assert rd.status()["state"] == "done" and len(train_rows(rd)) == 6


def test_sigterm_stops_the_current_run_resumably_and_leaves_later_runs_untouched(env_base, tmp_path):
    # the first run is long enough (40 steps) for the signal to land mid-training
    first = _prepared(env_base, tmp_path / "runs", "[0.5]", "train.max_steps=40")
    later = _prepared(env_base, tmp_path / "runs", "[0.6,0.7]")
    rds = first + later
    before = {rd.run_id: rd.status_file.read_bytes() for rd in later}
    sup = _group(rds)
    wait_for(lambda: len(train_rows(first[0])) >= 1 or sup.poll() is not None, 240, "the first step")
    sup.send(signal.SIGTERM)
    assert sup.wait(240) == 75, sup.worker_log.read_text()
    out = _outcomes(sup)
    assert [out[rd.run_id] for rd in rds] == ["interrupted", "not started", "not started"]
    st = first[0].status()
    assert st["state"] == "pending" and st["interrupted"]["reason"] == "SIGTERM"
    steps = len(train_rows(first[0]))
    assert 1 <= st["interrupted"]["step"] == steps < 40
    assert Path(st["interrupted"]["checkpoint"]).is_dir()  # resumable from here
    for rd in later:
        assert rd.status_file.read_bytes() == before[rd.run_id]
        assert not rd.logs.exists() and not rd.metrics.exists() and rd.heartbeat() is None
    assert "2 run(s) not started" in sup.worker_log.read_text()


def test_a_killed_worker_charges_only_the_run_it_was_executing(env_base, tmp_path):
    rds = _prepared(env_base, tmp_path / "runs", "[0.8,0.9]")
    sup = _group(rds)
    wait_for(
        lambda: any(k == "start" for k, _, _ in sup.events()) or sup.poll() is not None, 120, "the first run to start"
    )
    time.sleep(0.5)
    sup.send(signal.SIGKILL)  # e.g. the OOM killer
    assert sup.wait(60) == -signal.SIGKILL
    out = _outcomes(sup)
    assert [out[rd.run_id] for rd in rds] == ["failed", "not started"]
    st = rds[0].status()
    assert st["state"] == "failed" and "killed by SIGKILL" in st["error"]
    assert str(rds[0].logs / "attempt-1.log") in st["error"]
    assert rds[1].status()["state"] == "pending" and not rds[1].logs.exists()
    assert not rds[0].lock_held()


def test_a_stop_requested_while_a_run_loads_stops_it_at_its_first_step_boundary(env_base, tmp_path):
    """A SIGTERM that reaches the worker outside the trainer's step loop (while the model and data
    load) is not lost: the trainer stops before its first step, the run resumable (in-process: the
    worker's own code path with the stop already requested)."""
    from pipeline.sweep.worker import EXIT_INTERRUPTED, StopFlag, _execute_one

    rd = _prepared(env_base, tmp_path / "runs", "[0.25]")[0]
    stop = StopFlag()
    stop.reason = "SIGTERM"
    assert _execute_one(rd, stop) == EXIT_INTERRUPTED
    st = rd.status()
    assert st["state"] == "pending" and st["attempts"] == 1
    assert st["interrupted"]["reason"] == "SIGTERM" and st["interrupted"]["step"] == 0
    assert train_rows(rd) == [] and not rd.lock_held()


def test_the_sweep_requeues_the_runs_a_killed_worker_had_not_started(env_base, tmp_path):
    """launcher=local, 2 runs in one worker; the worker is killed (SIGKILL, like the OOM killer) while
    it executes the first: that run is failed with its log's end, the second goes back to the queue
    and is done by a new worker in the same sweep."""
    runs = tmp_path / "runs"
    proc = sweep(grid(env_base, runs, "[0.15,0.35]", "launcher.runs_per_worker=2"), wait=False)
    first = wait_for(
        lambda: next((rd for rd in list_runs(runs) if rd.lock_held()), None),
        180,
        "the worker to take the first run's lock",
    )
    pid = int(first.lock_file.read_text().split()[1])
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    rds = _by_plw(runs)
    killed = rds[0.15] if rds[0.15].path == first.path else rds[0.35]
    other = rds[0.35] if killed is rds[0.15] else rds[0.15]
    st = killed.status()
    assert st["state"] == "failed" and "killed by SIGKILL" in st["error"], st
    assert other.status()["state"] == "done" and other.status()["pid"] != pid
    assert "[requeued]" in out and "[done]" in out and "[failed]" in out
