"""benchmarks/gpu_acceptance.py in its CPU dry mode: every check runs through the real trainer and
generation code at toy size and reports a row (deepspeed/vLLM n/a where not installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_acceptance_command_runs_dry_on_cpu(tmp_path):
    out = tmp_path / "table.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PLW_NO_PROGRESS="1")
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_acceptance.py"), "--dry", "--out", str(out)],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = json.loads(out.read_text())
    got = {r["check"]: r for r in table["rows"]}
    assert list(got) == ["train", "bf16", "resume", "deepspeed", "qlora", "generation"]
    assert all(got[k]["result"] == "PASS" for k in ("train", "bf16", "resume", "generation"))
    assert got["deepspeed"]["result"] in ("PASS", "n/a") and got["qlora"]["result"] == "n/a"  # no CUDA here
    assert "resumed from [1]" in got["resume"]["value"] and "tok/s" in got["generation"]["value"]
    assert "GPU acceptance on CPU (dry)" in p.stdout
