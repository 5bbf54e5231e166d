"""End to end: the sweep on the real trainer (tiny model, real AlpacaData rows from ../shared, real
checkpoints), with launcher=local and on a REAL single-node SLURM cluster (scripts/slurm/start.sh,
started by .ci/run / `make slurm-up`; the SLURM tests skip with the reason when it is not up).

Every run here is the same small recipe (6 optimizer steps of 4 examples, checkpoints every 2
steps). Behaviours: a grid ends with every run done and its metrics; a failing run (its dataset
points at a missing file) stops no other run and is the only one relaunched; re-running a finished
sweep launches nothing; a run stopped mid-training (SIGTERM to a local sweep; SLURM's warning
signal through submitit, which requeues the job) resumes from its checkpoint and ends with exactly
the loss of an uninterrupted run; a run whose SLURM job ended while its status said running is seen
as stale.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_common import tokenizer_dir  # noqa: E402  (the tiny model's tokenizer as a folder: fast loads)

from pipeline.runs import RunDir, list_runs, read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = [
    "train.max_steps=6",
    "train.global_batch_size=4",
    "train.per_device_batch_size=4",
    "train.model_max_length=64",
    "train.save_steps=2",
    "dataset.max_records=24",
    "train.num_threads=1",
]
BROKEN = "+experiment.variants.broken={dataset.source.path: /nonexistent/missing.jsonl}"
SLURM_SMALL = ["model.resources.cpus_per_task=1", "model.resources.mem_gb=2", "model.resources.timeout_min=20"]


def _slurm_reason():
    if shutil.which("sinfo") is None:
        return "no SLURM here (`sinfo` not found): start one with `make slurm-up` (root, Debian)"
    r = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True)
    if r.returncode != 0 or "up" not in r.stdout:
        return f"SLURM not up (sinfo: {r.stderr.strip() or r.stdout.strip()}): `make slurm-up`"
    if (
        shutil.which("sacct") is None
        or subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True).returncode != 0
    ):
        return "SLURM accounting (sacct) unavailable: `make slurm-up` starts slurmdbd"
    return None


needs_slurm = pytest.mark.skipif(_slurm_reason() is not None, reason=str(_slurm_reason()))


@pytest.fixture(scope="module")
def env_base(request, tmp_path_factory, module_tmp, shared_dir):
    cache = getattr(request.config, "cache", None)
    cache = cache.mkdir("plw_train") if cache is not None else tmp_path_factory.mktemp("plw_train")
    return {"data_dir": module_tmp("sweep_data"), "tokenizer": tokenizer_dir(cache)}


def grid(base, runs_dir: Path, plw: str = "[0.1]", *extra: str) -> List[str]:
    return [
        "experiment=demo",
        f"experiment.plw={plw}",
        "experiment.datasets=[shared_alpaca52k]",
        "experiment.models=[tiny]",
        f"paths.data_dir={base['data_dir']}",
        f"paths.runs_dir={runs_dir}",
        f"model.tokenizer={base['tokenizer']}",
        *RECIPE,
        *extra,
    ]


def sweep(args: List[str], timeout: float = 600, wait: bool = True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "pipeline.sweep", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def by_variant(runs_dir: Path):
    return {json.loads(rd.run_json.read_text())["variant"]: rd for rd in list_runs(runs_dir)}


def train_rows(rd: RunDir):
    return [r for r in read_jsonl(rd.metrics) if r.get("kind", "train") == "train" and "loss" in r]


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def assert_resumed_like(rd: RunDir, ref: RunDir):
    got, want = train_rows(rd), train_rows(ref)
    assert [r["step"] for r in got] == list(range(1, 7)) == [r["step"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exactly: CPU resume is bit-identical
    assert rd.status()["final_loss"] == ref.status()["final_loss"]
    summary = json.loads((rd.path / "train_summary.json").read_text())
    assert summary["steps"] == 6


# ------------------------------------------------------------------------------------------------
# launcher=local
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_sweep(env_base, module_tmp):
    """One local sweep over a good run and a broken one (its dataset file is missing)."""
    runs = module_tmp("local_runs")
    t0 = time.time()
    out = sweep(grid(env_base, runs, "[0.1]", BROKEN, "launcher.max_parallel=2"))
    return {"runs": runs, "out": out, "seconds": time.time() - t0}


def test_local_grid_runs_and_a_failure_stops_nothing(local_sweep):
    out, runs = local_sweep["out"], local_sweep["runs"]
    assert out.returncode == 1, out.stdout + out.stderr  # not every run is done
    rds = by_variant(runs)
    good, bad = rds["none"], rds["broken"]
    st = good.status()
    assert st["state"] == "done" and st["attempts"] == 1 and st.get("failures", 0) == 0
    rows = train_rows(good)
    assert [r["step"] for r in rows] == list(range(1, 7)) and st["final_loss"] == rows[-1]["loss"]
    assert (good.final / "config.json").is_file() and (good.logs / "attempt-1.log").is_file()
    assert json.loads(good.run_json.read_text())["plw"] == 0.1
    bst = bad.status()
    assert bst["state"] == "failed" and bst["failures"] == 1 and "missing.jsonl" in bst["error"]
    assert "[failed]" in out.stdout + out.stderr and "[done]" in out.stdout + out.stderr


def test_local_relaunch_runs_only_the_failed_run(local_sweep, env_base):
    runs = local_sweep["runs"]
    rds = by_variant(runs)
    good_before = rds["none"].status_file.read_bytes()
    out = sweep(grid(env_base, runs, "[0.1]", BROKEN))
    assert out.returncode == 1
    assert "1 done" in out.stdout and "1 to launch" in out.stdout
    assert rds["none"].status_file.read_bytes() == good_before  # untouched
    bst = rds["broken"].status()
    assert (bst["attempts"], bst["failures"], bst["state"]) == (2, 2, "failed")
    # retries are bounded: after max_retries relaunches the run is no longer started
    out = sweep(grid(env_base, runs, "[0.1]", BROKEN, "launcher.max_retries=1"))
    assert "1 failed with no retries left" in out.stdout and "nothing to launch" in out.stdout
    assert rds["broken"].status()["attempts"] == 2
    # make status: the grid from the store alone
    st = sweep(["status", *grid(env_base, runs, "[0.1]", BROKEN)])
    assert st.returncode == 0, st.stderr
    assert "2 runs: 1 done, 1 failed" in st.stdout and "missing.jsonl" in st.stdout and "6/6" in st.stdout


def test_local_finished_sweep_launches_nothing(local_sweep, env_base):
    runs = local_sweep["runs"]
    good = by_variant(runs)["none"]
    before = good.status_file.read_bytes()
    t0 = time.time()
    out = sweep(grid(env_base, runs, "[0.1]"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "nothing to launch" in out.stdout and "1 runs: 1 done" in out.stdout
    assert good.status_file.read_bytes() == before and not (good.logs / "attempt-2.log").exists()
    assert time.time() - t0 < 60


@pytest.mark.slow  # ~1 min; the SLURM requeue test covers resuming in the default suite
def test_local_sweep_stopped_by_sigterm_resumes_to_the_same_loss(local_sweep, env_base, tmp_path):
    runs = tmp_path / "runs"
    proc = sweep(grid(env_base, runs, "[0.1]"), wait=False)
    rd = wait_for(lambda: next(iter(list_runs(runs)), None), 120, "the run folder")
    wait_for(lambda: len(train_rows(rd)) >= 1, 240, "the first step")
    proc.send_signal(signal.SIGTERM)  # the sweep asks its runs to checkpoint and stop
    out, _ = proc.communicate(timeout=240)
    st = rd.status()
    assert proc.returncode == 130, out
    assert st["state"] == "pending" and st["interrupted"], st
    stopped_at = len(train_rows(rd))
    assert 1 <= stopped_at < 6
    out = sweep(grid(env_base, runs, "[0.1]"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert rd.status()["attempts"] == 2
    assert_resumed_like(rd, by_variant(local_sweep["runs"])["none"])


# ------------------------------------------------------------------------------------------------
# launcher=slurm (a real SLURM)
# ------------------------------------------------------------------------------------------------
def slurm_args(base, runs, plw="[0.1]", *extra):
    return grid(
        base,
        runs,
        plw,
        "launcher=slurm",
        "launcher.wait=true",
        "launcher.poll_s=1",
        "launcher.signal_delay_s=60",
        *SLURM_SMALL,
        *extra,
    )


@needs_slurm
def test_slurm_grid_failure_relaunch_and_finished_sweep(env_base, tmp_path):
    runs = tmp_path / "runs"
    out = sweep(slurm_args(env_base, runs, "[1.0]", BROKEN))
    log = out.stdout + out.stderr
    assert out.returncode == 1, log
    rds = by_variant(runs)
    good, bad = rds["none"], rds["broken"]
    st = good.status()
    assert st["state"] == "done", log
    assert st["slurm_job_id"] and "_" in st["slurm_job_id"]  # an array task
    assert [r["step"] for r in train_rows(good)] == list(range(1, 7))
    bst = bad.status()
    assert bst["state"] == "failed" and "missing.jsonl" in bst["error"] and bst["failures"] == 1
    # sacct saw the failed task end FAILED and the good one COMPLETED
    from pipeline.sweep.slurm import job_states

    ids = [st["slurm_job_id"], bst["slurm_job_id"]]
    states = wait_for(
        lambda: (lambda s: s if s.get(ids[0]) == "COMPLETED" else None)(job_states(ids)),
        120,
        "the good task's job to complete (status done is written just before)",
    )
    assert states[ids[1]] == "FAILED", states
    folders = sorted((runs / "_submitit").iterdir())
    assert len(folders) == 1

    good_before = good.status_file.read_bytes()
    out = sweep(slurm_args(env_base, runs, "[1.0]", BROKEN))
    assert "1 to launch" in out.stdout and "submitted 1 run(s)" in out.stdout, out.stdout + out.stderr
    assert good.status_file.read_bytes() == good_before
    assert bad.status()["failures"] == 2 and bad.status()["slurm_job_id"] != bst["slurm_job_id"]
    assert len(list((runs / "_submitit").iterdir())) == 2  # one submitit folder per invocation

    out = sweep(slurm_args(env_base, runs, "[1.0]"))
    assert out.returncode == 0 and "nothing to launch" in out.stdout, out.stdout + out.stderr
    assert len(list((runs / "_submitit").iterdir())) == 2  # nothing submitted


@needs_slurm
def test_slurm_requeued_run_resumes_to_the_same_loss(local_sweep, env_base, tmp_path):
    """SLURM's warning signal (what a time limit or preemption sends) reaches submitit, which asks
    the run to checkpoint and requeues the job; the requeued job resumes from the checkpoint."""
    runs = tmp_path / "runs"
    proc = sweep(slurm_args(env_base, runs), wait=False)
    try:
        rd = wait_for(lambda: next(iter(list_runs(runs)), None), 120, "the run folder")
        wait_for(lambda: len(train_rows(rd)) >= 1, 300, "the first training step")
        job = rd.status()["slurm_job_id"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        st = wait_for(
            lambda: (lambda s: s if s.get("interrupted") and s["state"] == "pending" else None)(rd.status()),
            120,
            "the run to checkpoint and stop",
        )
        stopped_at = st["interrupted"]["step"]
        assert 1 <= stopped_at < 6, st
        # SLURM holds a requeued job ~2 minutes (BeginTime); release it now
        # (after the old allocation is fully released: a start during its teardown fails)
        wait_for(
            lambda: (
                "PENDING"
                in subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
            ),
            60,
            "the requeue",
        )
        wait_for(
            lambda: (
                "PENDING"
                in subprocess.run(
                    ["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], capture_output=True, text=True
                ).stdout
            ),
            60,
            "accounting",
        )
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    st = rd.status()
    assert st["state"] == "done" and st["attempts"] == 2 and st["slurm_job_id"] == job, st
    assert_resumed_like(rd, by_variant(local_sweep["runs"])["none"])
    assert "Requeued job" in "".join(p.read_text() for p in (runs / "_submitit").rglob("*.out"))


@needs_slurm
def test_slurm_job_state_decides_liveness(env_base, tmp_path):
    """A run whose status says running on another host: alive while its SLURM job runs, stale once
    the job has ended (even with a fresh heartbeat)."""
    from pipeline.sweep import slurm
    from pipeline.sweep.store import classify, liveness

    def submit(cmd):
        r = subprocess.run(
            ["sbatch", "--parsable", "--mem=100M", "-o", "/dev/null", "--wrap", cmd],
            capture_output=True,
            text=True,
            check=True,
        )
        return r.stdout.strip().split(";")[0]

    ended, live = submit("true"), submit("sleep 120")
    try:
        wait_for(lambda: slurm.job_states([ended]).get(ended, "").startswith("COMPLETED"), 60, "job end")
        rd = RunDir(tmp_path / "r")
        rd.write_heartbeat()
        for job, want in ((ended, "stale"), (live, "running")):
            status = {"state": "running", "host": "another-node", "pid": 1, "slurm_job_id": job}
            lv = liveness(rd, status, slurm.job_states([job]))
            assert classify(status, lv, stale_after_s=600) == want, (job, lv)
    finally:
        subprocess.run(["scancel", live])
