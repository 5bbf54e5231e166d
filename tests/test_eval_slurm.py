"""``python -m pipeline.eval launcher=slurm`` on a REAL single-node SLURM (scripts/slurm/start.sh,
``make slurm-up``; skips with the reason when it is not up): a run trained by the real trainer is
evaluated in a SLURM array task (piqa only, eval=cpu_small), and a second invocation submits nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_common import overrides, tokenizer_dir  # noqa: E402

from pipeline.sweep.slurm import available  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_WHY = available()


@pytest.mark.skipif(_WHY is not None, reason=f"SLURM unavailable: {_WHY}")
def test_eval_on_slurm_then_nothing_to_submit(request, tmp_path, shared_dir):
    from pipeline.config import load_config
    from pipeline.eval.results import read_results
    from pipeline.train import run as train

    cache = getattr(request.config, "cache", None)
    cache = Path(cache.mkdir("plw_train")) if cache is not None else tmp_path / "cache"
    base = {"data_dir": tmp_path / "data", "tokenizer": tokenizer_dir(cache)}
    runs = tmp_path / "runs"
    rd = train(load_config(overrides(base, runs, "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2")))
    assert rd.status()["state"] == "done"

    args = [
        sys.executable,
        "-m",
        "pipeline.eval",
        *overrides(base, runs)[-3:],
        "eval=cpu_small",
        "eval.benchmarks=[piqa]",
        "eval.mechanisms=[]",
        "eval.limit=2",
        "launcher=slurm",
        "launcher.wait=true",
        "launcher.poll_s=1",
        "model.resources.cpus_per_task=1",
        "model.resources.mem_gb=4",
        "model.resources.gpus_per_node=0",
        "model.resources.timeout_min=10",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert f"submitted {rd.path.name}: job " in out.stdout, log
    assert f"[ok] {rd.path.name}" in out.stdout, log
    rows = read_results(rd.path / "results.csv")
    assert rows and {(r["benchmark"], r["status"]) for r in rows} == {("piqa", "ok")}, rows
    assert all(r["value"] is not None and r["n"] == 2 for r in rows), rows

    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to submit" in again.stdout and "submitted" not in again.stdout, again.stdout + again.stderr
